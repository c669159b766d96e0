"""Tests of pallas_kernels.block_sparse_matmul: interpret mode vs a dense NumPy float64
reference and the XLA op, forward and backward, and lowering for TPU and CUDA.

The TPU (Mosaic) kernels run with `pltpu.InterpretParams()` (blocks of 128, the lane
tile), the GPU (Triton) kernels with `interpret=True` (blocks of 16 and 32). Patterns
are random and include an empty output column block, a block stored twice and an
invalid (out-of-grid) block.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_matmul import (VMEM_BUDGET, BlockSparseTables,
                                                block_sparse_matmul_kernel,
                                                default_block_m, kernel_unmet,
                                                table_chunk)
from sparsejax.ops.block_sparse_matmul import TABLE_FIELDS, block_tables

# backend -> (K, N, block): TPU blocks are lane-tile multiples, GPU blocks powers of 2.
SHAPES = {"tpu": (256, 384, (128, 128)), "gpu": (64, 96, (16, 32))}


def interpret_for(backend):
  return pltpu.InterpretParams() if backend == "tpu" else True


def random_pattern(rng, k, n, block, *, extra=True):
  """block_index [nnz, 2]: ~half the blocks, column block 1 empty, plus (extra) one
  duplicate of the first block and one invalid block (row -1)."""
  nbr, nbc = k // block[0], n // block[1]
  keep = rng.random((nbr, nbc)) < 0.5
  keep[:, 1] = False
  keep[0, 0] = True
  cols, rows = np.nonzero(keep.T)
  index = np.stack([rows, cols], 1)
  if extra:
    index = np.concatenate([index, index[:1], [[-1, 0]]])
  return rng.permutation(index).astype(np.int32)


def dense_weight(w_blocks, index, k, n):
  """float64 dense W: valid blocks added at their positions."""
  bh, bw = w_blocks.shape[1:]
  w = np.zeros((k, n))
  for b, (r, c) in zip(np.asarray(w_blocks, np.float64), index):
    if 0 <= r < k // bh and 0 <= c < n // bw:
      w[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] += b
  return w


def make_case(rng_seed, backend, dtype, m=5):
  rng = np.random.default_rng(rng_seed)
  k, n, block = SHAPES[backend]
  index = random_pattern(rng, k, n, block)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w_blocks = rng.standard_normal((len(index), *block)).astype(np.float32)
  dy = rng.standard_normal((m, n)).astype(np.float32)
  cast = lambda a: jnp.asarray(a, dtype)
  return cast(x), cast(w_blocks), index, dy, (k, n, block)


def tables_of(index, k, n, block):
  t = block_tables(index, (k, n), block)
  return BlockSparseTables(*(t[f] for f in TABLE_FIELDS))


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_forward_and_backward_match_dense_float64(rng_seed, backend, dtype):
  x, w_blocks, index, dy, (k, n, block) = make_case(rng_seed, backend, dtype)
  tables = tables_of(index, k, n, block)
  run = functools.partial(block_sparse_matmul_kernel, tables=tables, backend=backend,
                          interpret=interpret_for(backend))
  y, vjp = jax.vjp(run, x, w_blocks)
  dx, dw = vjp(jnp.asarray(dy, dtype))
  # The reference sees the same (rounded) inputs, in float64.
  x64, wb64 = np.asarray(x, np.float64), np.asarray(w_blocks, np.float64)
  dy64 = np.asarray(jnp.asarray(dy, dtype), np.float64)
  w64 = dense_weight(wb64, index, k, n)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert y.dtype == dtype and y.shape == (x.shape[0], n)
  assert rel_err(y, x64 @ w64) < tol
  assert rel_err(dx, dy64 @ w64.T) < tol
  bh, bw = block
  for b, (r, c) in enumerate(index):
    if r < 0:
      np.testing.assert_array_equal(np.asarray(dw[b], np.float32), 0)   # invalid block
    else:
      want = x64[:, r * bh:(r + 1) * bh].T @ dy64[:, c * bw:(c + 1) * bw]
      assert rel_err(dw[b], want) < tol, b
  np.testing.assert_array_equal(np.asarray(y[:, bw:2 * bw], np.float32), 0)  # empty col


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_token_padding_and_tiles(rng_seed, backend):
  """M not a multiple of the token tile (padded), and several token tiles."""
  x, w_blocks, index, dy, (k, n, block) = make_case(rng_seed, backend, jnp.float32, m=37)
  tables = tables_of(index, k, n, block)
  want = np.asarray(x, np.float64) @ dense_weight(w_blocks, index, k, n)
  y = block_sparse_matmul_kernel(x, w_blocks, tables, backend=backend, block_m=16,
                                 interpret=interpret_for(backend))
  assert y.shape == (37, n) and rel_err(y, want) < 1e-5


@pytest.mark.slow
def test_tpu_tables_split_into_calls_within_the_smem_budget(rng_seed):
  """A tiny table budget: one column (row) block and two stored blocks per call; the
  result and gradients equal the one-call run exactly."""
  x, w_blocks, index, dy, (k, n, block) = make_case(rng_seed, "tpu", jnp.float32)
  tables = tables_of(index, k, n, block)
  mc = tables.col_rows.shape[1]
  assert table_chunk(3, mc, 4 * (2 * mc + 1)) == 1

  def grads(budget):
    f = lambda x, w: block_sparse_matmul_kernel(
        x, w, tables, backend="tpu", interpret=True, smem_table_bytes=budget)
    y, vjp = jax.vjp(f, x, w_blocks)
    return (y, *vjp(jnp.asarray(dy)))

  for a, b in zip(grads(4 * (2 * max(mc, tables.row_cols.shape[1]) + 1)), grads(1 << 18)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_default_block_m():
  assert default_block_m("tpu", 5, jnp.float32) == 8
  assert default_block_m("tpu", 5, jnp.bfloat16) == 16
  assert default_block_m("tpu", 10_000, jnp.bfloat16) == 512
  assert default_block_m("gpu", 5, jnp.float32) == 16
  assert default_block_m("gpu", 1000, jnp.float32) == 64


def test_kernel_unmet_names_the_constraint():
  assert kernel_unmet(1024, 2048, (128, 128), jnp.bfloat16, jnp.bfloat16, "tpu") is None
  assert kernel_unmet(64, 96, (16, 32), jnp.float32, jnp.float32, "gpu") is None
  assert "float16" in kernel_unmet(256, 256, (128, 128), jnp.float16, jnp.float16, "tpu")
  assert "bfloat16" in kernel_unmet(256, 256, (128, 128), jnp.float32, jnp.bfloat16,
                                    "gpu")
  assert "power of two" in kernel_unmet(96, 96, (48, 32), jnp.float32, jnp.float32, "gpu")
  assert "multiple of 128" in kernel_unmet(256, 256, (64, 128), jnp.float32, jnp.float32,
                                           "tpu")
  assert kernel_unmet(64, 256, (64, 128), jnp.float32, jnp.float32, "tpu") is None
  assert "scalar-prefetch" in kernel_unmet(256, 256, (128, 128), jnp.float32,
                                           jnp.float32, "tpu", (40_000, 1))
  assert "VMEM" in kernel_unmet(4096, 4096, (2048, 2048), jnp.float32, jnp.float32,
                                "tpu")
  assert VMEM_BUDGET == 12 * 2 ** 20


def test_errors():
  k, n, block = SHAPES["gpu"]
  index = np.array([[0, 0]], np.int32)
  tables = tables_of(index, k, n, block)
  w = jnp.ones((1, *block))
  with pytest.raises(ValueError, match="backend='cpu'"):
    block_sparse_matmul_kernel(jnp.ones((2, k)), w, tables, backend="cpu")
  with pytest.raises(ValueError, match=r"x has K=32 columns; the tables' 4 row blocks"):
    block_sparse_matmul_kernel(jnp.ones((2, 32)), w, tables, backend="gpu")
  with pytest.raises(ValueError, match="block_rows has shape"):
    block_sparse_matmul_kernel(jnp.ones((2, k)), jnp.ones((2, *block)), tables,
                               backend="gpu")
  with pytest.raises(ValueError, match="not one of float32 / bfloat16"):
    block_sparse_matmul_kernel(jnp.ones((2, k)), w.astype(jnp.bfloat16), tables,
                               backend="gpu")


def _custom_call_targets(lowered):
  return set(re.findall(r"custom_call @([^\s(]+)\(", lowered.as_text()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend,platform,target", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_lowering_forward_and_backward(backend, platform, target, dtype):
  k, n = 512, 768
  block = (128, 128) if backend == "tpu" else (64, 64)
  index = random_pattern(np.random.default_rng(0), k, n, block, extra=False)
  tables = tables_of(index, k, n, block)

  def loss(x, w):
    y = block_sparse_matmul_kernel(x, w, tables, backend=backend)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  args = (jax.ShapeDtypeStruct((100, k), dtype),
          jax.ShapeDtypeStruct((len(index), *block), dtype))
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(
      lowering_platforms=(platform,))
  assert target in _custom_call_targets(lowered)
  text = lowered.as_text()
  for name in ("fwd", "dx", "dw"):
    assert f"block_sparse_matmul_{name}_{backend}" in text, name


def test_tpu_compiles_with_tables_split_into_several_calls():
  """libtpu AOT (tests/tpu_aot.py): with a table budget of one column (row) block and
  two stored blocks per call, the forward, dx and dw calls run inside `lax.map` and
  still compile with Mosaic for v5e."""
  import tpu_aot  # tpu_mesh skips (with its reason) only when libtpu is missing
  from jax.sharding import PartitionSpec as P
  mesh = tpu_aot.tpu_mesh("v5e:2x2", {"data": 4})
  k, n, block = 512, 768, (128, 128)
  index = random_pattern(np.random.default_rng(1), k, n, block, extra=False)
  tables = tables_of(index, k, n, block)
  budget = 4 * (2 * max(tables.col_rows.shape[1], tables.row_cols.shape[1]) + 1)
  assert table_chunk(n // 128, tables.col_rows.shape[1], budget) == 1

  def loss(x, w):
    y = block_sparse_matmul_kernel(x, w, tables, backend="tpu", smem_table_bytes=budget)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  fn = jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh, in_specs=(P("data"), P()),
                     out_specs=(P("data"), P()), check_vma=False)
  compiled = tpu_aot.compile_for_tpu(
      fn, jax.ShapeDtypeStruct((256, k), jnp.bfloat16),
      jax.ShapeDtypeStruct((len(index), *block), jnp.bfloat16), mesh=mesh)
  assert compiled.hlo.count('custom_call_target="tpu_custom_call"') >= 3
