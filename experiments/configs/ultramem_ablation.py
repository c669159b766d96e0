"""The UltraMem ablation ladder (specs/ultramem.md "Claims": each step should lower the
val loss at about constant params and FLOPs). Pick a step after a colon:

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
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pkm  # noqa: E402  (sibling config files)
import ultramem  # noqa: E402

TDQKR = dict(ultramem.ULTRAMEM, tucker_cores=1, value_expand=1, num_keys=85, vdim=128)
STEPS = {
    "pkm": ("pkm", "1:1,2:2", pkm.PKM),
    "pkm_skip": ("pkm", ultramem.MEMORY_LAYERS, pkm.PKM),
    "tdqkr": ("ultramem", ultramem.MEMORY_LAYERS, TDQKR),
    "ive": ("ultramem", ultramem.MEMORY_LAYERS,
            dict(ultramem.ULTRAMEM, tucker_cores=1)),
    "ultramem": ("ultramem", ultramem.MEMORY_LAYERS, ultramem.ULTRAMEM),
}


def get_config(step: str = "ultramem"):
  if step not in STEPS:
    raise ValueError(f"ablation step {step!r} must be one of {tuple(STEPS)}")
  memory, layers, options = STEPS[step]
  config = pkm.get_config()
  config.model.update(memory=memory, memory_layers=layers, memory_options=dict(options))
  return config
