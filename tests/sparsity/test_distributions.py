"""Uniform and ERK densities: ERK against a NumPy re-derivation of the RigL reference
algorithm (dense-overflow loop included), the kept-count budget and errors."""

from __future__ import annotations

import numpy as np
import pytest

from sparsejax.sparsity import erk_densities, uniform_densities


def np_erk(shapes: dict, sparsity: float, power: float, dense=()) -> dict:
  """RigL's get_sparsities_erdos_renyi (include_kernel=True), vectorized:
  ε·Σ_free p·n = Σ_free (n − ⌊s·n⌋) − Σ_dense ⌊s·n⌋; while max p·ε > 1 the tensors with
  the largest p turn dense."""
  names = list(shapes)
  n = np.array([np.prod(shapes[k]) for k in names], np.float64)
  zeros = np.floor(sparsity * n)
  p = np.array([np.sum(shapes[k]) / np.prod(shapes[k]) for k in names]) ** power
  is_dense = np.array([k in dense for k in names])
  while True:
    free = ~is_dense
    eps = ((n - zeros)[free].sum() - zeros[is_dense].sum()) / (p * n)[free].sum()
    if p[free].max() * eps <= 1:
      break
    is_dense |= free & (p == p[free].max())
  return {k: 1.0 if d else eps * pk for k, d, pk in zip(names, is_dense, p)}


def _random_shapes(rng, count: int) -> dict:
  shapes = {}
  for i in range(count):
    rank = int(rng.integers(1, 4))
    shapes[f"t{i}"] = tuple(int(d) for d in rng.integers(2, 64, rank))
  return shapes


def _kept(shapes, densities) -> float:
  return sum(densities[k] * np.prod(s) for k, s in shapes.items())


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_erk_matches_reference_and_budget(rng_seed, power):
  rng = np.random.default_rng(rng_seed)
  overflowed = 0
  for _ in range(20):
    shapes = _random_shapes(rng, 6)
    sparsity = float(rng.uniform(0.05, 0.98))
    got = erk_densities(shapes, sparsity, power_scale=power)
    want = np_erk(shapes, sparsity, power)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-12)
    assert all(0 <= d <= 1 for d in got.values())
    total = sum(np.prod(s) for s in shapes.values())
    target = sum(np.prod(s) - np.floor(sparsity * np.prod(s)) for s in shapes.values())
    assert _kept(shapes, got) == pytest.approx(target, rel=1e-9)
    assert abs(_kept(shapes, got) - (1 - sparsity) * total) <= len(shapes)
    free = [k for k in got if got[k] < 1]
    ratio = {k: (sum(shapes[k]) / np.prod(shapes[k])) ** power / got[k] for k in free}
    np.testing.assert_allclose(list(ratio.values()), next(iter(ratio.values()), 0),
                               rtol=1e-9)      # density ∝ raw ratio
    overflowed += len(shapes) - len(free)
  assert overflowed > 0     # the dense-overflow loop ran


def test_erk_overflow_by_hand():
  # A bias (raw 1) and a big kernel: at 50% the bias would need density > 1.
  shapes = {"kernel": (100, 100), "bias": (100,)}
  got = erk_densities(shapes, 0.5)
  assert got["bias"] == 1.0
  assert got["kernel"] == pytest.approx((10100 - 5050 - 100) / 10000)


def test_erk_dense_names_count_in_budget(rng_seed):
  rng = np.random.default_rng(rng_seed)
  shapes = _random_shapes(rng, 5)
  shapes["embedding"] = (64, 16)
  got = erk_densities(shapes, 0.7, dense=["embedding"])
  np.testing.assert_allclose(list(got.values()),
                             list(np_erk(shapes, 0.7, 1.0, {"embedding"}).values()),
                             rtol=1e-12)
  assert got["embedding"] == 1.0
  target = sum(np.prod(s) - np.floor(0.7 * np.prod(s)) for s in shapes.values())
  assert _kept(shapes, got) == pytest.approx(target)


def test_erk_edges_and_uniform():
  shapes = {"a": (8, 4), "b": (16, 16)}
  assert erk_densities(shapes, 0.0) == {"a": 1.0, "b": 1.0}
  assert erk_densities(shapes, 1.0) == {"a": 0.0, "b": 0.0}
  assert uniform_densities(shapes, 0.75) == {"a": 0.25, "b": 0.25}


@pytest.mark.parametrize("call,match", [
    (lambda: uniform_densities({"a": (4, 4)}, 1.2), "sparsity"),
    (lambda: erk_densities({"a": (4, 4)}, -0.1), "sparsity"),
    (lambda: erk_densities({"a": (4, 4)}, 0.5, power_scale=-1), "power_scale"),
    (lambda: erk_densities({"a": (4, 4)}, 0.5, dense=["b"]), "dense"),
    (lambda: erk_densities({"a": (4, 4), "e": (64, 64)}, 0.9, dense=["e"]), "dense"),
    (lambda: erk_densities({"a": (4, 0)}, 0.5), "shapes"),
    (lambda: erk_densities({}, 0.5), "shapes"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
