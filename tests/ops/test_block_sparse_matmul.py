"""Tests of sparsejax.ops.block_sparse_matmul: the format helpers, the XLA path and the
kernels (interpret mode) against a dense NumPy float64 reference, forward and backward
(jax.grad vs the dense masked matmul's grad), traced indices, the invalid-index rule,
bad input, impl="auto" fallback, and the kernel inside jax.shard_map on 8 devices."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from sparsejax import sharding
from sparsejax.ops import dispatch
from sparsejax.ops.block_sparse_matmul import (block_sparse_matmul, block_tables,
                                               from_block_sparse, to_block_sparse)


def random_weight(rng, k, n, block, density=0.5, empty_col=1):
  """(dense W [K, N] float32, block mask [K/bh, N/bw]) with one empty column block."""
  nbr, nbc = k // block[0], n // block[1]
  mask = rng.random((nbr, nbc)) < density
  mask[:, empty_col] = False
  mask[0, 0] = True
  return rng.standard_normal((k, n)).astype(np.float32), mask


def masked(w, mask, block):
  return w * np.kron(mask, np.ones(block))


def dense_grads(x, w, g):
  """float64 (y, dx, dW) of y = x · W with the output cotangent g."""
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return x @ w, (g2 @ w.T).reshape(x.shape), x2.T @ g2


def test_to_and_from_block_sparse_roundtrip(rng_seed):
  rng = np.random.default_rng(rng_seed)
  w, mask = random_weight(rng, 12, 20, (3, 4))
  w_blocks, index = to_block_sparse(w, mask, (3, 4))
  assert w_blocks.shape == (mask.sum(), 3, 4) and index.dtype == np.int32
  assert [tuple(i) for i in index] == sorted(map(tuple, index), key=lambda rc: rc[::-1])
  np.testing.assert_array_equal(from_block_sparse(w_blocks, index, w.shape),
                                masked(w, mask, (3, 4)))
  # An element mask keeps a block when any element is kept, and zeroes the rest.
  elem = rng.random(w.shape) < 0.05
  wb, idx = to_block_sparse(w, elem, (3, 4))
  np.testing.assert_array_equal(from_block_sparse(wb, idx, w.shape), w * elem)
  assert len(idx) == elem.reshape(4, 3, 5, 4).any(axis=(1, 3)).sum()


def test_tables_of_a_traced_index_equal_the_concrete_ones(rng_seed):
  rng = np.random.default_rng(rng_seed)
  _, mask = random_weight(rng, 32, 48, (8, 8))
  _, index = to_block_sparse(np.zeros((32, 48)), mask, (8, 8))
  index = rng.permutation(index)
  extra = np.concatenate([index[:1], [[-1, 2], [4, 0], [0, 6]]]).astype(np.int32)
  want = block_tables(np.concatenate([index, extra]), (32, 48), (8, 8))
  assert isinstance(want["col_rows"], np.ndarray)         # concrete: NumPy constants
  mc, mr = want["col_rows"].shape[1], want["row_cols"].shape[1]
  got = jax.jit(lambda i: block_tables(i, (32, 48), (8, 8), max_blocks_per_col=mc,
                                       max_blocks_per_row=mr))(
      np.concatenate([index, extra]))
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  dup = np.zeros_like(mask, int)
  dup[index[0, 0], index[0, 1]] = 1                       # the duplicated block
  assert mc == (mask + dup).sum(0).max() and mr == (mask + dup).sum(1).max()
  np.testing.assert_array_equal(want["block_valid"], [1] * (len(index) + 1) + [0] * 3)
  full = np.concatenate([index, extra])
  for j in range(6):                     # column j's table lists its blocks by row
    n = int(want["col_counts"][j])
    np.testing.assert_array_equal(want["col_rows"][j, :n],
                                  np.repeat(np.arange(4), (mask + dup)[:, j]))
    np.testing.assert_array_equal(full[want["col_slots"][j, :n], 1], j)


CASES = {  # impl, kernel platform, K, N, block
    "xla": ("xla", None, 48, 80, (16, 16)),
    "interpret_tpu": ("interpret", "tpu", 256, 384, (128, 128)),
    "interpret_gpu": ("interpret", "gpu", 64, 96, (32, 16)),
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense_masked_matmul_forward_and_grad(rng_seed, case, dtype):
  impl, platform, k, n, block = CASES[case]
  rng = np.random.default_rng(rng_seed)
  w, mask = random_weight(rng, k, n, block)
  w_blocks, index = to_block_sparse(jnp.asarray(w, dtype), mask, block)
  x = jnp.asarray(rng.standard_normal((2, 3, k)), dtype)
  g = jnp.asarray(rng.standard_normal((2, 3, n)), dtype)

  def loss(x, w_blocks):
    y = block_sparse_matmul(x, w_blocks, index, out_features=n, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y

  if platform is None:
    (_, y), (dx, dwb) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w_blocks)
  else:
    with dispatch.target_platform(platform):
      (_, y), (dx, dwb) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w_blocks)
  w64 = masked(np.asarray(jnp.asarray(w, dtype), np.float64), mask, block)
  f64 = lambda a: np.asarray(a, np.float64)
  y_ref, dx_ref, dw_ref = dense_grads(f64(x), w64, f64(g))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  rel = lambda a, b: np.max(np.abs(f64(a) - b)) / np.max(np.abs(b))
  assert y.dtype == dtype and y.shape == (2, 3, n) and dwb.shape == w_blocks.shape
  assert rel(y, y_ref) < tol and rel(dx, dx_ref) < tol
  dw_blocks_ref, _ = to_block_sparse(dw_ref, mask, block)       # dW on the stored blocks
  assert rel(dwb, np.asarray(dw_blocks_ref)) < tol
  np.testing.assert_array_equal(f64(y)[..., block[1]:2 * block[1]], 0)   # empty column


def test_traced_index_under_jit_with_and_without_bounds(rng_seed):
  rng = np.random.default_rng(rng_seed)
  w, mask = random_weight(rng, 32, 64, (8, 16))
  w_blocks, index = to_block_sparse(w, mask, (8, 16))
  x = rng.standard_normal((5, 32)).astype(np.float32)
  want = x.astype(np.float64) @ masked(w, mask, (8, 16))
  run = jax.jit(lambda x, wb, i, **kw: block_sparse_matmul(x, wb, i, out_features=64,
                                                           impl="xla", **kw),
                static_argnames=("max_blocks_per_col", "max_blocks_per_row"))
  for kw in ({}, dict(max_blocks_per_col=int(mask.sum(0).max()),
                      max_blocks_per_row=int(mask.sum(1).max()))):
    np.testing.assert_allclose(run(x, w_blocks, index, **kw), want, rtol=1e-5, atol=1e-5)


def test_invalid_blocks_contribute_zero_and_get_zero_grad(rng_seed):
  rng = np.random.default_rng(rng_seed)
  w, mask = random_weight(rng, 32, 32, (16, 16))
  w_blocks, index = to_block_sparse(w, mask, (16, 16))
  bad = np.array([[-1, 0], [2, 0], [0, 2], [0, -5]], np.int32)   # grid is 2 x 2
  all_index = np.concatenate([index, bad])
  all_blocks = jnp.concatenate([w_blocks, jnp.asarray(rng.standard_normal((4, 16, 16)),
                                                      jnp.float32)])
  x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
  f = lambda wb, i: jnp.sum(block_sparse_matmul(x, wb, i, out_features=32, impl="xla")
                            ** 2)
  np.testing.assert_array_equal(f(all_blocks, all_index), f(w_blocks, index))
  grad = jax.grad(f)(all_blocks, all_index)
  np.testing.assert_array_equal(grad[len(index):], 0)
  np.testing.assert_array_equal(grad[:len(index)], jax.grad(f)(w_blocks, index))
  checked = checkify.checkify(lambda wb, i: block_sparse_matmul(
      x, wb, i, out_features=32, check_indices=True, impl="xla"))
  err, _ = checked(all_blocks, all_index)
  with pytest.raises(checkify.JaxRuntimeError, match=r"block_index must be in \[0, 2\) "
                     r"x \[0, 2\) .*got rows in \[-1, 2\], columns in \[-5, 2\]"):
    err.throw()
  err, _ = checked(w_blocks, index)
  err.throw()                                        # valid indices: no error


def test_check_indices_reports_a_too_small_bound():
  index = np.array([[0, 0], [1, 0], [0, 1]], np.int32)
  f = checkify.checkify(jax.jit(lambda wb, i: block_sparse_matmul(
      jnp.ones((2, 8)), wb, i, out_features=8, max_blocks_per_col=1, check_indices=True,
      impl="xla")))
  err, _ = f(jnp.ones((3, 4, 4)), index)
  with pytest.raises(checkify.JaxRuntimeError, match="holds 2 stored blocks, over "
                     "max_blocks_per_col=1"):
    err.throw()


def test_empty_inputs_give_zeros():
  wb, idx = jnp.ones((2, 4, 4)), np.array([[0, 0], [1, 1]], np.int32)
  y = block_sparse_matmul(jnp.ones((0, 8)), wb, idx, out_features=8)
  assert y.shape == (0, 8)
  y, dx = jax.value_and_grad(lambda x: jnp.sum(block_sparse_matmul(
      x, jnp.ones((0, 4, 4)), np.zeros((0, 2), np.int32), out_features=8)))(
          jnp.ones((3, 8)))
  assert float(y) == 0.0 and dx.shape == (3, 8) and not np.any(np.asarray(dx))


def test_bad_input_errors():
  x, wb, idx = jnp.ones((2, 8)), jnp.ones((2, 4, 4)), np.array([[0, 0], [1, 1]])
  with pytest.raises(ValueError, match=r"block bw=4 must be >= 1 and divide the weight "
                     r"dim 10"):
    block_sparse_matmul(x, wb, idx, out_features=10)
  with pytest.raises(ValueError, match="block bh=3 must be >= 1 and divide"):
    block_sparse_matmul(x, jnp.ones((2, 3, 4)), idx, out_features=8)
  with pytest.raises(TypeError, match=r"w_blocks dtype bfloat16 must equal x's dtype "
                     "float32"):
    block_sparse_matmul(x, wb.astype(jnp.bfloat16), idx, out_features=8)
  with pytest.raises(TypeError, match="x must be floating point"):
    block_sparse_matmul(x.astype(jnp.int32), wb, idx, out_features=8)
  with pytest.raises(ValueError, match=r"block_index has shape \(2, 3\); expected \(2, 2\)"):
    block_sparse_matmul(x, wb, np.zeros((2, 3), np.int32), out_features=8)
  with pytest.raises(TypeError, match="block_index must be integers"):
    block_sparse_matmul(x, wb, np.zeros((2, 2)), out_features=8)
  with pytest.raises(ValueError, match="max_blocks_per_col=1 is below the 2 stored"):
    block_sparse_matmul(x, wb, np.array([[0, 0], [1, 0]]), out_features=8,
                        max_blocks_per_col=1)
  with pytest.raises(ValueError, match="impl='bogus'"):
    block_sparse_matmul(x, wb, idx, out_features=8, impl="bogus")
  with pytest.raises(ValueError, match=r"mask has shape \(3, 3\)"):
    to_block_sparse(np.ones((8, 8)), np.ones((3, 3), bool), (4, 4))


def test_auto_falls_back_to_xla_with_one_warning_when_the_kernel_cannot_run():
  x, wb, idx = jnp.ones((2, 64)), jnp.ones((1, 32, 32)), np.array([[0, 1]])
  dispatch._warned.difference_update(
      {w for w in dispatch._warned if w[0] == "block_sparse_matmul"})
  with dispatch.target_platform("tpu"), warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    y = block_sparse_matmul(x, wb, idx, out_features=64, impl="auto")
    block_sparse_matmul(x, wb, idx, out_features=64, impl="auto")
  msgs = [str(w.message) for w in seen if "block_sparse_matmul" in str(w.message)]
  assert len(msgs) == 1 and "multiple of 128" in msgs[0]
  np.testing.assert_array_equal(y[:, 32:], 32.0)
  with dispatch.target_platform("tpu"), pytest.raises(ValueError, match="impl='pallas' "
                                                      "cannot run these inputs"):
    block_sparse_matmul(x, wb, idx, out_features=64, impl="pallas")


def test_kernel_runs_per_shard_inside_shard_map(rng_seed):
  """On the 8-device data × fsdp × tensor mesh, impl="interpret" (the TPU kernel) runs
  inside jax.shard_map (tokens split over data × fsdp, the weight replicated) and
  equals the XLA path, forward and gradients."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
  rng = np.random.default_rng(rng_seed)
  w, mask = random_weight(rng, 256, 256, (128, 128), empty_col=0)
  w_blocks, index = to_block_sparse(w, mask, (128, 128))
  x = jnp.asarray(rng.standard_normal((8, 2, 256)), jnp.float32)

  def loss(impl):
    return jax.jit(jax.value_and_grad(lambda x, wb: jnp.sum(block_sparse_matmul(
        x, wb, index, out_features=256, impl=impl) ** 2), (0, 1)))

  with jax.set_mesh(mesh):
    (l_k, g_k), (l_x, g_x) = loss("interpret")(x, w_blocks), loss("xla")(x, w_blocks)
    text = loss("interpret").lower(x, w_blocks).as_text()
  assert "sdy.manual_computation" in text
  np.testing.assert_allclose(l_k, l_x, rtol=1e-5)
  for a, b in zip(g_k, g_x):      # error relative to the largest entry (sums of 256)
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
