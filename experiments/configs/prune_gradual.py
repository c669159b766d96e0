"""Gradual magnitude pruning (Zhu & Gupta 2017) of the dense baseline to 80% sparsity:
the cubic schedule prunes every 20 steps from step 30 to step 270 (75% of training),
uniform per-layer sparsity; the pruned weights stay exactly 0.

  python experiments/train.py --config=experiments/configs/prune_gradual.py --workdir=workdir/prune_gradual
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.sparsity = dict(algorithm="magnitude", sparsity=0.8, distribution="uniform",
                         schedule="polynomial", begin_step=30, end_step=270,
                         update_every=20)
  return config
