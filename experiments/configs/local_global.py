"""Block-sparse local + global attention: the dense baseline with "block_sparse"
attention (pattern "local_global") in every block: each query sees the last 32 keys
(itself included) plus the first 4 sink tokens, tiled in 32×32 blocks, sized for
seq_len 128 so the pattern is sparse (a query late in the sequence reads 36 of up to
128 keys; 32×32 blocks visit 2–3 of up to 4 kv blocks per q block).

  python experiments/train.py --config=experiments/configs/local_global.py --workdir=workdir/local_global

Compare with the dense baseline (dense.py) and NSA (nsa.py) at equal tokens:
`python experiments/bench_attention.py --noscaling --nodecode` trains the three for the same
steps (see benchmarks/RESULTS.md).
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.model.update(
      attention="block_sparse",
      attention_options=dict(pattern="local_global", window=32, num_global=4,
                             block_q=32, block_kv=32, impl="auto"))
  return config
