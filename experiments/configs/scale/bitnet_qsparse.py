"""BitNet b1.58 + Q-Sparse at pod scale: the scale/dense.py model with ternary weights,
8-bit activations and top-K (40% kept, near the Q-Sparse paper's 1.58-bit optimum) of
the input of every projection, and a ReLU²-GLU FFN.

  python experiments/aot_compile.py --config=experiments/configs/scale/bitnet_qsparse.py:1b --topology=v5p:4x4x4 --fit_layers=1,2
  python experiments/aot_compile.py --config=experiments/configs/scale/bitnet_qsparse.py:8b --topology=v6e:16x16 --fit_layers=1,2
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config(size: str = "1b"):
  config = dense["get_config"](size)
  config.model.update(
      linear="bitnet_qsparse", ffn="relu2_glu",
      linear_options=dict(topk_ratio=0.4, mode="topk", impl="auto"))
  return config
