"""UltraMem (V1): the dense model with two skip-layer memory layers ("0:2,1:3": read
the FFN input of blocks 0 and 1, add after blocks 2 and 3), TDQKR (Tucker rank 2, 2
cores), IVE (E=4 virtual blocks) and multi-core scoring; d_ff 256 (vs 384 dense) so the
activated params per token stay close to the dense model's, ≈3.6× its total params.

  python experiments/train.py --config=experiments/configs/ultramem.py --workdir=workdir/ultramem

Per layer: 120² = 14,400 physical values of dim 64 (57,600 virtual slots), 2 heads ×
16 slots read per token. The values train with a 4 → 1 LR multiplier over the first
half of the run (`value_lr_start`, `value_lr_decay_fraction`). Variants: the ablation
ladder in ultramem_ablation.py, the PKM baseline in pkm.py.
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))


def get_config():
  config = dense["get_config"]()
  config.model.update(
      d_ff=256, memory="ultramem", memory_layers="0:2,1:3",
      memory_options=dict(heads=2, knn=16, num_keys=120, kdim=32, vdim=64, tucker_rank=2,
                          tucker_cores=2, value_expand=4, rank_loss_weight=0.0,
                          value_lr_start=4.0, value_lr_decay_fraction=0.5, impl="auto",
                          qk_norm="rmsnorm"))  # the released config's (or "layernorm")
  return config
