"""Product-key memory baseline (Lample et al. 2019): the dense model (d_ff 256) with two
PKM layers in place (no skip: "1:1,2:2"), 85² = 7,225 values of dim 128 each (≈ the
UltraMem config's table size), 2 heads × top-16 with softmax weights.

  python experiments/train.py --config=experiments/configs/pkm.py --workdir=workdir/pkm
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dense  # noqa: E402  (the sibling config file)
import ultramem  # noqa: E402

PKM = dict(heads=2, knn=16, num_keys=85, kdim=32, value_lr_start=4.0,
           value_lr_decay_fraction=0.5, impl="auto")


def get_config():
  config = dense.get_config()
  config.model.update(d_ff=ultramem.MEMORY_D_FF, memory="pkm", memory_layers="1:1,2:2",
                      memory_options=dict(PKM))
  return config
