r"""Train a sparsejax decoder LM.

  python experiments/train.py --config=experiments/configs/default.py --workdir=workdir/default
  python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny \
      --config.train.num_steps=50 --config.model.num_layers=2

Rerunning the same command resumes from the latest checkpoint in --workdir (a changed
learning rate or step count is allowed and printed; a different model or data is
refused). Ctrl-C finishes the current step, saves it and exits (status 130); a second
Ctrl-C stops at once. At the end it prints the val loss and bits-per-byte, writes
workdir/report.md and loss_curve.png, and prints a sample generated with the run's
tokenizer (`config.data.tokenizer`). A bad config value, path or data prints one
`error: ...` line (--debug shows the traceback).
Multi-host (TPU pods, GPU clusters): pass --distributed so `jax.distributed.initialize()`
picks up the launcher's environment.
"""

from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

from sparsejax.train.checkpoint import quiet_orbax_logs
from sparsejax.train.config import Config, config_to_dict, parse_config, sections_help
from sparsejax.train.generate import generate_text
from sparsejax.train.metrics import format_bpb
from sparsejax.train.report import count_params, write_report
from sparsejax.train.tokenizer import load_tokenizer
from sparsejax.train.trainer import inference_params, train
from sparsejax.validation import ConfigError, run_cli

_CONFIG_HELP = (
    "Path to an ml_collections config file (experiments/configs/*.py; `file.py:arg` "
    "passes arg to its get_config). Override any field with "
    "--config.<section>.<field>=value, e.g. --config.train.num_steps=50 "
    "--config.model.remat=True --config.model.ffn_options.num_experts=16 (the fields "
    "of a *_options mapping are those of the chosen component). Sections and their "
    f"fields:\n{sections_help()}")

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", _CONFIG_HELP, lock_config=False,
    accept_new_attributes=True)  # fields a config file leaves at their default
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default",
                               "Run directory: checkpoints, metrics.jsonl, report.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host).")


def load_config() -> Config:
  """The validated --config with its overrides (ConfigError naming what is wrong)."""
  try:
    return parse_config(_CONFIG.value)
  except OSError as e:  # ml_collections defers a config file's load error to its use
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    raise ConfigError(f"--config={path}: cannot load it "
                      f"({str(e).strip().splitlines()[-1].strip()})") from None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  result = train(load_config(), _WORKDIR.value)
  config = result.trainer.config   # with init_from_hf: the checkpoint's model, tokenizer
  metrics = result.metrics
  print(f"final: step {metrics['step']}, val loss {metrics['loss']:.4f} nats/token, "
        f"bits-per-byte {format_bpb(metrics['bpb'])}")
  if jax.process_index() != 0:
    return
  state = result.state
  sample = ""
  if config.train.sample_tokens:
    variables = {"params": inference_params(config, state), **state.model_state}
    sample = generate_text(result.trainer.model, variables, config.train.sample_prompt,
                           max_new_tokens=config.train.sample_tokens,
                           seed=config.train.seed,
                           tokenizer=load_tokenizer(config.data.tokenizer))
    print(f"--- sample ---\n{config.train.sample_prompt}{sample}\n--------------")
  report = write_report(_WORKDIR.value, config=config_to_dict(config), metrics=metrics,
                        num_params=count_params(state.params),
                        sample_prompt=config.train.sample_prompt, sample=sample)
  print(f"report: {report}")


if __name__ == "__main__":
  run_cli(main, quiet_logs=quiet_orbax_logs)
