"""NSA selection branch: GPU (Pallas Triton) kernels (forward, dq, dk/dv) — group-centric.

Layout (built by the package wrapper): q [B, T, Hkv, Gp, D] with the G query heads of a
kv group padded with zero rows to Gp = max(16, next power of two ≥ G) (`pl.dot` needs
≥ 16 rows), k [B, Hkv, S, D], v [B, Hkv, S, Dv] (S a multiple of l'). Triton has no
scalar prefetch: the tables are flat int32 whole-array inputs read inside the kernel:
    sel [B·T·Hkv·n] selected block id per (token, kv head, slot), -1 for invalid slots;
    pos [B·T] query positions;
    inverse CSR (dk/dv only): offsets [B·Hkv·(ns + 1)] and tokens [B·Hkv·T·n] — for kv
    block j of (b, c) the tokens that selected it are tokens[off[j] : off[j + 1]]
    (built in XLA by a stable argsort of the block ids; no sort inside kernels).
l', D and Dv are powers of two ≥ 16.

Forward (`nsa_fwd_gpu`): grid (B, T, Hkv), one program per (token, kv head): loads the
[Gp, D] query rows of the group once, `lax.fori_loop` over the n slots: block id from
`sel`, K/V block [l', D] / [l', Dv], s = scale·q·kᵀ [Gp, l'], mask (slot valid, key ≤ pos,
key < S: causal inside the current block), online softmax in registers. Out
[B, T, Hkv, Gp, Dv] and LSE [B, T, Hkv, Gp] (+0.7·f32max for rows with no allowed key,
whose output is 0) are stored once.
dq (`nsa_dq_gpu`): token-centric, the same loop; dq = scale·Σ p ⊙ (do·vᵀ − di)·k.
dk/dv (`nsa_dkv_gpu`): grid (B, Hkv, ns), one program per kv block: K/V block loaded
once, dynamic `fori_loop` over the tokens of the inverse CSR that selected it; per token
p and ds [Gp, l'] are recomputed from q, do, LSE, di and dk += dsᵀ·q, dv += pᵀ·do
accumulate in registers (GQA group sum inside the matmul) and are stored once — no
atomics, no [T, n, l', D] intermediate.

Roofline: per (token, kv head) the forward reads n·l'·(D + Dv)·b bytes of K/V for
2·G·n·l'·(D + Dv) useful FLOPs: arithmetic intensity ≈ G FLOP/byte (bf16: 2·G/2 = G), far
below the ~300 FLOP/byte an H100 needs, so this kernel is memory-bound and relies on
L2 hits when neighbouring tokens select the same blocks (programs for consecutive t run
together; NSA's forced initial/local blocks are shared by every token). No K/V reuse
is made explicit in registers/SMEM (reuse factor 1 across tokens, G across heads). The
Gp padding wastes Gp/G of the tensor-core FLOPs (8× for G = 2), harmless at this
intensity. dk/dv: per kv block K/V are read once and q, do are re-read once per
selecting token: bytes ≈ Σ_tokens n·Gp·(D + Dv)·b, the same G FLOP/byte.
"""

from __future__ import annotations

import functools

from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Triton compiler params and the f32 HIGHEST matmul of the block-sparse kernels.
from pallas_kernels._common import EMPTY_LSE, MASK_VALUE, dot
from pallas_kernels._common import out_struct, triton_params


def _keys_allowed(blk, p_t, lsel, s_len):
  """bool [l']: block valid (id ≥ 0), key ≤ query position, key < S."""
  key = jnp.maximum(blk, 0) * lsel + jnp.arange(lsel, dtype=jnp.int32)
  return (blk >= 0) & (key <= p_t) & (key < s_len)


def _fwd_kernel(sel_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, lsel,
                s_len, n, t_len, hkv):
  b, t, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q = q_ref[b, t, c, :, :]                                            # [Gp, D]
  p_t = pos_ref[b * t_len + t]
  base = ((b * t_len + t) * hkv + c) * n
  gp, dv = q.shape[0], v_ref.shape[-1]

  def body(jj, carry):
    acc, m_prev, l_prev = carry
    blk = sel_ref[base + jj]
    rows = pl.ds(jnp.maximum(blk, 0) * lsel, lsel)
    k, v = k_ref[b, c, rows, :], v_ref[b, c, rows, :]
    allowed = _keys_allowed(blk, p_t, lsel, s_len)[None, :]
    s = jnp.where(allowed, dot(q, k.T) * scale, MASK_VALUE)          # [Gp, l']
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
    p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l_prev + jnp.sum(p, axis=-1)

  init = (jnp.zeros((gp, dv), jnp.float32), jnp.full((gp,), MASK_VALUE, jnp.float32),
          jnp.zeros((gp,), jnp.float32))
  acc, m, l = lax.fori_loop(0, n, body, init)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[b, t, c, :, :] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[b, t, c, :] = jnp.where(empty, EMPTY_LSE, m + jnp.log(safe_l))


def nsa_fwd_gpu(q, k, v, sel, pos, *, scale, select_block, seq_len, num_selected,
                interpret=False, num_warps=4):
  """Forward -> (out [B, T, Hkv, Gp, Dv] q.dtype, lse f32 [B, T, Hkv, Gp])."""
  b, t, hkv, gp, d = q.shape
  dv, n, lsel = v.shape[3], num_selected, select_block
  itemsize = q.dtype.itemsize
  args = (sel, pos, q, k, v)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, lsel=lsel, s_len=seq_len, n=n,
                        t_len=t, hkv=hkv),
      grid=(b, t, hkv),
      out_shape=[out_struct((b, t, hkv, gp, dv), q.dtype, *args),
                 out_struct((b, t, hkv, gp), jnp.float32, *args)],
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * b * t * hkv * gp * n * lsel * (d + dv),
          transcendentals=b * t * hkv * gp * n * lsel,
          bytes_accessed=b * t * hkv * (gp * (d + dv) + n * lsel * (d + dv)) * itemsize),
      interpret=interpret,
      name="nsa_selection_fwd_gpu",
  )(*args)


def _dq_kernel(sel_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, *,
               scale, lsel, s_len, n, t_len, hkv):
  b, t, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q, do = q_ref[b, t, c, :, :], do_ref[b, t, c, :, :]
  lse, di = lse_ref[b, t, c, :], di_ref[b, t, c, :]
  p_t = pos_ref[b * t_len + t]
  base = ((b * t_len + t) * hkv + c) * n

  def body(jj, dq):
    blk = sel_ref[base + jj]
    rows = pl.ds(jnp.maximum(blk, 0) * lsel, lsel)
    k, v = k_ref[b, c, rows, :], v_ref[b, c, rows, :]
    allowed = _keys_allowed(blk, p_t, lsel, s_len)[None, :]
    p = jnp.where(allowed, jnp.exp(dot(q, k.T) * scale - lse[:, None]), 0.0)
    ds = p * (dot(do, v.T) - di[:, None])
    return dq + dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, n, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[b, t, c, :, :] = (dq * scale).astype(dq_ref.dtype)


def nsa_dq_gpu(q, k, v, d_out, lse, di, sel, pos, *, scale, select_block, seq_len,
               num_selected, interpret=False, num_warps=4):
  """dq [B, T, Hkv, Gp, D] (q.dtype); lse, di f32 [B, T, Hkv, Gp]."""
  b, t, hkv, gp, d = q.shape
  dv, n, lsel = v.shape[3], num_selected, select_block
  itemsize = q.dtype.itemsize
  args = (sel, pos, q, k, v, d_out, lse, di)
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, lsel=lsel, s_len=seq_len, n=n,
                        t_len=t, hkv=hkv),
      grid=(b, t, hkv),
      out_shape=out_struct((b, t, hkv, gp, d), q.dtype, *args),
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * b * t * hkv * gp * n * lsel * (2 * d + dv),
          transcendentals=b * t * hkv * gp * n * lsel,
          bytes_accessed=b * t * hkv * (gp * (2 * d + dv) + n * lsel * (d + dv))
          * itemsize),
      interpret=interpret,
      name="nsa_selection_dq_gpu",
  )(*args)


def _dkv_kernel(off_ref, tok_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref, *, scale, lsel, s_len, nb, t_len, n, hkv):
  b, c, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(j * lsel, lsel)
  k, v = k_ref[b, c, cols, :], v_ref[b, c, cols, :]
  obase = (b * hkv + c) * (nb + 1) + j
  tbase = (b * hkv + c) * (t_len * n)

  def body(e, carry):
    dk, dv = carry
    t = tok_ref[tbase + e]
    q, do = q_ref[b, t, c, :, :], do_ref[b, t, c, :, :]
    lse, di = lse_ref[b, t, c, :], di_ref[b, t, c, :]
    allowed = _keys_allowed(j, pos_ref[b * t_len + t], lsel, s_len)[None, :]
    p = jnp.where(allowed, jnp.exp(dot(q, k.T) * scale - lse[:, None]), 0.0)
    dv = dv + dot(p.astype(do.dtype).T, do)
    ds = p * (dot(do, v.T) - di[:, None])
    return dk + dot(ds.astype(q.dtype).T, q), dv

  dk, dv = lax.fori_loop(off_ref[obase], off_ref[obase + 1], body,
                         (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
  dk_ref[b, c, cols, :] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[b, c, cols, :] = dv.astype(dv_ref.dtype)


def nsa_dkv_gpu(q, k, v, d_out, lse, di, pos, offsets, tokens, *, scale, select_block,
                seq_len, num_selected, interpret=False, num_warps=4):
  """(dk [B, Hkv, S, D], dv [B, Hkv, S, Dv]) from the inverse CSR (offsets, tokens)."""
  b, t, hkv, gp, d = q.shape
  s, dv, lsel = k.shape[2], v.shape[3], select_block
  nb = s // lsel
  visits = b * t * hkv * num_selected
  itemsize = q.dtype.itemsize
  args = (offsets, tokens, pos, q, k, v, d_out, lse, di)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, lsel=lsel, s_len=seq_len, nb=nb,
                        t_len=t, n=num_selected, hkv=hkv),
      grid=(b, hkv, nb),
      out_shape=[out_struct((b, hkv, s, d), k.dtype, *args),
                 out_struct((b, hkv, s, dv), v.dtype, *args)],
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * visits * gp * lsel * (2 * d + 2 * dv),
          transcendentals=visits * gp * lsel,
          bytes_accessed=b * hkv * s * 2 * (d + dv) * itemsize
          + visits * gp * (d + dv) * itemsize + visits * (gp * 8 + 8)),
      interpret=interpret,
      name="nsa_selection_dkv_gpu",
  )(*args)


__all__ = ["nsa_fwd_gpu", "nsa_dq_gpu", "nsa_dkv_gpu"]
