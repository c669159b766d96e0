"""Tiny run for tests and smoke checks (seconds on a CPU).

  python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)
  config.data.update(seq_len=32, batch_size=8)
  config.optim.update(warmup_steps=2)
  config.train.update(num_steps=6, log_every=2, eval_every=3, eval_batches=2,
                      checkpoint_every=3, sample_tokens=16)
  return config
