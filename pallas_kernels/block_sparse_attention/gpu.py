"""Block-sparse flash attention: GPU (Pallas Triton) kernels (forward, dq, dk/dv).

Layout q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]; query head h reads kv
head h // G. Triton has no scalar prefetch: the per-slot CSR tables (block id, kind,
tile index; flattened int32) and the partial tiles [P, bq, bkv] (int32) are ordinary
whole-array inputs read inside the kernel. Block sizes and D, Dv are powers of two
>= 16 (`pl.dot` tiles). All operands are whole-array refs indexed with `pl.ds`.

Forward (`bsa_fwd_gpu`): grid (B, Hq, nq), one q block per program. It loads the
q tile once, then `lax.fori_loop` over its kv_counts[h, i] non-empty kv blocks: load
the block id, the K/V tiles, s = scale·q·kᵀ, and `lax.cond` on the slot kind — full
blocks run the unmasked online-softmax update, partial blocks load their stored tile
and mask. Output and LSE [B, Hq, T] (f32; +0.7·f32max for rows with no allowed key,
whose output is 0) are stored once.

dq (`bsa_dq_gpu`): grid (B, Hq, nq), the same loop; dq = scale·Σ p ⊙ (do·vᵀ - di)·k.
dk/dv (`bsa_dkv_gpu`): grid (B, Hkv, nkv): K/V tiles loaded once; loops over the G query
heads of the group (fori_loop) and, per head, over q_counts[h, j] q blocks of the
transposed CSR; dk, dv accumulate in registers (the GQA group sum inside the kernel)
and are stored once.

Roofline: see the package docstring. Per visited block the forward reads
bkv·(D + Dv)·b bytes of K/V (+ bq·bkv·4 for a partial tile) for 2·bq·bkv·(D + Dv)
FLOPs, i.e. arithmetic intensity ≈ bq FLOP/byte in bf16 (≥ 64 needed on H100).

Tuning (per call, through `block_sparse_attention_kernel`): blocks default to 128 × 64
(`sizing.default_blocks`); `num_warps` to 4 for tiles of ≤ 64·64 elements, else 8;
`num_stages` to 2 (Triton's software pipeliner may then issue the loads of the next
iteration of each kernel's block loop — block id, K/V tiles; dk/dv: q, do, LSE, di —
while the current block computes; loads under the partial-tile `lax.cond` stay
unpipelined; 1 turns pipelining off, as before); `precision` applies to f32 operands
only — HIGHEST (IEEE f32, exact against the f32 reference, the default) or
lax.Precision.DEFAULT (TF32 tensor cores, ~1e-3 relative error); bf16 operands always
run natively with f32 accumulation (p and ds are cast to the value dtype for their
matmuls). None of these has been timed yet (no GPU run recorded).
Sweep to time on device (`make device-check`'s attention shapes: bf16, causal, T = 8k,
Hq 8, Hkv 2, D = 128), forward and backward separately: num_stages ∈ {1, 2, 3, 4} ×
num_warps ∈ {4, 8} at blocks 128 × 64, then 64 × 64 and 128 × 128 at the best pair;
shared memory per stage is about (bkv·(D + Dv) + bq·bkv·4/b [partial tile, int32]) · b
bytes (+ bq·(D + Dv)·b in dk/dv), which bounds num_stages (H100: 228 KiB per SM).
"""

from __future__ import annotations

import functools

from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import EMPTY_LSE, HIGHEST, MASK_VALUE, dot
from pallas_kernels._common import out_struct, triton_params
from pallas_kernels.block_sparse_attention.tpu import FULL

NUM_STAGES = 2                  # default Triton pipeline depth of the block loops


def _mhead(h, per_head):
  return h if per_head else 0


def _fwd_kernel(blk_ref, cnt_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, pm_ref, o_ref,
                lse_ref, *, scale, g, nq, m_slots, per_head, bq, bkv, prec):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  c = lax.div(h, g)
  row = _mhead(h, per_head) * nq + i
  q = q_ref[b, h, pl.ds(i * bq, bq), :]
  dv = v_ref.shape[-1]

  def body(jj, carry):
    acc, m_prev, l_prev = carry
    slot = row * m_slots + jj
    j = blk_ref[slot]
    k = k_ref[b, c, pl.ds(j * bkv, bkv), :]
    v = v_ref[b, c, pl.ds(j * bkv, bkv), :]
    s = dot(q, k.T, prec) * scale

    def full(s):
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
      return m_new, jnp.exp(s - m_new[:, None])

    def partial(s):
      allowed = pm_ref[tile_ref[slot], :, :] != 0
      s = jnp.where(allowed, s, MASK_VALUE)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
      return m_new, jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)

    m_new, p = lax.cond(kind_ref[slot] == FULL, full, partial, s)
    alpha = jnp.exp(m_prev - m_new)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, prec)
    return acc, m_new, alpha * l_prev + jnp.sum(p, axis=-1)

  init = (jnp.zeros((bq, dv), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, cnt_ref[row], body, init)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[b, h, pl.ds(i * bq, bq), :] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[b, h, pl.ds(i * bq, bq)] = jnp.where(empty, EMPTY_LSE, m + jnp.log(safe_l))


def _num_warps(bq, bkv):
  return 4 if bq * bkv <= 64 * 64 else 8


def _params(bq, bkv, num_warps, num_stages):
  return triton_params(num_warps or _num_warps(bq, bkv),
                       NUM_STAGES if num_stages is None else num_stages)


def bsa_fwd_gpu(q, k, v, kv_blocks, kv_counts, slot_kind, slot_tile, tiles, *, scale,
                block_q, block_kv, interpret=False, num_warps=None, num_stages=None,
                precision=HIGHEST):
  """Forward: -> (out [B, Hq, T, Dv] q.dtype, lse f32 [B, Hq, T]). No autodiff."""
  b, hq, t, d = q.shape
  hkv, dv = k.shape[1], v.shape[3]
  hm, nq, m_slots = kv_blocks.shape
  visited = b * hq * nq * m_slots
  itemsize = q.dtype.itemsize
  args = (kv_blocks.reshape(-1), kv_counts.reshape(-1), slot_kind.reshape(-1),
          slot_tile.reshape(-1), q, k, v, tiles)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, g=hq // hkv, nq=nq, m_slots=m_slots,
                        per_head=hm > 1, bq=block_q, bkv=block_kv, prec=precision),
      grid=(b, hq, nq),
      out_shape=[out_struct((b, hq, t, dv), q.dtype, *args),
                 out_struct((b, hq, t), jnp.float32, *args)],
      compiler_params=_params(block_q, block_kv, num_warps, num_stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * block_q * block_kv * (d + dv),
          transcendentals=visited * block_q * block_kv,
          bytes_accessed=b * hq * t * (d + dv) * itemsize
          + visited * block_kv * (d + dv) * itemsize + b * hq * t * 4),
      interpret=interpret,
      name="block_sparse_attention_fwd_gpu",
  )(*args)


def _probs(q, k, lse, tile, kind, pm_ref, scale, prec):
  s = dot(q, k.T, prec) * scale
  p = jnp.exp(s - lse[:, None])
  return lax.cond(kind == FULL, lambda p: p,
                  lambda p: jnp.where(pm_ref[tile, :, :] != 0, p, 0.0), p)


def _dq_kernel(blk_ref, cnt_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               di_ref, pm_ref, dq_ref, *, scale, g, nq, m_slots, per_head, bq, bkv,
               prec):
  b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  c = lax.div(h, g)
  row = _mhead(h, per_head) * nq + i
  rows = pl.ds(i * bq, bq)
  q, do = q_ref[b, h, rows, :], do_ref[b, h, rows, :]
  lse, di = lse_ref[b, h, rows], di_ref[b, h, rows]

  def body(jj, dq):
    slot = row * m_slots + jj
    j = blk_ref[slot]
    k = k_ref[b, c, pl.ds(j * bkv, bkv), :]
    v = v_ref[b, c, pl.ds(j * bkv, bkv), :]
    p = _probs(q, k, lse, tile_ref[slot], kind_ref[slot], pm_ref, scale, prec)
    ds = p * (dot(do, v.T, prec) - di[:, None])
    return dq + dot(ds.astype(k.dtype), k, prec)

  dq = lax.fori_loop(0, cnt_ref[row], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[b, h, rows, :] = (dq * scale).astype(dq_ref.dtype)


def bsa_dq_gpu(q, k, v, d_out, lse, di, kv_blocks, kv_counts, slot_kind, slot_tile,
               tiles, *, scale, block_q, block_kv, interpret=False, num_warps=None,
               num_stages=None, precision=HIGHEST):
  """dq [B, Hq, T, D] (q.dtype) from d_out, lse f32 [B, Hq, T], di f32 [B, Hq, T]."""
  b, hq, t, d = q.shape
  hkv, dv = k.shape[1], v.shape[3]
  hm, nq, m_slots = kv_blocks.shape
  visited = b * hq * nq * m_slots
  itemsize = q.dtype.itemsize
  args = (kv_blocks.reshape(-1), kv_counts.reshape(-1), slot_kind.reshape(-1),
          slot_tile.reshape(-1), q, k, v, d_out, lse, di, tiles)
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, g=hq // hkv, nq=nq, m_slots=m_slots,
                        per_head=hm > 1, bq=block_q, bkv=block_kv, prec=precision),
      grid=(b, hq, nq),
      out_shape=out_struct((b, hq, t, d), q.dtype, *args),
      compiler_params=_params(block_q, block_kv, num_warps, num_stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * block_q * block_kv * (2 * d + dv),
          transcendentals=visited * block_q * block_kv,
          bytes_accessed=b * hq * t * (2 * d + dv) * itemsize
          + visited * block_kv * (d + dv) * itemsize + b * hq * t * 8),
      interpret=interpret,
      name="block_sparse_attention_dq_gpu",
  )(*args)


def _dkv_kernel(blk_ref, cnt_ref, kind_ref, tile_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, di_ref, pm_ref, dk_ref, dv_ref, *, scale, g, nkv, m_slots,
                per_head, bq, bkv, prec):
  b, c, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(j * bkv, bkv)
  k, v = k_ref[b, c, cols, :], v_ref[b, c, cols, :]

  def head(gi, carry):
    h = c * g + gi
    row = _mhead(h, per_head) * nkv + j

    def body(tt, carry):
      dk, dv = carry
      slot = row * m_slots + tt
      rows = pl.ds(blk_ref[slot] * bq, bq)
      q, do = q_ref[b, h, rows, :], do_ref[b, h, rows, :]
      p = _probs(q, k, lse_ref[b, h, rows], tile_ref[slot], kind_ref[slot], pm_ref, scale,
                 prec)
      dv = dv + dot(p.astype(do.dtype).T, do, prec)
      ds = p * (dot(do, v.T, prec) - di_ref[b, h, rows][:, None])
      return dk + dot(ds.astype(q.dtype).T, q, prec), dv

    return lax.fori_loop(0, cnt_ref[row], body, carry)

  dk, dv = lax.fori_loop(0, g, head, (jnp.zeros(k.shape, jnp.float32),
                                      jnp.zeros(v.shape, jnp.float32)))
  dk_ref[b, c, cols, :] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[b, c, cols, :] = dv.astype(dv_ref.dtype)


def bsa_dkv_gpu(q, k, v, d_out, lse, di, q_blocks, q_counts, slot_kind, slot_tile, tiles,
                *, scale, block_q, block_kv, interpret=False, num_warps=None,
                num_stages=None, precision=HIGHEST):
  """(dk [B, Hkv, S, D] k.dtype, dv [B, Hkv, S, Dv] v.dtype), GQA group summed."""
  b, hq, t, d = q.shape
  hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
  hm, nkv, m_slots = q_blocks.shape
  visited = b * hq * nkv * m_slots
  itemsize = q.dtype.itemsize
  args = (q_blocks.reshape(-1), q_counts.reshape(-1), slot_kind.reshape(-1),
          slot_tile.reshape(-1), q, k, v, d_out, lse, di, tiles)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, g=hq // hkv, nkv=nkv, m_slots=m_slots,
                        per_head=hm > 1, bq=block_q, bkv=block_kv, prec=precision),
      grid=(b, hkv, nkv),
      out_shape=[out_struct((b, hkv, s, d), k.dtype, *args),
                 out_struct((b, hkv, s, dv), v.dtype, *args)],
      compiler_params=_params(block_q, block_kv, num_warps, num_stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * block_q * block_kv * (2 * d + 2 * dv),
          transcendentals=visited * block_q * block_kv,
          bytes_accessed=b * hkv * s * 2 * (d + dv) * itemsize
          + visited * block_q * (d + dv) * itemsize + visited * block_q * 8),
      interpret=interpret,
      name="block_sparse_attention_dkv_gpu",
  )(*args)


__all__ = ["bsa_fwd_gpu", "bsa_dq_gpu", "bsa_dkv_gpu"]
