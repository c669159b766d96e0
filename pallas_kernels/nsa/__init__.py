"""NSA selection-branch kernels: TPU (Mosaic), GPU (Triton), with a custom_vjp.

`nsa_selection_kernel(q, k, v, block_idx, valid, select_block=l', ...)` computes the
selection branch of Native Sparse Attention (Yuan et al., arXiv 2502.11089):

    out[b, t, h] = Σ_s P[b, t, h, s] · v[b, s, h // G]
    P[b, t, h, :] = softmax_s(scale · q[b, t, h] · k[b, s, h // G] | allowed)
    allowed(t, s) ⇔ ∃ slot i: valid[b, t, c, i] ∧ ⌊s/l'⌋ = block_idx[b, t, c, i]
                    ∧ s ≤ pos[b, t] ∧ s < S                    (c = h // G)

in f32 (online softmax, finite mask value), output [B, T, Hq, Dv] in q.dtype; a row with
no allowed key gives exactly 0 output and zero gradients. Layout is the op's: q
[B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv], block_idx int [B, T, Hkv, n], valid
bool/int [B, T, Hkv, n] (shared by the G = Hq/Hkv query heads of a group). Query
positions: `q_positions` int [B, T] (default 0..T−1, training) — decode offsets and
arbitrary positions are supported by both backends (every mask is relative to pos).
Valid block ids must be distinct per (token, kv head) (as `select_blocks` returns);
ids outside [0, ⌈S/l'⌉) are treated as invalid. S need not be a multiple of l' (K/V
are zero-padded, padded keys are masked by s < S).

Backends (see `tpu.py` / `gpu.py` for the kernels and their rooflines):
  * gpu — group-centric: one program per (b, token, kv head) with the G heads as
    matmul rows (padded to ≥ 16), fori_loop over the n selected blocks; dq token-centric;
    dk/dv one program per kv block over an inverse CSR (kv block → tokens that selected
    it) built in XLA with a stable argsort.
  * tpu — query-tile union: tiles of Tq tokens × G heads (R = Tq·G rows); the sorted
    union of the tile's selected blocks is built in XLA (scatter into a
    [nT, ns] bool matrix → CSR padded by repeating the last entry) and
    scalar-prefetched; grid (B, Hkv, nT, M) with `pl.when` skipping padded steps; a
    per-row selection mask + causality inside the tile. dq over the same tables, dk/dv
    over the transposed union (kv block → tiles).

Backward (`jax.custom_vjp`): the forward saves out and LSE; di = Σ(do·out) in XLA; the
dq and dk/dv kernels recompute p = exp(s − LSE). The integer tables get no cotangent.

Roofline (useful; nnz = allowed (token, key) pairs per kv head, summed over b, c):
FLOPs_fwd = 2·G·nnz·(D + Dv), bwd ≈ 2.5×; bytes ideal = B·(Hq·T + Hkv·S)·(D + Dv)·b.
Without K/V reuse across tokens each loaded K/V byte serves only the G heads of one
token: intensity ≈ G FLOP/byte (memory-bound on every accelerator). The TPU tile union
raises it by the reuse factor Σ n_t / U (tokens of a tile sharing a block, up to Tq);
`union_stats` reports it for concrete indices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import BACKENDS, default_backend
from pallas_kernels.nsa.gpu import nsa_dkv_gpu, nsa_dq_gpu, nsa_fwd_gpu
from pallas_kernels._common import EMPTY_LSE, MASK_VALUE
from pallas_kernels.nsa.tpu import nsa_dkv_tpu, nsa_dq_tpu, nsa_fwd_tpu

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def default_block_q(t: int, g: int) -> int:
  """TPU tile tokens Tq: the largest divisor of T with Tq·G ≤ max(128, G) and Tq·G a
  multiple of 8 (Mosaic sublane tiling), else T."""
  for tq in range(t, 0, -1):
    if t % tq == 0 and tq * g <= max(128, g) and (tq * g) % 8 == 0:
      return tq
  return t


def _check(q, k, v, block_idx, valid, select_block, block_q, backend):
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D [batch, seq, heads, dim], got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  b, t, hq, d = q.shape
  if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape} do not match "
                     "q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv]")
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"q heads Hq={hq} must be a multiple of kv heads Hkv={hkv}")
  for x, name in ((q, "q"), (k, "k"), (v, "v")):
    if x.dtype not in [jnp.dtype(dt) for dt in SUPPORTED_DTYPES]:
      raise ValueError(f"{name} must be float32 or bfloat16, got {x.dtype}")
  if block_idx.ndim != 4 or block_idx.shape[:3] != (b, t, hkv):
    raise ValueError(f"block_idx shape {block_idx.shape} must be [B, T, Hkv, n] with "
                     f"[B, T, Hkv] = {(b, t, hkv)}")
  if valid.shape != block_idx.shape:
    raise ValueError(f"valid shape {valid.shape} must equal block_idx shape "
                     f"{block_idx.shape}")
  if not jnp.issubdtype(block_idx.dtype, jnp.integer):
    raise ValueError(f"block_idx must be integers, got {block_idx.dtype}")
  if not isinstance(select_block, int) or select_block < 1:
    raise ValueError(f"select_block={select_block!r} must be an int >= 1")
  if block_q is not None and (not isinstance(block_q, int) or block_q < 1 or t % block_q):
    raise ValueError(f"block_q={block_q!r} must be an int >= 1 dividing T={t}")
  if backend == "gpu":
    for name, n in (("select_block", select_block), ("D", d), ("Dv", v.shape[3])):
      if n < 16 or not _pow2(n):
        raise ValueError(f"{name}={n} must be a power of two >= 16 for the Triton "
                         "kernel (pl.dot tiles)")


def csr_from_bool(hit: jax.Array, width: int):
  """hit bool [..., R, C] -> (ids int32 [..., R, width] ascending, counts int32 [..., R]).

  Ids past the count repeat the last valid id (0 when the row is empty), so a TPU
  BlockSpec indexed by them issues no new DMA. `width` ≥ max count (static).
  """
  c = hit.shape[-1]
  col = jnp.arange(c, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(hit, col, c + col), axis=-1)[..., :width].astype(jnp.int32)
  counts = hit.sum(-1).astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], -1)
  slot = jnp.arange(width, dtype=jnp.int32)
  return jnp.where(slot < counts[..., None], order, last), counts


def union_tables(sel_bct: jax.Array, num_blocks: int, block_q: int):
  """sel_bct int32 [B, Hkv, T, n] (-1 = invalid) -> (hit bool [B, Hkv, nT, ns]: some
  token of tile i selected block j, forward CSR (blocks, counts), transposed CSR
  (tiles, counts))."""
  b, hkv, t, n = sel_bct.shape
  nt = t // block_q
  bi = jnp.arange(b)[:, None, None, None]
  ci = jnp.arange(hkv)[None, :, None, None]
  ti = (jnp.arange(t) // block_q)[None, None, :, None]
  col = jnp.where(sel_bct >= 0, sel_bct, num_blocks)
  hit = jnp.zeros((b, hkv, nt, num_blocks + 1), jnp.int32).at[bi, ci, ti, col].max(1)
  hit = hit[..., :num_blocks] > 0
  fwd = csr_from_bool(hit, max(1, min(num_blocks, block_q * n)))
  bwd = csr_from_bool(jnp.swapaxes(hit, 2, 3), nt)
  return hit, fwd, bwd


def union_stats(block_idx, valid, select_block: int, seq_len: int, block_q: int):
  """TPU K/V reuse for concrete indices: dict(selected = Σ_t n_t valid (token, block)
  pairs, visited = U union (tile, block) pairs, reuse = selected / visited (tokens served
  per loaded K/V block), row_efficiency = selected / (U · Tq))."""
  ns = -(-seq_len // select_block)
  idx = np.asarray(block_idx)
  ok = np.asarray(valid).astype(bool) & (idx >= 0) & (idx < ns)
  b, t, hkv, _ = idx.shape
  hit = np.zeros((b, hkv, t // block_q, ns + 1), bool)      # NumPy twin of union_tables
  bi, ti, ci, _ = np.indices(idx.shape)
  hit[bi, ci, ti // block_q, np.where(ok, idx, ns)] = True
  selected, visited = int(ok.sum()), int(hit[..., :ns].sum())
  return dict(selected=selected, visited=visited, reuse=selected / max(visited, 1),
              row_efficiency=selected / max(visited * block_q, 1))


def inverse_csr(sel_btc: jax.Array, num_blocks: int):
  """sel int32 [B, T, Hkv, n] (-1 invalid) -> (offsets int32 [B, Hkv, ns + 1], tokens
  int32 [B, Hkv, T·n]): the tokens that selected kv block j of (b, c) are
  tokens[b, c, offsets[b, c, j] : offsets[b, c, j + 1]] (ascending)."""
  b, t, hkv, n = sel_btc.shape
  key = jnp.moveaxis(sel_btc, 2, 1).reshape(b, hkv, t * n)
  key = jnp.where(key >= 0, key, num_blocks)
  order = jnp.argsort(key, axis=-1, stable=True)
  sorted_key = jnp.take_along_axis(key, order, -1)
  bounds = jnp.arange(num_blocks + 1, dtype=key.dtype)
  offsets = jax.vmap(jax.vmap(lambda s: jnp.searchsorted(s, bounds, side="left")))(
      sorted_key)
  return offsets.astype(jnp.int32), (order // n).astype(jnp.int32)


def nsa_selection_kernel(q, k, v, block_idx, valid, *, select_block: int,
                         scale: float | None = None, q_positions=None,
                         block_q: int | None = None, interpret=False,
                         backend: str | None = None, num_warps: int = 4):
  """NSA selection-branch attention, differentiable in q, k, v (module docstring).

  Args:
    q: [B, T, Hq, D]; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv] (float32 / bfloat16).
    block_idx: int [B, T, Hkv, n] selected block ids; valid: bool/int [B, T, Hkv, n].
    select_block: l' (static). GPU: l', D, Dv powers of two >= 16.
    scale: logit scale (static float; default 1/√D).
    q_positions: int [B, T] query positions (default 0..T−1).
    block_q: TPU tile tokens Tq (divides T; default `default_block_q`); GPU ignores it.
    interpret: interpret mode for CPU tests (True, or a `pltpu.InterpretParams`).
    backend: "tpu" or "gpu"; default by `jax.default_backend()`.
    num_warps: Triton warps (GPU).

  Returns:
    out [B, T, Hq, Dv] in q.dtype.
  """
  q, k, v = map(jnp.asarray, (q, k, v))
  block_idx, valid = jnp.asarray(block_idx), jnp.asarray(valid)
  backend = default_backend() if backend is None else backend
  _check(q, k, v, block_idx, valid, select_block, block_q, backend)
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  g, n, lsel = hq // hkv, block_idx.shape[3], select_block
  scale = float(1.0 / math.sqrt(d) if scale is None else scale)
  ns = -(-s_len // lsel)
  pad = ns * lsel - s_len
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  idx = block_idx.astype(jnp.int32)
  sel = jnp.where(valid.astype(bool) & (idx >= 0) & (idx < ns), idx, -1)  # [B,T,Hkv,n]
  if q_positions is None:
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  else:
    pos = jnp.asarray(q_positions).astype(jnp.int32)
    if pos.shape != (b, t):
      raise ValueError(f"q_positions shape {pos.shape} must be [B, T] {(b, t)}")
  kh = jnp.swapaxes(k, 1, 2)                                          # [B, Hkv, S', D]
  vh = jnp.swapaxes(v, 1, 2)
  kw = dict(scale=scale, select_block=lsel, seq_len=s_len)

  if backend == "tpu":
    tq = default_block_q(t, g) if block_q is None else block_q
    rows = tq * g
    sel_bct = jnp.swapaxes(sel, 1, 2)                                  # [B,Hkv,T,n]
    _, fwd_t, bwd_t = union_tables(sel_bct, ns, tq)
    tables = (jnp.repeat(sel_bct, g, axis=2), jnp.repeat(pos, g, axis=1)[..., None],
              fwd_t, bwd_t)
    kw.update(block_rows=rows, interpret=interpret)

    def to_kernel(q):   # [B, T, Hq, D] -> [B, Hkv, T·G, D]
      return q.reshape(b, t, hkv, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, -1)

    def from_kernel(o):
      return o.reshape(b, hkv, t, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, -1)

    def fwd(q, k, v, tab):
      return nsa_fwd_tpu(q, k, v, tab[0], tab[1], *tab[2], **kw)

    def bwd(q, k, v, do, lse, di, tab):
      dq = nsa_dq_tpu(q, k, v, do, lse, di[..., None], tab[0], tab[1], *tab[2], **kw)
      dk, dv = nsa_dkv_tpu(q, k, v, do, lse, di[..., None], tab[0], tab[1], *tab[3],
                           **kw)
      return dq, dk, dv
  else:
    gp = max(16, 1 << (g - 1).bit_length())
    offsets, tokens = inverse_csr(sel, ns)
    tables = (sel.reshape(-1), pos.reshape(-1), offsets.reshape(-1), tokens.reshape(-1))
    kw.update(num_selected=n, interpret=bool(interpret), num_warps=num_warps)

    def to_kernel(q):   # [B, T, Hq, D] -> [B, T, Hkv, Gp, D] (zero rows g >= G)
      q = q.reshape(b, t, hkv, g, -1)
      return jnp.pad(q, ((0, 0),) * 3 + ((0, gp - g), (0, 0)))

    def from_kernel(o):
      return o[:, :, :, :g].reshape(b, t, hq, -1)

    def fwd(q, k, v, tab):
      return nsa_fwd_gpu(q, k, v, tab[0], tab[1], **kw)

    def bwd(q, k, v, do, lse, di, tab):
      dq = nsa_dq_gpu(q, k, v, do, lse, di, tab[0], tab[1], **kw)
      dk, dv = nsa_dkv_gpu(q, k, v, do, lse, di, tab[1], tab[2], tab[3], **kw)
      return dq, dk, dv

  @jax.custom_vjp
  def attn(q, k, v, tab):
    return fwd(q, k, v, tab)[0]

  def attn_fwd(q, k, v, tab):
    out, lse = fwd(q, k, v, tab)
    return out, (q, k, v, out, lse, tab)

  def attn_bwd(res, d_out):
    q, k, v, out, lse, tab = res
    di = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
    dq, dk, dv = bwd(q, k, v, d_out.astype(q.dtype), lse, di, tab)
    return dq, dk, dv, None            # the integer tables get no cotangent

  attn.defvjp(attn_fwd, attn_bwd)
  out = from_kernel(attn(to_kernel(q), kh, vh, tables))
  return out


__all__ = ["nsa_selection_kernel", "nsa_fwd_tpu", "nsa_dq_tpu", "nsa_dkv_tpu",
           "nsa_fwd_gpu", "nsa_dq_gpu", "nsa_dkv_gpu", "union_tables", "union_stats",
           "inverse_csr", "csr_from_bool", "default_block_q", "BACKENDS", "MASK_VALUE",
           "EMPTY_LSE", "SUPPORTED_DTYPES"]
