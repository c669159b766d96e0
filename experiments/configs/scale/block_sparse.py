"""Block-sparse local + global attention at 32k context: the scale/dense.py model with
"block_sparse" attention (pattern "local_global": a 4,096-token window plus 64 sink
tokens, 512 × 512 tiles), global batch 64 × 32,768 tokens, heads split over "tensor"
(4), FSDP over the rest.

  python experiments/aot_compile.py --config=experiments/configs/scale/block_sparse.py:1b --topology=v5p:4x4x4 --fit_layers=1,2
  python experiments/aot_compile.py --config=experiments/configs/scale/block_sparse.py:8b --topology=v6e:16x16 --fit_layers=1,2
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config(size: str = "1b"):
  config = dense["get_config"](size)
  config.model.update(
      attention="block_sparse",
      attention_options=dict(pattern="local_global", window=4096, num_global=64,
                             block_q=512, block_kv=512, impl="auto"))
  config.data.update(seq_len=32768, batch_size=64)
  config.mesh.update(tensor=4)
  return config
