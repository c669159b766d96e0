"""Per-tensor densities for a target overall sparsity: uniform and Erdős–Rényi-Kernel.

`shapes` maps a tensor name to its shape; the result maps the same names to the density
(fraction kept) of each tensor. Masks then keep round(density·n) entries per tensor
(`sparsejax.sparsity.masks`).

ERK (Evci et al. 2020, "Rigging the Lottery", Sec. 3; the Erdős–Rényi scaling of Mocanu
et al. 2018 extended to all kernel dims): a tensor of shape (d_1, …, d_r) gets density

    d = ε · ((Σ_i d_i) / (Π_i d_i))^power_scale,

ε chosen so that the kept-parameter count matches the target, the RigL accounting with
z(n) = ⌊s·n⌋ zeros per tensor of n entries:

    ε · Σ_{free} raw·n = Σ_{free} (n − z(n)) − Σ_{dense} z(n).

Tensors whose density would exceed 1 become dense: at each round those with the largest
raw ratio are moved to the dense set and ε is recomputed, until every free density is
≤ 1. Tensors named in `dense=` are in the dense set from the start; they count towards
the target (so the remaining tensors are sparser). The kept count Σ d·n then equals
Σ (n − ⌊s·n⌋) ≈ (1 − s)·N (to the per-tensor rounding of the masks).
"""

from __future__ import annotations

import math
import operator
from typing import Iterable, Mapping

from sparsejax.sparsity.masks import check_fraction


def _check_shapes(shapes: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
  if not isinstance(shapes, Mapping) or not shapes:
    raise ValueError("shapes must be a non-empty mapping from tensor name to shape")
  checked = {}
  for name, shape in shapes.items():
    try:
      dims = tuple(operator.index(d) for d in shape)
    except TypeError:
      raise ValueError(f"shapes[{name!r}]={shape!r} must be a tuple of ints") from None
    if not dims or min(dims) < 1:
      raise ValueError(f"shapes[{name!r}]={shape!r} must have at least one axis and "
                       "positive sizes")
    checked[name] = dims
  return checked


def uniform_densities(shapes: Mapping[str, tuple], sparsity) -> dict[str, float]:
  """Every tensor at density 1 − sparsity (sparsity in [0, 1])."""
  shapes = _check_shapes(shapes)
  density = 1.0 - check_fraction(sparsity, "sparsity")
  return {name: density for name in shapes}


def erk_densities(shapes: Mapping[str, tuple], sparsity, *, power_scale: float = 1.0,
                  dense: Iterable[str] = ()) -> dict[str, float]:
  """Erdős–Rényi-Kernel densities (module docstring) for an overall `sparsity`.

  Args:
    shapes: tensor name → shape (all kernel dims count: conv kernels, [embed, heads,
      head_dim] attention kernels, MoE [experts, in, out] tensors alike).
    sparsity: target fraction of zeros over all the tensors, in [0, 1].
    power_scale: exponent of the raw ratio (< 1 softens ERK towards uniform), ≥ 0.
    dense: names of tensors kept dense (density 1), counted in the target.

  Returns:
    name → density in [0, 1].

  Raises:
    ValueError: bad sparsity/power_scale/shapes, a `dense` name not in `shapes`, or
      dense tensors holding more than the target's kept parameters.
  """
  shapes = _check_shapes(shapes)
  sparsity = check_fraction(sparsity, "sparsity")
  if isinstance(power_scale, bool) or not isinstance(power_scale, (int, float)) \
      or not 0 <= power_scale < math.inf:
    raise ValueError(f"power_scale={power_scale!r} must be a finite number >= 0")
  named = {dense} if isinstance(dense, str) else set(dense)
  unknown = sorted(named - set(shapes))
  if unknown:
    raise ValueError(f"dense={sorted(named)!r}: {unknown} are not in shapes")
  dense_set = set(named)
  size = {name: math.prod(dims) for name, dims in shapes.items()}
  zeros = {name: math.floor(sparsity * n) for name, n in size.items()}
  raw = {name: (sum(dims) / math.prod(dims)) ** power_scale
         for name, dims in shapes.items()}
  eps = 0.0
  while True:
    free = [name for name in shapes if name not in dense_set]
    if not free:
      break
    rhs = (sum(size[name] - zeros[name] for name in free)
           - sum(zeros[name] for name in dense_set))
    eps = rhs / sum(raw[name] * size[name] for name in free)
    top = max(raw[name] for name in free)
    if top * eps <= 1:
      break
    dense_set.update(name for name in free if raw[name] == top)
  if eps < 0 or not free and sum(zeros.values()):
    raise ValueError(f"dense={sorted(named)!r}: the dense tensors hold more than "
                     f"the {1 - sparsity:g} of all parameters kept at sparsity={sparsity}")
  return {name: 1.0 if name in dense_set else eps * raw[name] for name in shapes}
