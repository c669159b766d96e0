"""2:4 structured sparsity trained from scratch with a straight-through estimator
(Zhou et al. 2021): dense weights, the forward keeps the 2 largest |w| of every 4
consecutive inputs of each output (recomputed every step), dense gradients.

  python experiments/train.py --config=experiments/configs/nm_2_4.py --workdir=workdir/nm_2_4
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.sparsity = dict(algorithm="ste", granularity="nm", n=2, m=4, sparsity=0.5)
  return config
