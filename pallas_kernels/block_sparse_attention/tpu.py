"""Block-sparse flash attention: TPU (Mosaic) kernels (forward, dq, dk/dv).

Layout q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]; query head h reads kv
head h // G. Mask tables (see `__init__`): per-slot CSR tables, flattened to 1-D int32
and scalar-prefetched into SMEM; the partial tiles [P, bq, bkv] (int32) are a VMEM
input whose BlockSpec index is the slot's tile index (unchanged across non-partial
slots, so no re-DMA). Hm = 1 (shared mask) or Hq (per-head mask) table heads.

Row statistics are lane-dense, as in splash attention: the running max m and sum l
are f32 scratch [bq, 128] (every lane holds the row's value, so their updates are
whole-vreg ops), and LSE / di travel between kernels as rows, one (1, bq) row per
q block of an f32 [B, Hq, nq, 1, bq] array (the wrappers take and return
[B, Hq, T]), never as [.., T, 1] columns that pad each value to 128 lanes.

Forward (`bsa_fwd_tpu`): grid (B, Hq, nq, M) with M = max non-empty kv blocks per q
block, semantics (parallel, parallel, parallel, arbitrary). Step (b, h, i, j) reads kv
block kv_blocks[h, i, j] through the K/V BlockSpec index map (padded slots repeat the
last block, so the pipeline issues no DMA for them) and does nothing unless the slot
is valid (`pl.when(kind > 0)`). Full blocks run the unmasked online-softmax update,
partial blocks mask the logits with the stored tile; acc [bq, Dv] is f32 scratch. The
output block (b, h, i) is revisited only on the consecutive steps j and written at
j = M - 1 with its LSE row (+0.7·f32max for a row with no allowed key, output 0).

dq (`bsa_dq_tpu`): the forward's grid and tables; p = exp(s - lse) (masked, lse the
row turned into a [bq, 1] column in-kernel), ds = p ⊙ (do·vᵀ - di), dq += ds·k in an
f32 scratch, written at j = M - 1.
dk/dv (`bsa_dkv_tpu`): grid (B, Hkv, nkv, G, Mt) over the transposed CSR (q blocks per
kv block, Mt slots); for kv head c the G query heads h = c·G + g and their q blocks are
consecutive steps, so the dk/dv blocks (b, c, j) are revisited only consecutively and
the GQA group sum happens in the f32 scratch (written once per kv block). It works on
transposed tiles like splash's dkv kernel: pᵀ = exp(k·qᵀ - lse) [bkv, bq] with the LSE
row broadcast over sublanes and the transposed partial tile, so dv += pᵀ·do and
dk += dsᵀ·q are plain matmuls (no transposed operand).

Roofline: see the package docstring (FLOPs 2·B·Hq·nnz·(D + Dv) forward, ≈ 2.5× that
backward; K/V re-read once per visited (q block, q head); block efficiency
nnz / (visited · bq · bkv)). Mask tiles cost ≤ bq·bkv·4 bytes per change of tile.

Limits per pallas_call (`sizing.tpu_footprint` computes them; tested at 32k and 128k
context). Chips: SMEM ~1 MiB per TensorCore (v4, v5e, v5p, v6e); VMEM 16 MiB (v5e) /
32 MiB (v6e) default scoped limit, 128 MiB physical (v5e/v6e).
  SMEM (scalar prefetch): 3 int32 tables [Hm_c, rc, M] = 12·Hm_c·rc·M bytes (forward,
    dq; M = most kv blocks of a q block) and 12·Hm_c·rc·Mt (dk/dv). Unsplit, causal 32k
    is 48 KiB at 512-blocks, 768 KiB at 128-blocks, and 128k at 128-blocks 12 MiB, so
    the package splits the grid (`tpu_chunks`: rows of q blocks — kv blocks for dk/dv —
    and, for per-head masks, GQA groups of heads; one call per chunk inside a
    `lax.map`) to stay within `SMEM_TABLE_BYTES` = 256 KiB. Floor: one row of one
    group, 12·G·M bytes (per-head masks) or 12·M (shared), e.g. M ≤ 1365 kv blocks at
    G = 16.
  VMEM (b = itemsize; inputs/outputs double-buffered; tile = 4·bq·bkv; an f32 (1, bq)
    LSE / di row pads to 8 sublanes = 32·bq bytes; ~2-3 f32 [bq, bkv] temporaries):
      fwd  2·(bq·D·b + bkv·(D+Dv)·b + tile + bq·Dv·b + 32·bq) + 1024·bq + 4·bq·Dv + 2·tile
      dq   2·(bq·(D+Dv)·b + bkv·(D+Dv)·b + 64·bq + tile + bq·D·b) + 4·bq·D + 3·tile
      dkv  2·(bq·(D+Dv)·b + 2·bkv·(D+Dv)·b + 64·bq + tile) + 4·bkv·(D+Dv) + 3·tile
    (bq = bkv = 512, D = Dv = 128, bf16: 5.8 / 6.6 / 7.1 MiB; at 128: 0.7 / 0.7 /
    0.8 MiB), independent of T. These bound Mosaic's own figure from above (v5e
    compiles: a 1024-block forward, estimated 19.6 MiB, needs 18.5 MiB).
Constraints: float32 / bfloat16 q, k, v; bq, bkv multiples of 8 (16 for bfloat16) or
the whole sequence. Matmuls accumulate in f32; bf16 operands run at the MXU's native
precision (Mosaic rejects HIGHEST on bf16), f32 operands at `precision` (HIGHEST by
default; lax.Precision.DEFAULT is one bf16 pass).
"""

from __future__ import annotations

import functools

from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (EMPTY_LSE, HIGHEST, MASK_VALUE, NUM_LANES, dot,
                                    dot_nt, interpret_params, out_struct)

FULL, PARTIAL = 2, 1


def _mhead(h, per_head):
  return h if per_head else 0


def _rows(x, bq):
  """[B, H, T] -> [B, H, nq, 1, bq]: one lane-dense (1, bq) row per q block (a block
  whose last two dims are whole array dims, legal for any bq)."""
  b, h, t = x.shape
  return x.reshape(b, h, t // bq, 1, bq)


def _fwd_kernel(blk_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, pm_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, nq, m_slots, per_head, prec):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kind = kind_ref[(_mhead(h, per_head) * nq + i) * m_slots + j]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def update(masked):
    q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]
    s = dot_nt(q, k, prec) * scale                                   # [bq, bkv]
    if masked:
      allowed = pm_ref[0] != 0
      s = jnp.where(allowed, s, MASK_VALUE)
    m_prev = m_sc[...]                                               # [bq, 128]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_new[:, :1])
    if masked:
      p = jnp.where(allowed, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + dot(p.astype(v.dtype), v, prec)
    m_sc[...] = m_new

  pl.when(kind == FULL)(lambda: update(False))
  pl.when(kind == PARTIAL)(lambda: update(True))

  @pl.when(j == m_slots - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[0, 0] = (acc_sc[...] / safe_l[:, :1]).astype(o_ref.dtype)
    lse = jnp.where(empty, EMPTY_LSE, m_sc[...] + jnp.log(safe_l))     # [bq, 128]
    lse_ref[0, 0, 0] = lse.T[:1]                                     # the (1, bq) row


def _fwd_specs(g, nq, m_slots, per_head):
  """Index maps of the (B, Hq, nq, M) grid: q/out, K/V (CSR block), mask tile, and
  the LSE / di rows."""
  def slot(h, i, j):
    return (_mhead(h, per_head) * nq + i) * m_slots + j

  q_map = lambda b, h, i, j, blk, kind, tile: (b, h, i, 0)
  kv_map = lambda b, h, i, j, blk, kind, tile: (b, lax.div(h, g), blk[slot(h, i, j)], 0)
  pm_map = lambda b, h, i, j, blk, kind, tile: (tile[slot(h, i, j)], 0, 0)
  row_map = lambda b, h, i, j, blk, kind, tile: (b, h, i, 0, 0)
  return q_map, kv_map, pm_map, row_map


def bsa_fwd_tpu(q, k, v, kv_blocks, kv_counts, slot_kind, slot_tile, tiles, *, scale,
                block_q, block_kv, interpret=False, precision=HIGHEST):
  """Forward: -> (out [B, Hq, T, Dv] q.dtype, lse f32 [B, Hq, T]). No autodiff."""
  del kv_counts                                  # slot_kind is 0 past the count
  b, hq, t, d = q.shape
  hkv, dv = k.shape[1], v.shape[3]
  bq, bkv = block_q, block_kv
  hm, nq, m_slots = kv_blocks.shape
  per_head = hm > 1
  q_map, kv_map, pm_map, row_map = _fwd_specs(hq // hkv, nq, m_slots, per_head)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, hq, nq, m_slots),
      in_specs=[pl.BlockSpec((1, 1, bq, d), q_map),
                pl.BlockSpec((1, 1, bkv, d), kv_map),
                pl.BlockSpec((1, 1, bkv, dv), kv_map),
                pl.BlockSpec((1, bq, bkv), pm_map)],
      out_specs=[pl.BlockSpec((1, 1, bq, dv), q_map),
                 pl.BlockSpec((1, 1, 1, 1, bq), row_map)],
      scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                      pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                      pltpu.VMEM((bq, dv), jnp.float32)])
  visited = b * hq * nq * m_slots
  itemsize = q.dtype.itemsize
  args = (kv_blocks.reshape(-1), slot_kind.reshape(-1), slot_tile.reshape(-1), q, k, v,
          tiles)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, nq=nq, m_slots=m_slots,
                        per_head=per_head, prec=precision),
      grid_spec=grid_spec,
      out_shape=[out_struct((b, hq, t, dv), q.dtype, *args),
                 out_struct((b, hq, nq, 1, bq), jnp.float32, *args)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * bq * bkv * (d + dv), transcendentals=visited * bq * bkv,
          bytes_accessed=b * hq * t * (d + dv) * itemsize
          + visited * bkv * (d + dv) * itemsize + b * hq * t * 4),
      interpret=interpret_params(interpret),
      name="block_sparse_attention_fwd_tpu",
  )(*args)
  return out, lse.reshape(b, hq, t)


def _dq_kernel(blk_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
               pm_ref, dq_ref, dq_sc, *, scale, nq, m_slots, per_head, prec):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kind = kind_ref[(_mhead(h, per_head) * nq + i) * m_slots + j]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def update(masked):
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    lse, di = lse_ref[0, 0, 0, 0][:, None], di_ref[0, 0, 0, 0][:, None]   # [bq, 1]
    p = jnp.exp(dot_nt(q, k, prec) * scale - lse)                    # [bq, bkv]
    if masked:
      p = jnp.where(pm_ref[0] != 0, p, 0.0)
    ds = p * (dot_nt(do, v, prec) - di)
    dq_sc[...] += dot(ds.astype(k.dtype), k, prec)

  pl.when(kind == FULL)(lambda: update(False))
  pl.when(kind == PARTIAL)(lambda: update(True))

  @pl.when(j == m_slots - 1)
  def _finish():
    dq_ref[0, 0] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def bsa_dq_tpu(q, k, v, d_out, lse, di, kv_blocks, kv_counts, slot_kind, slot_tile,
               tiles, *, scale, block_q, block_kv, interpret=False, precision=HIGHEST):
  """dq [B, Hq, T, D] (q.dtype) from d_out, lse and di f32 [B, Hq, T]."""
  del kv_counts
  b, hq, t, d = q.shape
  hkv, dv = k.shape[1], v.shape[3]
  bq, bkv = block_q, block_kv
  hm, nq, m_slots = kv_blocks.shape
  per_head = hm > 1
  q_map, kv_map, pm_map, row_map = _fwd_specs(hq // hkv, nq, m_slots, per_head)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, hq, nq, m_slots),
      in_specs=[pl.BlockSpec((1, 1, bq, d), q_map),
                pl.BlockSpec((1, 1, bkv, d), kv_map),
                pl.BlockSpec((1, 1, bkv, dv), kv_map),
                pl.BlockSpec((1, 1, bq, dv), q_map),
                pl.BlockSpec((1, 1, 1, 1, bq), row_map),
                pl.BlockSpec((1, 1, 1, 1, bq), row_map),
                pl.BlockSpec((1, bq, bkv), pm_map)],
      out_specs=pl.BlockSpec((1, 1, bq, d), q_map),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)])
  visited = b * hq * nq * m_slots
  itemsize = q.dtype.itemsize
  args = (kv_blocks.reshape(-1), slot_kind.reshape(-1), slot_tile.reshape(-1), q, k, v,
          d_out, _rows(lse, bq), _rows(di, bq), tiles)
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, nq=nq, m_slots=m_slots,
                        per_head=per_head, prec=precision),
      grid_spec=grid_spec,
      out_shape=out_struct((b, hq, t, d), q.dtype, *args),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * bq * bkv * (2 * d + dv), transcendentals=visited * bq * bkv,
          bytes_accessed=b * hq * t * (2 * d + dv) * itemsize
          + visited * bkv * (d + dv) * itemsize + b * hq * t * 8),
      interpret=interpret_params(interpret),
      name="block_sparse_attention_dq_tpu",
  )(*args)


def _dkv_kernel(blk_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                pmt_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, g, nkv, m_slots,
                per_head, prec):
  c, j, gi, tq = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  h = c * g + gi
  kind = kind_ref[(_mhead(h, per_head) * nkv + j) * m_slots + tq]

  @pl.when((gi == 0) & (tq == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def update(masked):
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    p = jnp.exp(dot_nt(k, q, prec) * scale - lse_ref[0, 0, 0])      # pᵀ [bkv, bq]
    if masked:
      p = jnp.where(pmt_ref[0] != 0, p, 0.0)
    dv_sc[...] += dot(p.astype(do.dtype), do, prec)
    ds = p * (dot_nt(v, do, prec) - di_ref[0, 0, 0])                 # dsᵀ [bkv, bq]
    dk_sc[...] += dot(ds.astype(q.dtype), q, prec)

  pl.when(kind == FULL)(lambda: update(False))
  pl.when(kind == PARTIAL)(lambda: update(True))

  @pl.when((gi == g - 1) & (tq == m_slots - 1))
  def _finish():
    dk_ref[0, 0] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


def bsa_dkv_tpu(q, k, v, d_out, lse, di, q_blocks, q_counts, slot_kind, slot_tile,
                tiles_t, *, scale, block_q, block_kv, interpret=False, precision=HIGHEST):
  """(dk [B, Hkv, S, D] k.dtype, dv [B, Hkv, S, Dv] v.dtype), GQA group summed; lse,
  di f32 [B, Hq, T]; tiles_t int32 [P, bkv, bq] (the partial tiles transposed)."""
  del q_counts
  b, hq, t, d = q.shape
  hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
  g = hq // hkv
  bq, bkv = block_q, block_kv
  hm, nkv, m_slots = q_blocks.shape
  per_head = hm > 1

  def slot(c, j, gi, tq):
    return (_mhead(c * g + gi, per_head) * nkv + j) * m_slots + tq

  def q_map(b_, c, j, gi, tq, blk, kind, tile):
    return b_, c * g + gi, blk[slot(c, j, gi, tq)], 0

  def row_map(b_, c, j, gi, tq, blk, kind, tile):
    return b_, c * g + gi, blk[slot(c, j, gi, tq)], 0, 0

  def kv_map(b_, c, j, gi, tq, blk, kind, tile):
    return b_, c, j, 0

  def pm_map(b_, c, j, gi, tq, blk, kind, tile):
    return tile[slot(c, j, gi, tq)], 0, 0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, hkv, nkv, g, m_slots),
      in_specs=[pl.BlockSpec((1, 1, bq, d), q_map),
                pl.BlockSpec((1, 1, bkv, d), kv_map),
                pl.BlockSpec((1, 1, bkv, dv), kv_map),
                pl.BlockSpec((1, 1, bq, dv), q_map),
                pl.BlockSpec((1, 1, 1, 1, bq), row_map),
                pl.BlockSpec((1, 1, 1, 1, bq), row_map),
                pl.BlockSpec((1, bkv, bq), pm_map)],
      out_specs=[pl.BlockSpec((1, 1, bkv, d), kv_map),
                 pl.BlockSpec((1, 1, bkv, dv), kv_map)],
      scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32),
                      pltpu.VMEM((bkv, dv), jnp.float32)])
  visited = b * hkv * nkv * g * m_slots
  itemsize = q.dtype.itemsize
  args = (q_blocks.reshape(-1), slot_kind.reshape(-1), slot_tile.reshape(-1), q, k, v,
          d_out, _rows(lse, bq), _rows(di, bq), tiles_t)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, g=g, nkv=nkv, m_slots=m_slots,
                        per_head=per_head, prec=precision),
      grid_spec=grid_spec,
      out_shape=[out_struct((b, hkv, s, d), k.dtype, *args),
                 out_struct((b, hkv, s, dv), v.dtype, *args)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary",
                               "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * bq * bkv * (2 * d + 2 * dv),
          transcendentals=visited * bq * bkv,
          bytes_accessed=b * hkv * s * 2 * (d + dv) * itemsize
          + visited * bq * (d + dv) * itemsize + visited * bq * 8),
      interpret=interpret_params(interpret),
      name="block_sparse_attention_dkv_tpu",
  )(*args)


__all__ = ["bsa_fwd_tpu", "bsa_dq_tpu", "bsa_dkv_tpu", "MASK_VALUE"]
