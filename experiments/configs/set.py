"""SET (Mocanu et al. 2018) at 80% sparsity with ERK densities: every 25 steps until
75% of training, drop 30% of each layer's active weights (smallest |w|) and regrow as
many at random positions, starting at 0.

  python experiments/train.py --config=experiments/configs/set.py --workdir=workdir/set
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.sparsity = dict(algorithm="set", sparsity=0.8, distribution="erk",
                         update_every=25, drop_fraction=0.3)
  return config
