"""Block-sparse strided attention (Sparse Transformer, Child et al. 2019): the dense
baseline with "block_sparse" attention (pattern "strided") in every block: each query
sees the last 16 keys (itself included) plus every 16th earlier key, tiled in 32×32
blocks, sized for seq_len 128 (a query late in the sequence reads ≈ 16 + 7 of up to 128
keys). Note the strided columns touch every causal kv block, so the block-sparse kernel
skips only the blocks above the diagonal (block efficiency is low): the sparsity is in
the pattern, not in the compute.

  python experiments/train.py --config=experiments/configs/strided.py --workdir=workdir/strided

Compare with the dense baseline (dense.py) and local_global.py at equal tokens.
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.model.update(
      attention="block_sparse",
      attention_options=dict(pattern="strided", window=16, stride=16,
                             block_q=32, block_kv=32, impl="auto"))
  return config
