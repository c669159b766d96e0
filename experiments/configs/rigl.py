"""RigL (Evci et al. 2020) at 80% sparsity with ERK densities: every 25 steps until 75%
of training, drop the smallest active weights and grow those with the largest dense
gradient (drop fraction 0.3·(1 + cos(π t / T_end))/2); grown weights start at 0 with
their Adam moments reset.

  python experiments/train.py --config=experiments/configs/rigl.py --workdir=workdir/rigl
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.sparsity = dict(algorithm="rigl", sparsity=0.8, distribution="erk",
                         update_every=25, drop_fraction=0.3, end_step=0)
  return config
