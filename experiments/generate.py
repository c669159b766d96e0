r"""Sample from a trained run: restore its latest checkpoint and continue a prompt.

  python experiments/generate.py --workdir=workdir/default --prompt="def " \
      --max_new_tokens=200 --temperature=0.8 --seed=0

Prints the continuation (without the prompt) on stdout. The run's own model config and
tokenizer (`config.data.tokenizer`) are used; an empty --prompt starts a new document
(from the EOS token). --temperature=0 is greedy; --top_p < 1 is nucleus sampling.
Errors (no run in --workdir, no readable checkpoint) print one `error: ...` line.
"""

from __future__ import annotations

from absl import flags, logging

from sparsejax.models import DecoderLM
from sparsejax.train import tokenizer as tokenizer_lib
from sparsejax.train.checkpoint import quiet_orbax_logs
from sparsejax.train.generate import generate_text
from sparsejax.train.trainer import inference_params, restore_run
from sparsejax.validation import ConfigError, run_cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (or its "
                               "checkpoints/ directory).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest one "
                             "that restores).")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text to continue; empty: a new "
                              "document.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.",
                                       lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).",
                                  lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass in (0, 1].",
                            upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.register_validator("top_p", lambda p: p > 0, "--top_p must be in (0, 1]")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config, state, _ = restore_run(_WORKDIR.value, step=_STEP.value)
  variables = {"params": inference_params(config, state), **state.model_state}
  try:
    text = generate_text(DecoderLM(config.model), variables, _PROMPT.value,
                         max_new_tokens=_MAX_NEW_TOKENS.value, seed=_SEED.value,
                         temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                         tokenizer=tokenizer_lib.load_tokenizer(config.data.tokenizer))
  except ValueError as e:  # an empty prompt with a tokenizer that has no EOS
    raise ConfigError(f"--prompt: {e}") from None
  print(text)


if __name__ == "__main__":
  run_cli(main, quiet_logs=quiet_orbax_logs)
