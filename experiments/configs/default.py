"""Default run (`make run`): the sparse flagship, a small UltraMem model (ultramem.py:
dense 4-block decoder + two skip-layer UltraMem memories) on the embedded stdlib
corpus, ≈4 min on a 2-core CPU.

  python experiments/train.py --config=experiments/configs/default.py --workdir=workdir/default

The dense baseline is dense.py; `make compare` trains Dense / PKM / MoE / UltraMem side
by side (experiments/compare.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ultramem  # noqa: E402  (the sibling config file)


def get_config():
  return ultramem.get_config()
