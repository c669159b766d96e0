"""NSA selection branch: GPU (Pallas Triton) kernels (forward, dq, dk/dv) — group-centric.

Layout (built by the package wrapper): q [B, T, Hkv, Gp, D] with the G query heads of a
kv group padded with zero rows to Gp = max(16, next power of two ≥ G) (`pl.dot` needs
≥ 16 rows), k [B, Hkv, S, D], v [B, Hkv, S, Dv] (S a multiple of l'). Triton has no
scalar prefetch: the tables are flat int32 whole-array inputs read inside the kernel:
    sel [B·T·Hkv·n] selected block id per (token, kv head, slot), -1 for invalid slots;
    pos [B·T] query positions;
    inverse CSR (dk/dv only): tokens [B·Hkv·T·n] — for kv block j of (b, c) the
    tokens that selected it, ascending, are one run of its (b, c) part (built in XLA by
    a stable argsort of the block ids; no sort inside kernels);
    chunk list (dk/dv only, `__init__.chunk_list`, a cumsum, a scatter and a cummax in
    XLA): every block's run cut into chunks of at most C = chunk_tokens entries, W
    items per (b, c) in (block, chunk) order, as blocks / begins / ends [B·Hkv·W]
    (block −1 past the pair's total) and bounds [B·Hkv·(ns + 1)] (block j owns items
    bounds[j] … bounds[j + 1] − 1).
l', D and Dv are powers of two ≥ 16; C a power of two; tile_rows a power of two ≥ 16.

Forward (`nsa_fwd_gpu`): grid (B, T, Hkv), one program per (token, kv head): loads the
[Gp, D] query rows of the group once, `lax.fori_loop` over the n slots: block id from
`sel`, K/V block [l', D] / [l', Dv], s = scale·q·kᵀ [Gp, l'], mask (slot valid, key ≤ pos,
key < S: causal inside the current block), online softmax in registers. Out
[B, T, Hkv, Gp, Dv] and LSE [B, T, Hkv, Gp] (+0.7·f32max for rows with no allowed key,
whose output is 0) are stored once.
dq (`nsa_dq_gpu`): token-centric, the same loop; dq = scale·Σ p ⊙ (do·vᵀ − di)·k.
dk/dv (`nsa_dkv_gpu`), two kernels, no atomics (deterministic):
  chunks — grid (B, Hkv, W), one program per listed (kv block, chunk): the K/V block
    is loaded once, then a dynamic `fori_loop` over ⌈(end − begin)/Tt⌉ steps of Tt
    tokens: the R = Tt·Gq rows (token, head) with Gq = next power of two ≥ G
    (`dkv_tile`: Tt = tile_rows/Gq) are gathered from q, do, LSE, di and pos by token
    id (rows past the chunk's end or of heads ≥ G are masked), p and ds [R, l'] are
    recomputed, dk += dsᵀ·q, dv += pᵀ·do accumulate in f32 registers (the GQA group
    sum inside the matmul) and are stored once as the chunk's partials
    [B, Hkv, W, l', D] / [.., Dv] f32; items past the total exit at once. Defaults
    (`default_tile_rows`, dkv_num_warps 8) from ptxas's static report for sm_90a at
    D = Dv = 128, l' = 64, G = 16 (not timed on a device): bf16 128 rows, 8 warps:
    204 registers, 112 KiB shared memory, no spills (4 warps spill at every tile
    size, as did the former one-token kernel); f32 (HIGHEST: IEEE FMA dots) 16 rows,
    8 warps: 221 registers, 84 KiB, no spills (32+ rows spill 1.5–125 KB).
    To time on a device: tile_rows {16, 32, 64, 128} × dkv_num_warps {4, 8} ×
    chunk_tokens {64, 128, 256, 512}.
  sum — grid (B, Hkv, ns): block j adds its chunks' partials in list order (f32),
    dk = scale·Σ, both cast once; a block nobody selected gets exactly 0.

Roofline: per (token, kv head) the forward reads n·l'·(D + Dv)·b bytes of K/V for
2·G·n·l'·(D + Dv) useful FLOPs: arithmetic intensity ≈ G FLOP/byte (bf16: 2·G/2 = G), far
below the ~300 FLOP/byte an H100 needs, so this kernel is memory-bound and relies on
L2 hits when neighbouring tokens select the same blocks (programs for consecutive t run
together; NSA's forced initial/local blocks are shared by every token). No K/V reuse
is made explicit in registers/SMEM (reuse factor 1 across tokens, G across heads). The
Gp padding wastes Gp/G of the tensor-core FLOPs (8× for G = 2), harmless at this
intensity. dk/dv: each chunk program reads its K/V block once and the G real rows of
q, do per list entry: bytes ≈ Σ_entries G·(D + Dv)·b (Gq/G rows wasted in the
matmuls only when G is not a power of two), the same G FLOP/byte, plus the f32
partials written once and read once: 2·B·Hkv·W'·l'·(D + Dv)·4 for W' live chunks,
W' ≤ W = ⌊(T·n + ns·(C − 1))/C⌋ (allocated: B·Hkv·W·l'·(D + Dv)·4 ≈ n·l'/C times an
f32 dk/dv). A kernel takes as long as its longest serial walk: NSA forces the
initial block (and the local ones) for every token, so block 0's list holds all T
tokens. Example B 1, T = S = 32k, Hq 64, Hkv 4 (G 16), n 16, l' 64, D = Dv 128, bf16,
C 256, 128-row tiles (Tt 8), NSA's causal selection of random scores
(tests/kernels/test_nsa_kernel.py): the former one-program-per-block kernel had a grid
of 4·512 = 2,048 programs and block 0's walked 32,768 tokens one per step; now the
chunk kernel has 4·2,558 programs (2,262 live per pair) of at most 32 steps of 8
tokens, the sum kernel 2,048 programs of at most 32,768/256 = 128 adds of an
[l', D + Dv] f32 tile; partial traffic 2·4·2,262·64·256·4 B ≈ 1.2 GB next to the
≈ 17 GB of gathered q, do rows (+7%), 0.67 GB of f32 partials allocated.
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


def default_tile_rows(dtype) -> int:
  """Default dk/dv tile rows: 128 for 2-byte inputs, 16 for float32 (whose HIGHEST dots
  are FMA loops: ptxas spills at 32+ rows with D = 128, l' = 64, 8 warps)."""
  return 128 if jnp.dtype(dtype).itemsize <= 2 else 16


def dkv_tile(group: int, tile_rows: int, chunk_tokens: int) -> tuple[int, int]:
  """(Tt tokens per inner dk/dv step, Gq = next power of two >= G rows per token): the
  step is an [Tt·Gq, ·] matmul tile; Tt = tile_rows // Gq, at most chunk_tokens, at
  least 1 and enough for the 16 rows `pl.dot` needs (excess rows are masked)."""
  gq = 1 << (group - 1).bit_length()
  return max(min(tile_rows // gq, chunk_tokens), -(-16 // gq), 1), gq


def _dkv_kernel(blk_ref, beg_ref, end_ref, tok_ref, pos_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, di_ref, pdk_ref, pdv_ref, *, scale, lsel, s_len, t_len, n, hkv,
                width, group, gq, tile):
  b, c, w = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  item = (b * hkv + c) * width + w
  j = blk_ref[item]

  @pl.when(j >= 0)
  def _chunk():
    e0, e1 = beg_ref[item], end_ref[item]
    cols = pl.ds(j * lsel, lsel)
    k, v = k_ref[b, c, cols, :], v_ref[b, c, cols, :]
    key = (j * lsel + jnp.arange(lsel, dtype=jnp.int32))[None, :]
    r = jnp.arange(tile * gq, dtype=jnp.int32)           # row = token-in-tile · Gq + head
    r_tok, r_head = lax.div(r, jnp.int32(gq)), lax.rem(r, jnp.int32(gq))
    tbase = (b * hkv + c) * (t_len * n)

    def body(i, carry):
      dk, dv = carry
      e = e0 + i * tile + r_tok                              # list entries of the rows
      t = tok_ref[tbase + jnp.minimum(e, e1 - 1)]            # [R] token ids (gather)
      q, do = q_ref[b, t, c, r_head, :], do_ref[b, t, c, r_head, :]     # [R, D], [R, Dv]
      lse, di = lse_ref[b, t, c, r_head], di_ref[b, t, c, r_head]
      p_t = pos_ref[b * t_len + t]
      allowed = (((e < e1) & (r_head < group))[:, None] & (key <= p_t[:, None])
                 & (key < s_len))
      p = jnp.where(allowed, jnp.exp(dot(q, k.T) * scale - lse[:, None]), 0.0)
      dv = dv + dot(p.astype(do.dtype).T, do)
      ds = p * (dot(do, v.T) - di[:, None])
      return dk + dot(ds.astype(q.dtype).T, q), dv

    steps = lax.div(e1 - e0 + tile - 1, jnp.int32(tile))
    dk, dv = lax.fori_loop(0, steps, body, (jnp.zeros(k.shape, jnp.float32),
                                            jnp.zeros(v.shape, jnp.float32)))
    pdk_ref[b, c, w, :, :] = dk
    pdv_ref[b, c, w, :, :] = dv


def _dkv_sum_kernel(bnd_ref, pdk_ref, pdv_ref, dk_ref, dv_ref, *, scale, lsel, nb, hkv):
  b, c, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  base = (b * hkv + c) * (nb + 1) + j
  cols = pl.ds(j * lsel, lsel)

  def body(w, carry):                  # the block's chunks in list order: deterministic
    return carry[0] + pdk_ref[b, c, w, :, :], carry[1] + pdv_ref[b, c, w, :, :]

  dk, dv = lax.fori_loop(bnd_ref[base], bnd_ref[base + 1], body,
                         (jnp.zeros((lsel, dk_ref.shape[-1]), jnp.float32),
                          jnp.zeros((lsel, dv_ref.shape[-1]), jnp.float32)))
  dk_ref[b, c, cols, :] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[b, c, cols, :] = dv.astype(dv_ref.dtype)


def nsa_dkv_gpu(q, k, v, d_out, lse, di, pos, tokens, blocks, begins, ends, bounds, *,
                scale, select_block, seq_len, num_selected, group, chunk_tokens=256,
                tile_rows=None, interpret=False, num_warps=4, dkv_num_warps=8):
  """(dk [B, Hkv, S, D], dv [B, Hkv, S, Dv]) from the inverse CSR `tokens` and its
  chunk list (`blocks`, `begins`, `ends` [B·Hkv·W], `bounds` [B·Hkv·(ns + 1)]): one
  program per listed chunk writes f32 partials [B, Hkv, W, l', D|Dv], a second kernel
  sums each block's chunks in list order (module docstring). tile_rows None:
  `default_tile_rows`; the chunk kernel runs with dkv_num_warps, the sum with
  num_warps."""
  b, t, hkv, gp, d = q.shape
  s, dv, lsel = k.shape[2], v.shape[3], select_block
  nb, width = s // lsel, blocks.shape[0] // (b * hkv)
  tile_rows = default_tile_rows(q.dtype) if tile_rows is None else tile_rows
  tile, gq = dkv_tile(group, tile_rows, chunk_tokens)
  visits = b * t * hkv * num_selected
  itemsize = q.dtype.itemsize
  args = (blocks, begins, ends, tokens, pos, q, k, v, d_out, lse, di)
  part = b * hkv * width * lsel * (d + dv) * 4
  pdk, pdv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, lsel=lsel, s_len=seq_len, t_len=t,
                        n=num_selected, hkv=hkv, width=width, group=group, gq=gq,
                        tile=tile),
      grid=(b, hkv, width),
      out_shape=[out_struct((b, hkv, width, lsel, d), jnp.float32, *args),
                 out_struct((b, hkv, width, lsel, dv), jnp.float32, *args)],
      compiler_params=triton_params(dkv_num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * visits * group * lsel * (2 * d + 2 * dv),
          transcendentals=visits * group * lsel,
          bytes_accessed=b * hkv * width * lsel * (d + dv) * itemsize
          + visits * group * ((d + dv) * itemsize + 8) + visits * 8 + part),
      interpret=interpret,
      name="nsa_selection_dkv_gpu",
  )(*args)
  args = (bounds, pdk, pdv)
  return pl.pallas_call(
      functools.partial(_dkv_sum_kernel, scale=scale, lsel=lsel, nb=nb, hkv=hkv),
      grid=(b, hkv, nb),
      out_shape=[out_struct((b, hkv, s, d), k.dtype, *args),
                 out_struct((b, hkv, s, dv), v.dtype, *args)],
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=b * hkv * width * lsel * (d + dv), transcendentals=0,
          bytes_accessed=part + b * hkv * s * (d + dv) * itemsize),
      interpret=interpret,
      name="nsa_selection_dkv_sum_gpu",
  )(*args)


__all__ = ["nsa_fwd_gpu", "nsa_dq_gpu", "nsa_dkv_gpu", "dkv_tile", "default_tile_rows"]
