"""Block-sparse weight matmul: TPU (Mosaic) kernels (forward, dx, dw).

y = x · W with W [K, N] stored as nnz blocks w_blocks [nnz, bh, bw]; x [Mp, K] has its
token rows padded by the wrapper to a multiple of the token tile tm. The tables
(`BlockSparseTables`, see the package docstring) are flattened to 1-D int32 and
scalar-prefetched into SMEM; the weight BlockSpec's index map reads them, so every
grid step DMAs exactly the stored block it multiplies. x (dy for dx) is laid out as
row-block lines [K/bh, Mp, bh] and its whole [tm, K] panel of token tile i stays in
VMEM across the steps of i (one DMA per token tile); a step picks its line with a
dynamic index on the leading, untiled axis.

Forward (`bsmm_fwd_tpu`): grid (Mp/tm, nbc, Mc), semantics (parallel, parallel,
arbitrary). Step (i, j, s) multiplies line col_rows[j, s] of the x panel [tm, bh] by
block col_slots[j, s] [bh, bw] into an f32 [tm, bw] scratch when s < col_counts[j];
padded slots repeat the last valid slot, so the pipeline issues no DMA for them. The
output tile (i, j) is visited on consecutive steps only and written at s = Mc − 1
(zeros for a column block with no stored block).
dx (`bsmm_dx_tpu`): the same over the row table: grid (Mp/tm, nbr, Mr), dx tile
(i, r) += dy panel line row_cols[r, s] · block(row_slots[r, s])ᵀ (`dot_nt`, no
transposed copy).
dw (`bsmm_dw_tpu`): grid (nnz, Mp/tm), (parallel, arbitrary): dw_blocks[b] =
Σ_i x tile (i, block_rows[b])ᵀ · dy tile (i, block_cols[b]) (`dot_tn`) in an f32
[bh, bw] scratch; an invalid block (outside the block grid) is never accumulated and
gets zeros.

Roofline (b = itemsize, nnz stored blocks, Mp rows):
    FLOPs_fwd = 2 · Mp · nnz · bh · bw (= density × the dense matmul's); dx, dw the same.
    bytes_fwd ideal = nnz·bh·bw·b + Mp·K·b + Mp·N·b (stored blocks + x + y once);
    moved: x once (the resident panels) + y once + the stored blocks once per token
    tile (Mp/tm · nnz·bh·bw·b): a step moves one block for 2·tm·bh·bw FLOPs, i.e.
    2·tm/b FLOP/byte — bf16 at tm = 256 (K = 8192): 256, above v5e's ridge (≈ 240
    FLOP/byte, 197 TFLOP/s / 819 GB/s). dw (per stored block, over all tokens) moves
    x and dy tiles for every block: 2·bh·bw/((bh + bw)·b) FLOP/byte (bf16 128 × 128:
    64, HBM-bound); `block_m` and the block shape are the knobs.
Limits per pallas_call (checked by the wrapper and `kernel_unmet`):
  SMEM (scalar prefetch): forward 4·nbc_c·(2·Mc + 1) bytes, dx 4·nbr_c·(2·Mr + 1),
    dw 12·nnz_c; the wrapper splits column blocks / row blocks / stored blocks into
    calls of at most `SMEM_TABLE_BYTES` (256 KiB). Floor: one column (row) block per
    call, i.e. Mc, Mr ≤ 32,767 stored blocks.
  VMEM (inputs double-buffered): forward 2·(tm·K + tm·bw + bh·bw)·b + 4·tm·bw, dx
    2·(tm·N + tm·bh + bh·bw)·b + 4·tm·bh, dw 2·(tm·bh + tm·bw + bh·bw)·b + 4·bh·bw
    (`vmem_bytes`); the token tile (`default_block_m`: 512, halved until the panels
    fit `VMEM_BUDGET` = 12 MiB) is 256 for bf16 and 128 for f32 at K = N = 8192 with
    128 × 128 blocks (8.3 MiB); `kernel_unmet` refuses K, N too wide for a tile of 8
    (f32) / 16 (bf16) rows (K ≈ 190k).
Constraints: float32 / bfloat16 x and blocks (the same dtype); bh, bw multiples of 128
(lane tiles) or the whole K / N; tm a multiple of 8 (f32) / 16 (bf16).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (HIGHEST, dot, dot_nt, dot_tn, interpret_params,
                                    out_struct)

# Below v5e's 16 MiB default scoped VMEM (v6e: 32 MiB), leaving room for Mosaic's own.
VMEM_BUDGET = 12 * 2 ** 20
TPU_BLOCK_M = 512            # default token tile


def vmem_bytes(tm: int, bh: int, bw: int, itemsize: int, k: int, n: int) -> dict[str, int]:
  """VMEM bytes of the forward, dx and dw kernels for a [K, N] weight (formulas in the
  module docstring): the resident [tm, K] x panel ([tm, N] dy panel for dx)."""
  b, blk = itemsize, 2 * bh * bw * itemsize
  return dict(fwd=2 * (tm * k + tm * bw) * b + blk + 4 * tm * bw,
              dx=2 * (tm * n + tm * bh) * b + blk + 4 * tm * bh,
              dw=2 * (tm * bh + tm * bw) * b + blk + 4 * bh * bw)


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _matmul_kernel(idx_ref, slot_ref, cnt_ref, a_ref, w_ref, o_ref, acc_ref, *,
                   m_slots, transpose_w, prec):
  """acc (tile (i, j)) += a tile · w block (ᵀ), over the table slots of j."""
  j, s = pl.program_id(1), pl.program_id(2)

  @pl.when(s == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(s < cnt_ref[j])
  def _step():
    mul = dot_nt if transpose_w else dot
    acc_ref[...] += mul(a_ref[idx_ref[j * m_slots + s]], w_ref[0], prec)

  @pl.when(s == m_slots - 1)
  def _finish():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _table_matmul(a, w_blocks, idx, slots, counts, *, a_block, o_block,
                  transpose_w, tm, interpret, precision, name):
  """o [Mp, R·o_block] with o tile (i, j) = Σ_s a tile (i, idx[j, s]) · w(slots[j, s])
  (ᵀ if transpose_w), for the R table rows j (a forward or dx call). `a` is laid out
  as lines [L, Mp, a_block] so that the whole [tm, L·a_block] panel of token tile i
  stays in VMEM across its steps (DMA'd once per i) and each step picks its line with
  a dynamic index on the leading, untiled axis."""
  mp = a.shape[0]
  r, m_slots = idx.shape
  bh, bw = w_blocks.shape[1:]
  lines = a.shape[1] // a_block
  a = a.reshape(mp, lines, a_block).swapaxes(0, 1)
  args = (idx.reshape(-1), slots.reshape(-1), counts, a, w_blocks)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(mp // tm, r, m_slots),
      in_specs=[pl.BlockSpec((lines, tm, a_block), lambda i, j, s, idx, sl, c: (0, i, 0)),
                pl.BlockSpec((1, bh, bw),
                             lambda i, j, s, idx, sl, c: (sl[j * m_slots + s], 0, 0))],
      out_specs=pl.BlockSpec((tm, o_block), lambda i, j, s, idx, sl, c: (i, j)),
      scratch_shapes=[pltpu.VMEM((tm, o_block), jnp.float32)])
  steps = (mp // tm) * r * m_slots
  b = a.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_matmul_kernel, m_slots=m_slots, transpose_w=transpose_w,
                        prec=precision),
      grid_spec=grid_spec,
      out_shape=out_struct((mp, r * o_block), a.dtype, *args),
      compiler_params=_params("parallel", "parallel", "arbitrary"),
      cost_estimate=pl.CostEstimate(
          flops=2 * steps * tm * bh * bw, transcendentals=0,
          bytes_accessed=mp * lines * a_block * b + steps * bh * bw * b
          + mp * r * o_block * b),
      interpret=interpret_params(interpret),
      name=name,
  )(*args)


def bsmm_fwd_tpu(x, w_blocks, col_rows, col_slots, col_counts, *, tm, interpret=False,
                 precision=HIGHEST):
  """y [Mp, nbc·bw] (x.dtype) for the column-table chunk (col_* [nbc_c, Mc])."""
  bh, bw = w_blocks.shape[1:]
  return _table_matmul(x, w_blocks, col_rows, col_slots, col_counts,
                       a_block=bh, o_block=bw,
                       transpose_w=False, tm=tm, interpret=interpret,
                       precision=precision, name="block_sparse_matmul_fwd_tpu")


def bsmm_dx_tpu(dy, w_blocks, row_cols, row_slots, row_counts, *, tm, interpret=False,
                precision=HIGHEST):
  """dx [Mp, nbr·bh] (dy.dtype) for the row-table chunk (row_* [nbr_c, Mr])."""
  bh, bw = w_blocks.shape[1:]
  return _table_matmul(dy, w_blocks, row_cols, row_slots, row_counts,
                       a_block=bw, o_block=bh,
                       transpose_w=True, tm=tm, interpret=interpret,
                       precision=precision, name="block_sparse_matmul_dx_tpu")


def _dw_kernel(rows_ref, cols_ref, valid_ref, x_ref, dy_ref, dw_ref, acc_ref, *, nm,
               prec):
  blk, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(valid_ref[blk] != 0)
  def _step():
    acc_ref[...] += dot_tn(x_ref[...], dy_ref[...], prec)

  @pl.when(i == nm - 1)
  def _finish():
    dw_ref[0] = acc_ref[...].astype(dw_ref.dtype)


def bsmm_dw_tpu(x, dy, block_rows, block_cols, block_valid, *, bh, bw, tm,
                interpret=False, precision=HIGHEST):
  """dw [nnz_c, bh, bw] (x.dtype) of the chunk's blocks (block_* int32 [nnz_c], rows
  and columns clamped into the grid; block_valid 0 for an invalid block)."""
  mp = x.shape[0]
  nnz, nm = block_rows.shape[0], mp // tm
  args = (block_rows, block_cols, block_valid, x, dy)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(nnz, nm),
      in_specs=[pl.BlockSpec((tm, bh), lambda s, i, r, c, v: (i, r[s])),
                pl.BlockSpec((tm, bw), lambda s, i, r, c, v: (i, c[s]))],
      out_specs=pl.BlockSpec((1, bh, bw), lambda s, i, r, c, v: (s, 0, 0)),
      scratch_shapes=[pltpu.VMEM((bh, bw), jnp.float32)])
  b = x.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_dw_kernel, nm=nm, prec=precision),
      grid_spec=grid_spec,
      out_shape=out_struct((nnz, bh, bw), x.dtype, *args),
      compiler_params=_params("parallel", "arbitrary"),
      cost_estimate=pl.CostEstimate(
          flops=2 * nnz * mp * bh * bw, transcendentals=0,
          bytes_accessed=nnz * mp * (bh + bw) * b + nnz * bh * bw * b),
      interpret=interpret_params(interpret),
      name="block_sparse_matmul_dw_tpu",
  )(*args)


__all__ = ["bsmm_fwd_tpu", "bsmm_dx_tpu", "bsmm_dw_tpu", "vmem_bytes", "VMEM_BUDGET",
           "TPU_BLOCK_M"]
