"""Train a sparsejax decoder LM.

  python experiments/train.py --config=experiments/configs/default.py --workdir=workdir/default
  python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny \
      --config.train.num_steps=50 --config.model.num_layers=2

Rerunning the same command resumes from the latest checkpoint in --workdir. At the end
it prints the val loss and bits-per-byte, writes workdir/report.md and loss_curve.png,
and prints a generated sample. Multi-host (TPU pods, GPU clusters): pass --distributed
so `jax.distributed.initialize()` picks up the launcher's environment.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sparsejax.train.config import config_to_dict, parse_config
from sparsejax.train.generate import generate_text
from sparsejax.train.report import count_params, write_report
from sparsejax.train.trainer import train
from sparsejax.validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py",
                                          "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default",
                               "Run directory: checkpoints, metrics.jsonl, report.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    config = parse_config(_CONFIG.value)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  result = train(config, _WORKDIR.value)
  metrics = result.metrics
  print(f"final: step {metrics['step']}, val loss {metrics['loss']:.4f} nats/byte, "
        f"{metrics['bpb']:.4f} bits-per-byte")
  if jax.process_index() != 0:
    return
  state = result.state
  sample = ""
  if config.train.sample_tokens:
    variables = {"params": state.params, **state.model_state}
    sample = generate_text(result.trainer.model, variables, config.train.sample_prompt,
                           max_new_tokens=config.train.sample_tokens,
                           seed=config.train.seed)
    print(f"--- sample ---\n{config.train.sample_prompt}{sample}\n--------------")
  report = write_report(_WORKDIR.value, config=config_to_dict(config), metrics=metrics,
                        num_params=count_params(state.params),
                        sample_prompt=config.train.sample_prompt, sample=sample)
  print(f"report: {report}")


if __name__ == "__main__":
  app.run(main)
