"""Q-Sparse from scratch: the default model with top-K activation sparsity (70% of the
entries kept) at the input of every attention/FFN projection and a ReLU²-GLU FFN.

  python experiments/train.py --config=experiments/configs/qsparse.py --workdir=workdir/qsparse

Vary the kept fraction with --config.model.linear_options.topk_ratio=0.5, or use block
Q-Sparse with --config.model.linear_options.mode=nm (n:m = 2:4). Per-projection
sparsity is logged as e.g. block_0/attention/q_proj/act_sparsity. Compare with the dense
baseline (dense.py; add --config.model.ffn=relu2_glu for the same FFN).
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.model.update(
      linear="qsparse", ffn="relu2_glu",
      linear_options=dict(topk_ratio=0.7, mode="topk", n=2, m=4, rescale=False,
                          impl="auto"))
  return config
