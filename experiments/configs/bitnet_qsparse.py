"""BitNet b1.58 + Q-Sparse: ternary weights and 8-bit activations with top-K (70% kept)
of the quantized input of every attention/FFN projection, Y = (Q(x) ⊙ M) · Ŵ, and a
ReLU²-GLU FFN.

  python experiments/train.py --config=experiments/configs/bitnet_qsparse.py --workdir=workdir/bitnet_qsparse

Vary the kept fraction with --config.model.linear_options.topk_ratio=0.4 (the Q-Sparse
paper's 1.58-bit optimum is ≈61% sparsity), or --config.model.linear_options.mode=nm for N:M.
"""

import os
import runpy

qsparse = runpy.run_path(os.path.join(os.path.dirname(__file__), "qsparse.py"))


def get_config():
  config = qsparse["get_config"]()
  config.model.linear = "bitnet_qsparse"
  del config.model.linear_options["rescale"]   # Q-Sparse's L2 rescale: not with BitNet
  return config
