"""Properties of top-k / N:M sparsification (sparsejax.ops.topk) on random inputs.

Reference: a stable NumPy ranking by (NaN first, then |x| descending, then index), so
the kept entries of a row are exactly its k largest |x| with the lowest index winning
ties; unkept entries are +0.0; the gradient is the identity (straight-through).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prop_helpers import (assert_close, assert_same, float_arrays, float_dtypes, f64,
                          int_dtypes, seeds, shapes)
from sparsejax.ops import nm_mask, nm_sparsify, topk_mask, topk_sparsify


def ref_topk_mask(x, k, axis):
  """NumPy: True at the k first entries of each row along `axis` in the order
  (NaN before numbers, larger |x| first, lower index first)."""
  xm = np.moveaxis(f64(x), axis, -1)
  nan = np.isnan(xm)
  mag = np.where(nan, np.inf, np.abs(xm))
  mask = np.zeros(xm.shape, bool)
  for row in np.ndindex(xm.shape[:-1]):
    order = np.lexsort((np.arange(xm.shape[-1]), -mag[row], ~nan[row]))
    mask[row][order[:k]] = True
  return np.moveaxis(mask, -1, axis)


def ref_nm_mask(x, n, m, axis):
  xm = np.moveaxis(np.asarray(x), axis, -1)
  groups = xm.reshape(*xm.shape[:-1], xm.shape[-1] // m, m)
  return np.moveaxis(ref_topk_mask(groups, n, -1).reshape(xm.shape), -1, axis)


def kept(x, mask):
  x = np.asarray(x)
  return np.where(mask, x, np.zeros_like(x))


@st.composite
def topk_case(draw, specials=True):
  shape = draw(shapes(1, 3, 1, 12))
  axis = draw(st.integers(-len(shape), len(shape) - 1))
  k = draw(st.integers(1, shape[axis]))
  dtype = draw(float_dtypes)
  return draw(float_arrays(shape, dtype, specials=specials)), k, axis


def cotangent(seed, x):
  return np.asarray(jnp.asarray(np.random.default_rng(seed).standard_normal(x.shape),
                                x.dtype))


@functools.partial(jax.jit, static_argnames=("k", "axis"))
def topk_all(x, g, k, axis):
  """(mask, y, y rescaled, their vjps of g): one compile per example."""
  y, vjp = jax.vjp(lambda x: topk_sparsify(x, k, axis=axis, impl="xla"), x)
  ys, vjps = jax.vjp(lambda x: topk_sparsify(x, k, axis=axis, rescale=True, impl="xla"),
                     x)
  return topk_mask(x, k, axis=axis), y, ys, vjp(g)[0], vjps(g)[0]


@pytest.mark.slow
@given(topk_case(), seeds)
def test_topk_keeps_k_largest_magnitudes(case, seed):
  """Exactly k per row, the k largest |x| (lowest index wins ties, NaN first), unkept
  entries +0.0; rescale multiplies by ‖x‖/‖y‖ per row; the gradient is the identity."""
  x, k, axis = case
  g = cotangent(seed, x)
  mask, y, ys, dx, dxs = topk_all(x, g, k, axis)
  want = ref_topk_mask(x, k, axis)
  np.testing.assert_array_equal(mask, want)
  assert (np.sum(mask, axis=axis) == k).all()
  assert_same(y, kept(x, want))
  assert_same(dx, g)
  assert_same(dxs, g)
  if np.isfinite(f64(x)).all():
    sparse = kept(f64(x), want)
    nx = np.linalg.norm(f64(x), axis=axis, keepdims=True)
    ny = np.linalg.norm(sparse, axis=axis, keepdims=True)
    ref = sparse * np.where(ny > 0, nx / np.where(ny > 0, ny, 1.0), 1.0)
    assert ys.dtype == x.dtype
    assert_close(ys, ref, scale=float(np.max(np.abs(ref), initial=1.0)))


@st.composite
def nm_case(draw):
  shape = list(draw(shapes(1, 3, 1, 4)))
  axis = draw(st.integers(-len(shape), len(shape) - 1))
  m = draw(st.integers(1, 8))
  shape[axis] = m * draw(st.integers(1, 4))
  n = draw(st.integers(1, m))
  dtype = draw(float_dtypes)
  return draw(float_arrays(tuple(shape), dtype, specials=True)), n, m, axis


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def nm_all(x, g, n, m, axis):
  y, vjp = jax.vjp(lambda x: nm_sparsify(x, n, m, axis=axis), x)
  return nm_mask(x, n, m, axis=axis), y, vjp(g)[0]


@pytest.mark.slow
@given(nm_case(), seeds)
def test_nm_keeps_n_per_group(case, seed):
  """n kept per group of m consecutive entries (the n largest |x|), identity gradient."""
  x, n, m, axis = case
  g = cotangent(seed, x)
  mask, y, dx = nm_all(x, g, n, m, axis)
  want = ref_nm_mask(x, n, m, axis)
  np.testing.assert_array_equal(mask, want)
  groups = np.moveaxis(np.asarray(mask), axis, -1)
  assert (groups.reshape(*groups.shape[:-1], -1, m).sum(-1) == n).all()
  assert_same(y, kept(x, want))
  assert_same(dx, g)


@pytest.mark.slow
@settings(max_examples=5)
@given(shapes(2, 3, 0, 5).filter(lambda s: 0 in s[:-1] and s[-1] > 0), float_dtypes,
       st.data())
def test_empty_rows(shape, dtype, data):
  """No rows (a zero-size leading axis) gives an empty result of the same shape."""
  x = jnp.zeros(shape, dtype)
  k = data.draw(st.integers(1, shape[-1]))
  for y in (topk_sparsify(x, k, impl="xla"), topk_mask(x, k), nm_sparsify(x, 1, 1),
            nm_mask(x, 1, 1)):
    assert y.shape == shape


BAD_K = st.one_of(st.integers(-3, 0), st.integers(1, 4).map(lambda i: -i),
                  st.sampled_from((1.5, True, "2", None)))


@given(shapes(1, 3, 1, 6), float_dtypes, st.data())
def test_bad_arguments_raise(shape, dtype, data):
  x = jnp.ones(shape, dtype)
  d = shape[-1]
  k = data.draw(st.one_of(BAD_K, st.integers(d + 1, d + 4)))
  for fn in (topk_sparsify, topk_mask):
    with pytest.raises(ValueError, match="k="):
      fn(x, k)
    with pytest.raises(ValueError, match="axis="):
      fn(x, 1, axis=data.draw(st.sampled_from((len(shape), -len(shape) - 1))))
  m = data.draw(st.integers(1, 2 * d + 1).filter(lambda m: d % m))
  for fn in (nm_sparsify, nm_mask):
    if m is not None:
      with pytest.raises(ValueError, match="m="):
        fn(x, 1, m)
    with pytest.raises(ValueError, match="m="):
      fn(x, 1, data.draw(st.sampled_from((0, -1, 2.0))))
    with pytest.raises(ValueError, match="n="):
      fn(x, data.draw(st.sampled_from((0, -1, d + 1, 1.0))), d)
  with pytest.raises(ValueError, match="at least one axis"):
    topk_sparsify(jnp.ones((), dtype), 1)


@given(shapes(1, 2, 1, 4), int_dtypes)
def test_integer_input_is_refused(shape, dtype):
  x = jnp.ones(shape, dtype)
  for call in (lambda: topk_sparsify(x, 1), lambda: topk_mask(x, 1),
               lambda: nm_sparsify(x, 1, 1), lambda: nm_mask(x, 1, 1)):
    with pytest.raises((ValueError, TypeError), match=f"floating-point.*{x.dtype}"):
      call()


@settings(max_examples=2)
@given(st.integers(1, 2), st.sampled_from((8, 16)), float_dtypes, st.data())
def test_interpret_kernel_matches_xla(rows, d, dtype, data):
  """The Pallas kernel (interpret mode) keeps bit-for-bit the entries XLA keeps."""
  x = data.draw(float_arrays((rows, d), dtype, specials=True))
  k = data.draw(st.integers(1, d))
  assert_same(topk_sparsify(x, k, impl="interpret"), topk_sparsify(x, k, impl="xla"))
