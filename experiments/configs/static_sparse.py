"""Static sparse training: a fixed random mask at 80% sparsity with ERK densities from
the first step (the baseline that SET and RigL improve on).

  python experiments/train.py --config=experiments/configs/static_sparse.py --workdir=workdir/static_sparse
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.sparsity = dict(algorithm="static", sparsity=0.8, distribution="erk")
  return config
