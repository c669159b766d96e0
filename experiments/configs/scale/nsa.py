"""Native Sparse Attention at 32k context: the scale/dense.py model with "nsa" attention
in every block (compression l=32, d=16; 16 selected blocks of 64; window 512, the NSA
paper's settings), global batch 64 × 32,768 tokens, heads split over "tensor" (4), FSDP
over the rest.

  python experiments/aot_compile.py --config=experiments/configs/scale/nsa.py:1b --topology=v5p:4x4x4 --fit_layers=1,2
  python experiments/aot_compile.py --config=experiments/configs/scale/nsa.py:8b --topology=v6e:16x16 --fit_layers=1,2
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config(size: str = "1b"):
  config = dense["get_config"](size)
  config.model.update(
      attention="nsa",
      attention_options=dict(block_len=32, stride=16, select_block=64, num_selected=16,
                             window=512, num_initial=1, num_local=2))
  config.data.update(seq_len=32768, batch_size=64)
  config.mesh.update(tensor=4)
  return config
