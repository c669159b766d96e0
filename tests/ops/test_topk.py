"""Tests of sparsejax.ops.topk: the XLA op against an independent NumPy reference."""

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.ops import dispatch
from sparsejax.ops.topk import nm_mask, nm_sparsify, topk_mask, topk_sparsify


@pytest.fixture
def key(request):
  """A fresh PRNG key for every test and parametrization."""
  return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


def jcall(fn, x, *args, **kwargs):
  """fn(x, *args, **kwargs) under jit (one compile instead of op-by-op dispatch)."""
  return jax.jit(lambda x: fn(x, *args, **kwargs))(x)


def np_keys(x):
  """Ordering keys: the bits of |x| as f32 (IEEE total order; NaN above inf)."""
  bits = np.asarray(x).astype(np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
  return bits.astype(np.int64)


def np_topk_mask(x, k, axis=-1):
  """NumPy reference: stable descending sort of the keys (lowest index wins ties)."""
  xm = np.moveaxis(np.asarray(x), axis, -1)
  order = np.argsort(-np_keys(xm), axis=-1, kind="stable")[..., :k]
  mask = np.zeros(xm.shape, bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return np.moveaxis(mask, -1, axis)


def np_nm_mask(x, n, m, axis=-1):
  xm = np.moveaxis(np.asarray(x), axis, -1)
  g = xm.reshape(*xm.shape[:-1], xm.shape[-1] // m, m)
  return np.moveaxis(np_topk_mask(g, n).reshape(xm.shape), -1, axis)


def assert_bits_equal(a, b):
  """Exact equality that tells -0.0 from +0.0 (NaN equals NaN, any payload)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  nan = np.isnan(a.astype(np.float32))
  np.testing.assert_array_equal(nan, np.isnan(b.astype(np.float32)))
  u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
  np.testing.assert_array_equal(a.view(u)[~nan], b.view(u)[~nan])


def ref_sparsify(x, mask):
  x = np.asarray(x)
  return np.where(mask, x, np.zeros_like(x))


def tie_values(key, shape, dtype):
  """Values from a tiny set (heavy ties, incl. ±0 and opposite signs)."""
  vals = jnp.array([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0], dtype)
  return vals[jax.random.randint(key, shape, 0, vals.shape[0])]


@pytest.mark.parametrize("shape,k,axis,dtype,jit", [
    ((4, 33), 5, -1, jnp.float32, False),
    ((4, 33), 5, -1, jnp.float32, True),
    ((2, 3, 16), 2, 1, jnp.float32, True),
    ((6, 64), 64, -1, jnp.bfloat16, True),
    ((9, 5, 4), 1, 0, jnp.float32, True),
    ((3, 40), 13, -1, jnp.float16, True),
])
def test_matches_numpy(key, shape, k, axis, dtype, jit):
  x = jax.random.normal(key, shape, jnp.float32).astype(dtype)
  f = lambda x: topk_sparsify(x, k, axis=axis, impl="xla")
  y = (jax.jit(f) if jit else f)(x)
  chex.assert_shape(y, shape)
  assert y.dtype == dtype
  mask = np_topk_mask(x, k, axis)
  assert_bits_equal(y, ref_sparsify(x, mask))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda x: topk_mask(x, k, axis=axis))(x)), mask)
  np.testing.assert_array_equal(np.sum(np.asarray(y) != 0, axis=axis), k)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("k", [1, 23, 48])
def test_heavy_ties(key, dtype, k):
  x = tie_values(key, (8, 48), dtype)
  mask = np.asarray(jcall(topk_mask, x, k))
  np.testing.assert_array_equal(mask, np_topk_mask(x, k))
  np.testing.assert_array_equal(mask.sum(-1), k)            # exactly k, even with ties
  assert_bits_equal(jcall(topk_sparsify, x, k, impl="xla"), ref_sparsify(x, mask))


def test_nan_ranks_above_inf(key):
  row = jnp.array([1.0, jnp.nan, -jnp.inf, 3.0, -jnp.nan, 0.0, jnp.inf, -5.0])
  x = jnp.stack([row, jax.random.permutation(key, row)])
  for k, expect in [(1, [1]), (3, [1, 2, 4]), (5, [1, 2, 4, 6, 7])]:
    mask = np.asarray(jcall(topk_mask, x, k))
    assert sorted(np.flatnonzero(mask[0])) == expect, k
    np.testing.assert_array_equal(mask, np_topk_mask(x, k))
    y = np.asarray(jcall(topk_sparsify, x, k, impl="xla"))
    assert not np.isnan(y[~mask]).any()                   # unselected NaN → +0.0
    assert np.isnan(y[mask]).sum() == min(k, 2) * 2


def test_negative_zero():
  x = jnp.array([[-0.0, 0.0, -0.0, 1.0, -0.0], [0.0, -0.0, 0.0, 0.0, -2.0]])
  y = np.asarray(jcall(topk_sparsify, x, 3, impl="xla"))
  mask = np.asarray(jcall(topk_mask, x, 3))
  np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 0], [1, 1, 0, 0, 1]])
  assert np.signbit(y[0, 0]) and np.signbit(y[1, 1])      # kept -0.0 stays -0.0
  assert not np.signbit(y[~mask]).any()                    # unselected are +0.0


def test_unselected_are_positive_zero(key):
  x = -jnp.abs(jax.random.normal(key, (4, 20))) - 1.0
  y = np.asarray(jcall(topk_sparsify, x, 3, impl="xla"))
  assert not np.signbit(y[y == 0]).any()


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("axis", [-1, 0])
def test_ste_gradient_is_identity(key, rescale, axis):
  kx, kg = jax.random.split(key)
  x = jax.random.normal(kx, (6, 10))
  g = jax.random.normal(kg, (6, 10))
  vjp = jax.jit(lambda x, g: jax.vjp(
      lambda x: topk_sparsify(x, 3, axis=axis, rescale=rescale, impl="xla"), x)[1](g))
  (dx,) = vjp(x, g)
  assert_bits_equal(dx, g)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(topk_sparsify(x, 2, axis=axis, rescale=rescale,
                                                  impl="xla") * g)))(x)
  assert_bits_equal(grad, g)
  assert_bits_equal(jax.jit(jax.grad(lambda x: jnp.sum(nm_sparsify(x, 1, 2) * g)))(x), g)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rescale(key, dtype):
  x = jax.random.normal(key, (5, 32)).astype(dtype)
  x = x.at[3].set(0.0)                                     # zero row: no NaN
  x = x.at[4].multiply(jnp.asarray(1e30, dtype))           # no overflow in the norms
  y = jcall(topk_sparsify, x, 8, rescale=True, impl="xla")
  assert y.dtype == dtype
  y32, x32 = np.asarray(y, np.float64), np.asarray(x, np.float64)
  mask = np_topk_mask(x, 8)
  assert np.all(y32[~mask] == 0) and np.all(y32[3] == 0)
  rows = [0, 1, 2, 4]
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.linalg.norm(y32[rows] / 1e30, axis=-1),
                             np.linalg.norm(x32[rows] / 1e30, axis=-1), rtol=tol)
  scale = np.linalg.norm(x32[rows], axis=-1) / np.linalg.norm(
      np.where(mask, x32, 0)[rows], axis=-1)
  np.testing.assert_allclose(y32[rows], np.where(mask, x32, 0)[rows] * scale[:, None],
                             rtol=tol)
  nan_row = jnp.asarray(x[:1]).at[0, 0].set(jnp.nan)
  assert np.isnan(np.asarray(jcall(topk_sparsify, nan_row, 4, rescale=True))).all()


@pytest.mark.slow
@pytest.mark.parametrize("n,m,axis,dtype", [
    (2, 4, -1, jnp.float32), (4, 8, -1, jnp.bfloat16), (2, 4, 0, jnp.float32),
    (1, 2, -1, jnp.float32), (4, 4, -1, jnp.float32)])
def test_nm_sparsify(key, n, m, axis, dtype):
  k1, k2 = jax.random.split(key)
  shape = (8, 16)
  x = jax.random.normal(k1, shape).astype(dtype)
  mask = np_nm_mask(x, n, m, axis)
  y = jax.jit(lambda x: nm_sparsify(x, n, m, axis=axis))(x)
  assert_bits_equal(y, ref_sparsify(x, mask))
  np.testing.assert_array_equal(np.asarray(nm_mask(x, n, m, axis=axis)), mask)
  groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
  np.testing.assert_array_equal(groups.sum(-1), n)
  xt = tie_values(k2, shape, dtype)                        # ties within a group
  assert_bits_equal(jcall(nm_sparsify, xt, n, m, axis=axis),
                    ref_sparsify(xt, np_nm_mask(xt, n, m, axis)))


def test_errors():
  x = jnp.ones((2, 512))
  with pytest.raises(ValueError, match=r"k=0 must be in \[1, 512\] for axis of size 512"):
    topk_sparsify(x, 0)
  with pytest.raises(ValueError, match=r"k=513 must be in \[1, 512\]"):
    topk_sparsify(x, 513)
  with pytest.raises(ValueError, match=r"k=3 must be in \[1, 2\] for axis of size 2"):
    topk_sparsify(x, 3, axis=0)
  with pytest.raises(ValueError, match="static Python int"):
    topk_sparsify(x, 2.5)
  with pytest.raises(ValueError, match="static Python int"):
    jax.jit(lambda x, k: topk_sparsify(x, k))(x, 3)
  with pytest.raises(TypeError, match="topk_sparsify: x must be a floating-point array, "
                     "got dtype int32"):
    topk_sparsify(jnp.ones((2, 8), jnp.int32), 2)
  with pytest.raises(TypeError, match="nm_sparsify: x must be a floating-point array"):
    nm_sparsify(jnp.ones((2, 8), jnp.int32), 2, 4)
  with pytest.raises(TypeError, match="topk_mask: x must be a floating-point array"):
    topk_mask(jnp.ones((2, 8), jnp.uint8), 2)
  with pytest.raises(ValueError, match=r"k=1 must be in \[0, 0\] for axis of size 0"):
    topk_sparsify(jnp.ones((2, 0)), 1)
  with pytest.raises(ValueError, match="m=3 must be a positive divisor of the axis size 8"):
    nm_sparsify(jnp.ones((2, 8)), 2, 3)
  with pytest.raises(ValueError, match=r"n=0 must be in \[1, 4\]"):
    nm_sparsify(jnp.ones((2, 8)), 0, 4)
  with pytest.raises(ValueError, match=r"n=5 must be in \[1, 4\]"):
    nm_sparsify(jnp.ones((2, 8)), 5, 4)
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    topk_sparsify(x, 1, axis=2)
  with pytest.raises(ValueError, match="impl='bogus'"):
    topk_sparsify(x, 1, impl="bogus")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
      topk_sparsify(x, 1, impl="pallas")


def test_numpy_int_k_and_auto_impl(key):
  x = jax.random.normal(key, (3, 12))
  y = jcall(topk_sparsify, x, np.int64(4))
  if jax.default_backend() == "cpu":                       # auto → xla on CPU
    assert_bits_equal(y, ref_sparsify(x, np_topk_mask(x, 4)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,axis,k,rescale", [(jnp.float32, -1, 6, False),
                                                  (jnp.bfloat16, 1, 2, True)])
def test_interpret_impl_matches_xla(key, dtype, axis, k, rescale):
  """impl="interpret" dispatches to the Pallas kernel (one small grid step)."""
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (2, 3, 20)).astype(dtype)
  x = jnp.where(jax.random.bernoulli(k2, 0.3, x.shape), jnp.round(x), x)  # ties
  x = x.at[0, 0, 3].set(jnp.nan).at[1, 2, 0].set(-0.0)
  g = jax.random.normal(k2, x.shape).astype(dtype)
  f = lambda impl: lambda x: topk_sparsify(x, k, axis=axis, rescale=rescale, impl=impl)
  y_ref = jax.jit(f("xla"))(x)
  y, dx = jax.jit(lambda x, g: (lambda yv: (yv[0], yv[1](g)[0]))(
      jax.vjp(f("interpret"), x)))(x, g)
  assert_bits_equal(y, y_ref)
  assert_bits_equal(dx, g)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("shape,k,axis", [((0, 16), 3, -1), ((2, 0, 8), 8, -1),
                                          ((3, 0), 0, -1), ((0, 5), 2, 1)])
def test_empty_inputs_return_empty(impl, shape, k, axis):
  """No rows (or an empty axis with k = 0): an empty result, forward and backward."""
  x = jnp.zeros(shape, jnp.float32)
  y = jax.jit(lambda x: topk_sparsify(x, k, axis=axis, impl=impl))(x)
  assert y.shape == shape and y.dtype == x.dtype
  g = jax.grad(lambda x: jnp.sum(topk_sparsify(x, k, axis=axis, rescale=True,
                                               impl=impl)))(x)
  assert g.shape == shape
  if shape[-1] % 4 == 0:
    assert nm_sparsify(x, 2, 4).shape == shape


def test_auto_falls_back_to_xla_when_the_kernel_cannot_take_the_row(key):
  """Rows longer than the TPU kernel's VMEM budget: "auto" (on a TPU target) warns once
  and runs XLA; an explicit kernel impl raises naming the op and the constraint."""
  d = 75008                                # > 74880, the f32 limit of the VMEM model
  x = jax.random.normal(key, (2, d))
  with dispatch.target_platform("tpu"):
    with pytest.warns(UserWarning, match=rf"topk_sparsify: .*D={d}.*VMEM"):
      y = topk_sparsify(x, 100)
    with pytest.raises(ValueError, match=rf"topk_sparsify: impl='interpret' cannot run "
                       rf"these inputs: row length D={d}"):
      topk_sparsify(x, 100, impl="interpret")
  assert_bits_equal(y, ref_sparsify(x, np_topk_mask(x, 100)))
