"""Product-key memory baseline (Lample et al. 2019): the UltraMem config's dense part
(d_ff 256) with two PKM layers in place (no skip: "1:1,2:2"), 85² = 7,225 values of dim
128 each (≈ the UltraMem config's table size), 2 heads × top-16 with softmax weights.

  python experiments/train.py --config=experiments/configs/pkm.py --workdir=workdir/pkm
"""

import os
import runpy

ultramem = runpy.run_path(os.path.join(os.path.dirname(__file__), "ultramem.py"))


def get_config():
  config = ultramem["get_config"]()   # the same dense part (d_ff 256)
  config.model.update(memory="pkm", memory_layers="1:1,2:2")
  config.model.memory_options = dict(heads=2, knn=16, num_keys=85, kdim=32,
                                     value_lr_start=4.0, value_lr_decay_fraction=0.5,
                                     impl="auto", qk_norm="rmsnorm")
  return config
