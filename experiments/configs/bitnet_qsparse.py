"""BitNet b1.58 + Q-Sparse: ternary weights and 8-bit activations with top-K (70% kept)
of the quantized input of every attention/FFN projection, Y = (Q(x) ⊙ M) · Ŵ, and a
ReLU²-GLU FFN.

  python experiments/train.py --config=experiments/configs/bitnet_qsparse.py --workdir=workdir/bitnet_qsparse

Vary the kept fraction with --config.model.linear_options.topk_ratio=0.4 (the spec's
1.58-bit optimum is ≈61% sparsity), or --config.model.linear_options.mode=nm for N:M.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dense  # noqa: E402  (the sibling config file)


def get_config():
  config = dense.get_config()
  config.model.update(
      linear="bitnet_qsparse", ffn="relu2_glu",
      linear_options=dict(topk_ratio=0.7, mode="topk", n=2, m=4, impl="auto"))
  return config
