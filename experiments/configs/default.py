"""Default run (`make run`): the sparse flagship, a small UltraMem model (ultramem.py:
dense 4-block decoder + two skip-layer UltraMem memories) on the embedded stdlib
corpus, ≈4 min on a 2-core CPU.

  python experiments/train.py --config=experiments/configs/default.py --workdir=workdir/default

The dense baseline is dense.py; `make compare` trains Dense / PKM / MoE / UltraMem side
by side (experiments/compare.py).
"""

import os
import runpy

ultramem = runpy.run_path(os.path.join(os.path.dirname(__file__), "ultramem.py"))


def get_config():
  return ultramem["get_config"]()
