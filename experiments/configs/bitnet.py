"""BitNet b1.58: the default (LLaMA-like, SwiGLU) model with every attention/FFN
projection a BitLinear (ternary absmean weights, 8-bit absmax activations, STE);
embedding and lm_head stay full precision.

  python experiments/train.py --config=experiments/configs/bitnet.py --workdir=workdir/bitnet
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.model.update(linear="bitnet")
  return config
