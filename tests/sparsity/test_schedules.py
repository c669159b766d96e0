"""Polynomial (Zhu & Gupta) sparsity and RigL's cosine drop fraction: values at the
schedule's ends and middle, update-step quantization, traced steps, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sparsity import cosine_drop_fraction, polynomial_sparsity


def test_polynomial_values(rng_seed):
  rng = np.random.default_rng(rng_seed)
  begin, end = int(rng.integers(0, 50)), int(rng.integers(100, 300))
  final, initial = float(rng.uniform(0.5, 0.95)), float(rng.uniform(0, 0.3))
  f = lambda t, **kw: polynomial_sparsity(t, final=final, begin=begin, end=end,
                                          initial=initial, **kw)
  assert f(0) == pytest.approx(initial) and f(begin) == pytest.approx(initial)
  assert f(end) == pytest.approx(final) and f(end + 1000) == pytest.approx(final)
  for t in (begin + (end - begin) // 2, int(rng.integers(begin, end))):
    p = (t - begin) / (end - begin)
    assert f(t) == pytest.approx(final + (initial - final) * (1 - p) ** 3, rel=1e-6)
    assert f(t, power=1) == pytest.approx(final + (initial - final) * (1 - p), rel=1e-6)
  assert isinstance(f(begin + 1), float)
  # Δt: the value changes only at begin + k·every.
  t = begin + 25
  assert f(t, every=10) == pytest.approx(f(begin + 20), rel=1e-6)
  steps = jnp.arange(0, end + 20)
  traced = jax.jit(jax.vmap(lambda s: f(s, every=7)))(steps)
  np.testing.assert_allclose(traced, [f(int(s), every=7) for s in steps], rtol=1e-6)


def test_cosine_drop_fraction():
  assert cosine_drop_fraction(0, end=100) == pytest.approx(0.3)
  assert cosine_drop_fraction(50, end=100) == pytest.approx(0.15)
  assert cosine_drop_fraction(25, end=100, initial=0.5) == pytest.approx(
      0.25 * (1 + math.cos(math.pi / 4)))
  assert cosine_drop_fraction(100, end=100) == 0.0
  assert float(jax.jit(lambda s: cosine_drop_fraction(s, end=100))(75)) == pytest.approx(
      0.15 * (1 + math.cos(0.75 * math.pi)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(final=1.5, begin=0, end=10), "final"),
    (dict(final=0.5, initial=-0.1, begin=0, end=10), "initial"),
    (dict(final=0.5, begin=10, end=10), "begin"),
    (dict(final=0.5, begin=0, end=10, every=0), "every"),
    (dict(final=0.5, begin=0, end=10, power=0), "power"),
])
def test_polynomial_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    polynomial_sparsity(3, **kwargs)
  with pytest.raises(ValueError, match="end"):
    cosine_drop_fraction(3, end=0)
