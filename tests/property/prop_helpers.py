"""Shared hypothesis strategies and assertions of the property tests (tests/property).

Arrays are drawn as (shape, dtype, seed, value kind) and made with NumPy's generator:
cheap for hundreds of examples, and the value kinds cover what matters for the ops
(many exact ties, values spread over 12 decades, special values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)
INT_DTYPES = (jnp.int8, jnp.int32, jnp.uint8)
SPECIALS = (np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0)

float_dtypes = st.sampled_from(FLOAT_DTYPES)
int_dtypes = st.sampled_from(INT_DTYPES)
seeds = st.integers(0, 2**32 - 1)


def shapes(min_dims=1, max_dims=3, min_side=1, max_side=8):
  return st.lists(st.integers(min_side, max_side), min_size=min_dims,
                  max_size=max_dims).map(tuple)


def make_values(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
  """float64 values of `shape`: "normal", "ties" (few distinct values, both signs) or
  "wide" (magnitudes over 1e-6 .. 1e6)."""
  if kind == "ties":
    return rng.integers(-3, 4, size=shape) * 0.5
  x = rng.standard_normal(shape)
  if kind == "wide":
    x = x * 10.0 ** rng.uniform(-6, 6, size=shape)
  return x


@st.composite
def float_arrays(draw, shape, dtype, kinds=("normal", "ties", "wide"), specials=False):
  """A NumPy array of `shape` holding values exactly representable in `dtype` (bf16 as
  ml_dtypes.bfloat16), optionally with NaN / ±inf / ±0 at random positions."""
  rng = np.random.default_rng(draw(seeds))
  x = make_values(rng, shape, draw(st.sampled_from(kinds)))
  if specials and x.size and draw(st.booleans()):
    where = rng.random(shape) < draw(st.sampled_from((0.1, 0.3)))
    x = np.where(where, rng.choice(np.array(SPECIALS), size=shape), x)
  return np.asarray(jnp.asarray(x, dtype))


def rng_for(draw) -> np.random.Generator:
  return np.random.default_rng(draw(seeds))


def f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def tol(dtype) -> dict:
  """assert_allclose tolerances for an op computing in f32 and returning `dtype`."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    return dict(rtol=2e-2, atol=2e-2)
  return dict(rtol=2e-5, atol=2e-6)


def assert_close(actual, expected, scale=1.0, dtype=None):
  """actual ≈ expected (float64) within the tolerance of `dtype` (default: actual's,
  the precision the op computed in); the absolute part is relative to `scale` (the
  size of the summed terms)."""
  t = tol(np.asarray(actual).dtype if dtype is None else dtype)
  np.testing.assert_allclose(f64(actual), expected, rtol=t["rtol"], atol=t["atol"] * scale)


def assert_same(a, b):
  """Bitwise equal arrays (NaN == NaN; -0.0 != +0.0), same dtype and shape."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
  if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
    np.testing.assert_array_equal(a, b)
    return
  u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
  nan = np.isnan(a.astype(np.float32))
  np.testing.assert_array_equal(nan, np.isnan(b.astype(np.float32)))
  np.testing.assert_array_equal(a.view(u)[~nan], b.view(u)[~nan])


def assert_equal(a, b):
  """Exactly equal values (NaN == NaN, -0.0 == +0.0), same dtype and shape."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
  np.testing.assert_array_equal(a, b)
