"""Block-sparse weight matmul kernels: TPU (Mosaic), GPU (Triton), with a custom_vjp.

`block_sparse_matmul_kernel(x, w_blocks, tables)` computes y = x · W for x [M, K] and
a weight W [K, N] (Flax layout: inputs × outputs) stored as its nonzero blocks
w_blocks [nnz, bh, bw]: block b sits at row block block_rows[b] and column block
block_cols[b] of the (K/bh) × (N/bw) block grid, so

    y[:, c·bw:(c+1)·bw] = Σ_{b: col(b) = c} x[:, row(b)·bh:(row(b)+1)·bh] · w_blocks[b]

in f32 (output in x.dtype). Blocks stored twice at one position add up; a block whose
valid flag is 0 (outside the block grid) contributes nothing and gets a zero gradient.
Backward (`jax.custom_vjp`): dx = dy · Wᵀ over the row table, and d w_blocks[b] =
x[:, row(b)]ᵀ · dy[:, col(b)] — the gradient of the stored blocks only.

The tables (`BlockSparseTables`, built by `sparsejax.ops.block_sparse_matmul` — this
package imports nothing from sparsejax) are CSR-like and padded:
    col_rows, col_slots  int32 [nbc, Mc]  the row block and w_blocks index of each
                                          stored block of output column block c, by
                                          row; padded slots repeat the last valid entry
                                          (0 for an empty column);
    col_counts           int32 [nbc]      valid slots per column;
    row_cols, row_slots  int32 [nbr, Mr]  the transpose (for dx), row_counts [nbr];
    block_rows, block_cols, block_valid  int32 [nnz]  each block's position (clamped
                                          into the grid) and whether it is valid.
Tokens are padded to a multiple of the token tile `block_m` (zero rows, sliced off).
See `tpu.py` / `gpu.py` for the grids, rooflines and limits; `kernel_unmet` says when
a kernel cannot take the inputs, so the op falls back to XLA.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (BACKENDS, HIGHEST, SMEM_TABLE_BYTES, default_backend,
                                    largest_divisor, map_chunks, match_vma, take)
from pallas_kernels.block_sparse_matmul.gpu import (GPU_BLOCK_M, bsmm_dw_gpu, bsmm_dx_gpu,
                                                    bsmm_fwd_gpu)
from pallas_kernels.block_sparse_matmul.tpu import (TPU_BLOCK_M, VMEM_BUDGET, bsmm_dw_tpu,
                                                    bsmm_dx_tpu, bsmm_fwd_tpu, vmem_bytes)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


class BlockSparseTables(NamedTuple):
  """The kernels' index tables (module docstring); a pytree of nine int32 arrays."""
  col_rows: Any
  col_slots: Any
  col_counts: Any
  row_cols: Any
  row_slots: Any
  row_counts: Any
  block_rows: Any
  block_cols: Any
  block_valid: Any


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def default_block_m(backend: str, m: int, dtype, k: int = 0, n: int = 0,
                    block: tuple[int, int] = (128, 128)) -> int:
  """Token tile. TPU: min(512, M rounded up to the sublane tile: 8 rows f32, 16 bf16),
  halved while the kernels' VMEM (`tpu.vmem_bytes` for a [K, N] weight: the resident
  [tm, K] / [tm, N] panels) exceeds `tpu.VMEM_BUDGET`; GPU: min(64, next power of two
  >= max(M, 16))."""
  if backend == "gpu":
    return min(GPU_BLOCK_M, max(16, pl.next_power_of_2(max(m, 1))))
  b = jnp.dtype(dtype).itemsize
  sub = 8 * max(1, 4 // b)
  tm = min(TPU_BLOCK_M, -(-max(m, 1) // sub) * sub)
  while tm > sub and max(vmem_bytes(tm, *block, b, k, n).values()) > VMEM_BUDGET:
    tm = max(sub, -(-(tm // 2) // sub) * sub)
  return tm


def table_chunk(rows: int, slots: int, budget: int = SMEM_TABLE_BYTES) -> int:
  """Table rows per TPU call whose 4·(2·slots + 1)-byte rows fit `budget` (>= 1)."""
  return largest_divisor(rows, budget // (4 * (2 * slots + 1)))


def kernel_unmet(k: int, n: int, block: tuple[int, int], x_dtype, w_dtype, backend: str,
                 m_slots: tuple[int, int] = (1, 1), block_m: int | None = None,
                 smem_table_bytes: int = SMEM_TABLE_BYTES) -> str | None:
  """Why the `backend` kernel cannot multiply x [., K] by a [K, N] weight of `block`
  (bh, bw) blocks, or None. `m_slots` = (Mc, Mr), the table widths.

  Both: x and blocks float32 / bfloat16 of one dtype. GPU: bh, bw powers of two >= 16.
  TPU: bh, bw multiples of 128 or the whole K / N; one table row per call within
  `smem_table_bytes`; VMEM (`tpu.vmem_bytes`) within `tpu.VMEM_BUDGET`.
  """
  supported = [jnp.dtype(t) for t in SUPPORTED_DTYPES]
  if jnp.dtype(x_dtype) not in supported or jnp.dtype(w_dtype) != jnp.dtype(x_dtype):
    return (f"x dtype {jnp.dtype(x_dtype)} and block dtype {jnp.dtype(w_dtype)} are not "
            "one of float32 / bfloat16")
  bh, bw = block
  if backend == "gpu":
    for name, v in (("bh", bh), ("bw", bw)):
      if v < 16 or not _pow2(v):
        return f"block {name}={v} is not a power of two >= 16 (Triton dot tiles)"
    return None
  for name, v, size in (("bh", bh, k), ("bw", bw, n)):
    if v % 128 and v != size:
      return f"block {name}={v} is neither a multiple of 128 nor the whole dim {size}"
  if 4 * (2 * max(m_slots) + 1) > smem_table_bytes:
    return (f"{max(m_slots)} stored blocks in one column/row block exceed the "
            f"{smem_table_bytes}-byte scalar-prefetch table budget")
  tm = block_m or default_block_m("tpu", TPU_BLOCK_M, x_dtype, k, n, block)
  need = max(vmem_bytes(tm, bh, bw, jnp.dtype(x_dtype).itemsize, k, n).values())
  if need > VMEM_BUDGET:
    return f"VMEM footprint {need} bytes (block_m={tm}, block {bh}x{bw}) > {VMEM_BUDGET}"
  return None


def _check(x, w_blocks, tables: BlockSparseTables, backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
  if x.ndim != 2 or w_blocks.ndim != 3:
    raise ValueError(f"x must be 2-D [M, K] and w_blocks 3-D [nnz, bh, bw], got shapes "
                     f"{x.shape}, {w_blocks.shape}")
  nbr, nbc = tables.row_counts.shape[0], tables.col_counts.shape[0]
  bh, bw = w_blocks.shape[1:]
  if x.shape[1] != nbr * bh:
    raise ValueError(f"x has K={x.shape[1]} columns; the tables' {nbr} row blocks of "
                     f"bh={bh} need {nbr * bh}")
  if tables.block_rows.shape != (w_blocks.shape[0],):
    raise ValueError(f"block_rows has shape {tables.block_rows.shape}; expected "
                     f"({w_blocks.shape[0]},) (one per stored block)")
  unmet = kernel_unmet(x.shape[1], nbc * bw, (bh, bw), x.dtype, w_blocks.dtype, backend)
  if unmet and not unmet.startswith("VMEM"):
    raise ValueError(f"block_sparse_matmul kernel ({backend}): {unmet}")


def _tpu_table_call(fn, a, w, idx, slots, counts, out_block, interpret, precision, tm,
                    budget):
  """fn over chunks of table rows (each call's tables within `budget` bytes):
  -> [Mp, R·out_block]."""
  r, m_slots = idx.shape
  rc = table_chunk(r, m_slots, budget)

  def one(ci):
    return fn(a, w, *(take(t, 0, ci, rc) for t in (idx, slots, counts)), tm=tm,
              interpret=interpret, precision=precision)

  out = map_chunks(one, r // rc)                           # [nch, Mp, rc·out_block]
  return jnp.swapaxes(out, 0, 1).reshape(a.shape[0], r * out_block)


def _tpu_dw(x, dy, t, bh, bw, tm, interpret, precision, budget):
  nnz = t.block_rows.shape[0]
  c = largest_divisor(nnz, budget // 12)

  def one(ci):
    return bsmm_dw_tpu(x, dy, *(take(v, 0, ci, c) for v in (t.block_rows, t.block_cols,
                                                            t.block_valid)),
                       bh=bh, bw=bw, tm=tm, interpret=interpret, precision=precision)

  return map_chunks(one, nnz // c).reshape(nnz, bh, bw)


def block_sparse_matmul_kernel(x, w_blocks, tables: BlockSparseTables, *, interpret=False,
                               backend: str | None = None, block_m: int | None = None,
                               smem_table_bytes: int = SMEM_TABLE_BYTES,
                               num_warps: int | None = None,
                               num_stages: int | None = None, precision=HIGHEST):
  """y = x · W (module docstring), differentiable in x and w_blocks.

  Args:
    x: [M, K] float32 / bfloat16; w_blocks: [nnz, bh, bw], x's dtype.
    tables: `BlockSparseTables` of the stored blocks (K = nbr·bh, N = nbc·bw).
    interpret: interpret mode for CPU tests (True, or a `pltpu.InterpretParams`).
    backend: "tpu" or "gpu"; default by the mesh in context / default backend.
    block_m: token tile (default `default_block_m`).
    smem_table_bytes: TPU: most bytes of scalar-prefetched tables per pallas_call.
    num_warps, num_stages: GPU (Triton) launch parameters (gpu.py).
    precision: matmul precision for float32 operands (HIGHEST by default; DEFAULT =
      TF32 on GPU, one bf16 pass on TPU); bfloat16 runs natively, f32 accumulation.

  Returns:
    y [M, N] in x.dtype.
  """
  x, w_blocks = jnp.asarray(x), jnp.asarray(w_blocks)
  backend = default_backend() if backend is None else backend
  tables = BlockSparseTables(*(jnp.asarray(t, jnp.int32) for t in tables))
  _check(x, w_blocks, tables, backend)
  m = x.shape[0]
  bh, bw = w_blocks.shape[1:]
  n = tables.col_counts.shape[0] * bw
  tm = block_m or default_block_m(backend, m, x.dtype, x.shape[1], n, (bh, bw))
  mp = -(-max(m, 1) // tm) * tm
  xp = jnp.pad(x, ((0, mp - m), (0, 0)))
  xp, w_blocks, *tabs = match_vma(xp, w_blocks, *tables)
  tables = BlockSparseTables(*tabs)
  if backend == "tpu":
    kw = dict(interpret=interpret, precision=precision, tm=tm, budget=smem_table_bytes)
    fwd = lambda x, w, t: _tpu_table_call(bsmm_fwd_tpu, x, w, t.col_rows, t.col_slots,
                                          t.col_counts, bw, **kw)
    dx_fn = lambda dy, w, t: _tpu_table_call(bsmm_dx_tpu, dy, w, t.row_cols,
                                             t.row_slots, t.row_counts, bh, **kw)
    dw_fn = lambda x, dy, t: _tpu_dw(x, dy, t, bh, bw, **kw)
  else:
    kw = dict(interpret=bool(interpret), precision=precision, tm=tm,
              num_warps=num_warps, num_stages=num_stages)
    fwd = lambda x, w, t: bsmm_fwd_gpu(x, w, t.col_rows, t.col_slots, t.col_counts, **kw)
    dx_fn = lambda dy, w, t: bsmm_dx_gpu(dy, w, t.row_cols, t.row_slots, t.row_counts,
                                         **kw)
    dw_fn = lambda x, dy, t: bsmm_dw_gpu(x, dy, t.block_rows, t.block_cols,
                                         t.block_valid, bh=bh, bw=bw, **kw)

  @jax.custom_vjp
  def matmul(x, w, t):
    return fwd(x, w, t)

  def matmul_fwd(x, w, t):
    return fwd(x, w, t), (x, w, t)

  def matmul_bwd(res, dy):
    x, w, t = res
    dy = dy.astype(x.dtype)
    return dx_fn(dy, w, t), dw_fn(x, dy, t), None     # integer tables: no cotangent

  matmul.defvjp(matmul_fwd, matmul_bwd)
  y = matmul(xp, w_blocks, tables)
  return y[:m]


__all__ = ["block_sparse_matmul_kernel", "BlockSparseTables", "kernel_unmet",
           "default_block_m", "table_chunk", "vmem_bytes", "bsmm_fwd_tpu", "bsmm_dx_tpu",
           "bsmm_dw_tpu", "bsmm_fwd_gpu", "bsmm_dx_gpu", "bsmm_dw_gpu", "VMEM_BUDGET",
           "SUPPORTED_DTYPES", "BACKENDS"]
