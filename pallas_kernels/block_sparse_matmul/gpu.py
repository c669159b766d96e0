"""Block-sparse weight matmul: GPU (Pallas Triton) kernels (forward, dx, dw).

y = x · W with W [K, N] stored as nnz blocks w_blocks [nnz, bh, bw]; x [Mp, K] padded
by the wrapper to a multiple of the token tile tm. Triton has no scalar prefetch: the
tables (`BlockSparseTables`, flattened int32) are whole-array inputs read inside the
kernel, and every operand is a whole-array ref indexed with `pl.ds`.

Forward (`bsmm_fwd_gpu`): grid (Mp/tm, nbc), one [tm, bw] output tile per program,
`lax.fori_loop` over its column's col_counts[j] stored blocks: load the row block and
slot, the x tile [tm, bh] and the block [bh, bw], accumulate in f32 registers; one
store (zeros for an empty column). dx (`bsmm_dx_gpu`): grid (Mp/tm, nbr) over the row
table, dx tile += dy tile · blockᵀ. dw (`bsmm_dw_gpu`): grid (nnz,), one stored block
per program, looping over the Mp/tm token tiles: dw = Σ x tileᵀ · dy tile (an invalid
block loops zero times and stores zeros).

Roofline: as the TPU kernels (tpu.py): FLOPs 2·Mp·nnz·bh·bw per pass, ideal bytes
nnz·bh·bw·b + Mp·(K + N)·b; each program re-reads its x tiles once per stored block
of its column, and every stored block is read once per token tile.
Constraints: float32 / bfloat16 (the same dtype for x and blocks); tm, bh, bw powers
of two >= 16 (`pl.dot` tiles). Tuning: `num_warps` (default 4, 8 for tiles of more
than 64·64 outputs), `num_stages` (default 2: Triton may prefetch the next block's
loads while the current one multiplies), f32 `precision` (HIGHEST, or DEFAULT = TF32).
None of these has been timed on a GPU yet.
"""

from __future__ import annotations

import functools

from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import HIGHEST, dot, out_struct, triton_params

NUM_STAGES = 2
GPU_BLOCK_M = 64             # default token tile


def _compiler_params(rows, cols, num_warps, num_stages):
  warps = num_warps or (4 if rows * cols <= 64 * 64 else 8)
  return triton_params(warps, NUM_STAGES if num_stages is None else num_stages)


def _matmul_kernel(idx_ref, slot_ref, cnt_ref, a_ref, w_ref, o_ref, *, m_slots, tm,
                   a_block, o_block, transpose_w, prec):
  i, j = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(i * tm, tm)

  def body(s, acc):
    k = j * m_slots + s
    a = a_ref[rows, pl.ds(idx_ref[k] * a_block, a_block)]
    w = w_ref[slot_ref[k], :, :]
    return acc + dot(a, w.T if transpose_w else w, prec)

  acc = lax.fori_loop(0, cnt_ref[j], body, jnp.zeros((tm, o_block), jnp.float32))
  o_ref[rows, pl.ds(j * o_block, o_block)] = acc.astype(o_ref.dtype)


def _table_matmul(a, w_blocks, idx, slots, counts, *, a_block, o_block, transpose_w,
                  tm, interpret, num_warps, num_stages, precision, name):
  mp = a.shape[0]
  r, m_slots = idx.shape
  bh, bw = w_blocks.shape[1:]
  args = (idx.reshape(-1), slots.reshape(-1), counts, a, w_blocks)
  b = a.dtype.itemsize
  steps = (mp // tm) * r * m_slots
  return pl.pallas_call(
      functools.partial(_matmul_kernel, m_slots=m_slots, tm=tm, a_block=a_block,
                        o_block=o_block, transpose_w=transpose_w, prec=precision),
      grid=(mp // tm, r),
      out_shape=out_struct((mp, r * o_block), a.dtype, *args),
      compiler_params=_compiler_params(tm, o_block, num_warps, num_stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * steps * tm * bh * bw, transcendentals=0,
          bytes_accessed=steps * (tm * a_block + bh * bw) * b + mp * r * o_block * b),
      interpret=interpret,
      name=name,
  )(*args)


def bsmm_fwd_gpu(x, w_blocks, col_rows, col_slots, col_counts, *, tm, interpret=False,
                 num_warps=None, num_stages=None, precision=HIGHEST):
  """y [Mp, nbc·bw] (x.dtype)."""
  bh, bw = w_blocks.shape[1:]
  return _table_matmul(x, w_blocks, col_rows, col_slots, col_counts, a_block=bh,
                       o_block=bw, transpose_w=False, tm=tm, interpret=interpret,
                       num_warps=num_warps, num_stages=num_stages, precision=precision,
                       name="block_sparse_matmul_fwd_gpu")


def bsmm_dx_gpu(dy, w_blocks, row_cols, row_slots, row_counts, *, tm, interpret=False,
                num_warps=None, num_stages=None, precision=HIGHEST):
  """dx [Mp, nbr·bh] (dy.dtype)."""
  bh, bw = w_blocks.shape[1:]
  return _table_matmul(dy, w_blocks, row_cols, row_slots, row_counts, a_block=bw,
                       o_block=bh, transpose_w=True, tm=tm, interpret=interpret,
                       num_warps=num_warps, num_stages=num_stages, precision=precision,
                       name="block_sparse_matmul_dx_gpu")


def _dw_kernel(rows_ref, cols_ref, valid_ref, x_ref, dy_ref, dw_ref, *, nm, tm, bh, bw,
               prec):
  blk = pl.program_id(0)
  xcols = pl.ds(rows_ref[blk] * bh, bh)
  ycols = pl.ds(cols_ref[blk] * bw, bw)

  def body(i, acc):
    rows = pl.ds(i * tm, tm)
    return acc + dot(x_ref[rows, xcols].T, dy_ref[rows, ycols], prec)

  steps = jnp.where(valid_ref[blk] != 0, nm, 0)
  acc = lax.fori_loop(0, steps, body, jnp.zeros((bh, bw), jnp.float32))
  dw_ref[blk, :, :] = acc.astype(dw_ref.dtype)


def bsmm_dw_gpu(x, dy, block_rows, block_cols, block_valid, *, bh, bw, tm,
                interpret=False, num_warps=None, num_stages=None, precision=HIGHEST):
  """dw [nnz, bh, bw] (x.dtype)."""
  mp = x.shape[0]
  nnz = block_rows.shape[0]
  args = (block_rows, block_cols, block_valid, x, dy)
  b = x.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_dw_kernel, nm=mp // tm, tm=tm, bh=bh, bw=bw, prec=precision),
      grid=(nnz,),
      out_shape=out_struct((nnz, bh, bw), x.dtype, *args),
      compiler_params=_compiler_params(bh, bw, num_warps, num_stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * nnz * mp * bh * bw, transcendentals=0,
          bytes_accessed=nnz * mp * (bh + bw) * b + nnz * bh * bw * b),
      interpret=interpret,
      name="block_sparse_matmul_dw_gpu",
  )(*args)


__all__ = ["bsmm_fwd_gpu", "bsmm_dx_gpu", "bsmm_dw_gpu", "GPU_BLOCK_M", "NUM_STAGES"]
