"""UltraMem at pod scale: the scale/dense.py backbone plus skip-layer UltraMem memories
(TDQKR rank 2, 2 cores, IVE E=4, 2 heads × 16 slots per token), one per 4 blocks, value
tables sharded by rows over every chip, sized near the total params of scale/moe.py:
"1b" 4 memories of 1,200² values (dim 1024), 7.2B params; "8b" 8 memories of 1,448²
values (dim 2048), 42.9B params — the UltraMem-vs-MoE comparison at similar total params.

  python experiments/aot_compile.py --config=experiments/configs/scale/ultramem.py:1b --topology=v5p:4x4x4 --fit_layers=1,2
  python experiments/aot_compile.py --config=experiments/configs/scale/ultramem.py:8b --topology=v6e:16x16 --fit_layers=1,2
"""

import os
import runpy

dense = runpy.run_path(os.path.join(os.path.dirname(__file__), "dense.py"))

NUM_KEYS = {"1b": 1200, "8b": 1448}


def get_config(size: str = "1b"):
  config = dense["get_config"](size)
  blocks = config.model.num_layers
  config.model.update(
      memory="ultramem",
      memory_layers=",".join(f"{s}:{s + 3}" for s in range(0, blocks, 4)),
      memory_options=dict(heads=2, knn=16, num_keys=NUM_KEYS[size], tucker_rank=2,
                          tucker_cores=2, value_expand=4, shard_values="rows",
                          qk_norm="rmsnorm"))
  return config
