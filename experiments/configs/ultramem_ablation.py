"""The UltraMem ablation ladder (Huang et al., arXiv 2411.12364: each step should lower
the val loss at about constant params and FLOPs). Pick a step after a colon:

  python experiments/train.py --config=experiments/configs/ultramem_ablation.py:pkm_skip \\
      --workdir=workdir/ablation_pkm_skip

Steps (each adds one thing to the previous; value tables ≈ 0.92M params per layer):
  pkm        PKM, memory in place ("1:1,2:2")                        = pkm.py
  pkm_skip   + skip-layer placement ("0:2,1:3")
  tdqkr      + Tucker-decomposed retrieval (rank 2, one core, raw scores, value
             projection W_o), 85² values of dim 128
  ive        + implicit value expansion: E=4 virtual blocks, 120² values of dim 64
  ultramem   + multi-core scoring (2 cores)                           = ultramem.py
"""

import os
import runpy

PARENTS = {name: runpy.run_path(os.path.join(os.path.dirname(__file__), f"{name}.py"))
           for name in ("pkm", "ultramem")}
# step: (parent config, the config whose memory_layers it uses, memory_options changes)
STEPS = {
    "pkm": ("pkm", "pkm", {}),
    "pkm_skip": ("pkm", "ultramem", {}),
    "tdqkr": ("ultramem", "ultramem",
              dict(tucker_cores=1, value_expand=1, num_keys=85, vdim=128)),
    "ive": ("ultramem", "ultramem", dict(tucker_cores=1)),
    "ultramem": ("ultramem", "ultramem", {}),
}


def get_config(step: str = "ultramem"):
  if step not in STEPS:
    raise ValueError(f"ablation step {step!r} must be one of {tuple(STEPS)}")
  parent, placement, changes = STEPS[step]
  config = PARENTS[parent]["get_config"]()
  config.model.memory_layers = PARENTS[placement]["get_config"]().model.memory_layers
  config.model.memory_options.update(changes)
  return config
