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
a slot whose id is negative (padding) or >= ⌈S/l'⌉ contributes nothing, exactly like
an invalid one (never clamped or wrapped), on both backends. S need not be a multiple of l' (K/V
are zero-padded, padded keys are masked by s < S).

Backends (see `tpu.py` / `gpu.py` for the kernels and their rooflines):
  * gpu — group-centric: one program per (b, token, kv head) with the G heads as
    matmul rows (padded to ≥ 16), fori_loop over the n selected blocks; dq token-centric;
    dk/dv over an inverse CSR (kv block → tokens that selected it, a stable argsort in
    XLA) cut into chunks of at most `chunk_tokens` entries (`chunk_list`: a cumsum, a
    scatter and a cummax): one program per (kv block, chunk), tiles of tokens × G heads
    per step, f32 partials per chunk summed per block by a second kernel in list order
    (no atomics).
  * tpu — query-tile union: tiles of Tq tokens × G heads (R = Tq·G rows); the sorted
    union of the tile's selected blocks is built in XLA (scatter into a
    [nT, ns] bool matrix → CSR padded by repeating the last entry) and
    scalar-prefetched; grid (B·Hkv, 1, nT, M) with `pl.when` skipping padded steps;
    a per-row selection mask + causality inside the tile. dq over the same tables;
    dk/dv one grid step per visited (kv block, tile) pair of a flat visit list
    (`visit_list`, built in XLA by a cumsum and a scatter, sorted by kv block).
    Tables longer than `SMEM_TABLE_BYTES` are split over several calls (`tpu_chunks`,
    `dkv_chunk`, `tpu_footprint`).

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
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import (BACKENDS, EMPTY_LSE, MASK_VALUE, SMEM_TABLE_BYTES,
                                    default_backend, largest_divisor, map_chunks,
                                    match_vma, take)
from pallas_kernels.nsa.gpu import nsa_dkv_gpu, nsa_dq_gpu, nsa_fwd_gpu
from pallas_kernels.nsa.tpu import nsa_dkv_tpu, nsa_dq_tpu, nsa_fwd_tpu

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def default_block_q(t: int, g: int, sublanes: int = 8) -> int:
  """TPU tile tokens Tq: the largest divisor of T with Tq·G ≤ max(128, G) and Tq·G a
  multiple of `sublanes` (Mosaic tiling: 8 rows for float32, 16 for bfloat16), else T."""
  for tq in range(t, 0, -1):
    if t % tq == 0 and tq * g <= max(128, g) and (tq * g) % sublanes == 0:
      return tq
  return t


def tpu_chunks(bc: int, rows: int, slots: int,
               budget: int = SMEM_TABLE_BYTES) -> tuple[int, int]:
  """((batch · kv head) pairs, table rows) per TPU forward / dq call so that its
  scalar-prefetched tables, int32 [bc_c, rows_c, slots] + counts [bc_c, rows_c], take
  <= `budget` bytes (at least one pair and one row per call); rows/slots = nT/M."""
  per_row = 4 * (slots + 1)
  rc = largest_divisor(rows, budget // per_row)
  return largest_divisor(bc, budget // (per_row * rc)), rc


def _in_shard_map() -> bool:
  """Whether some mesh axis in context is manual (tracing inside a `jax.shard_map`)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and jax.sharding.AxisType.Manual in mesh.axis_types


def dkv_chunk(width: int, budget: int = SMEM_TABLE_BYTES) -> int:
  """Visits per TPU dk/dv call: its two int32 tables (blocks, tiles) take <= `budget`
  bytes (at least one visit); `width` is the visit list's static length."""
  return max(1, min(width, budget // 8))


def tpu_footprint(*, b: int, t: int, s: int, hq: int, hkv: int, n: int, d: int, dv: int,
                  select_block: int, itemsize: int, block_q: int | None = None,
                  budget: int = SMEM_TABLE_BYTES) -> dict[str, int]:
  """Bytes of one TPU call after `tpu_chunks` / `dkv_chunk` for worst-case tables
  (M = min(ns, Tq·n) union slots): scalar-prefetch SMEM of the forward/dq and of the
  dk/dv call, and VMEM of each kernel (double-buffered blocks, f32 scratch or f32
  dk/dv blocks; [R, 1] and [R, n] int32/f32 blocks pad to 128 lanes). Formulas in
  tpu.py's docstring."""
  g, lsel = hq // hkv, select_block
  tq = default_block_q(t, g, 8 * max(1, 4 // itemsize)) if block_q is None else block_q
  nt, ns, r = t // tq, -(-s // lsel), tq * g
  m = max(1, min(ns, tq * n))
  bcc, rc = tpu_chunks(b * hkv, nt, m, budget)
  chunk = dkv_chunk(b * hkv * nt * m, budget)
  lane = 128 * 4                              # a VMEM row of < 128 lanes pads to 128
  kv = lsel * (d + dv) * itemsize
  fwd = 2 * (r * d * itemsize + kv + 2 * r * lane + r * dv * itemsize + r * lane) \
      + 2 * r * lane + r * dv * 4
  dq = 2 * (r * (d + dv) * itemsize + kv + 4 * r * lane + r * d * itemsize) + r * d * 4
  dkv = 2 * (r * (d + dv) * itemsize + kv + 4 * r * lane) + 4 * lsel * (d + dv) * 4
  return dict(smem_fwd=4 * bcc * rc * (m + 1), smem_dkv=8 * chunk,
              vmem_fwd=fwd, vmem_dq=dq, vmem_dkv=dkv)


def _check(q, k, v, block_idx, valid, select_block, block_q, backend, chunk_tokens,
           tile_rows, dkv_num_warps):
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
    knobs = [("chunk_tokens", chunk_tokens, 1), ("dkv_num_warps", dkv_num_warps, 1)]
    if tile_rows is not None:
      knobs.append(("tile_rows", tile_rows, 16))
    for name, n, low in knobs:
      if not isinstance(n, int) or n < low or not _pow2(n):
        raise ValueError(f"{name}={n!r} must be a power of two >= {low} (GPU dk/dv)")


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


def visit_list(hit: jax.Array, width: int):
  """hit bool [P, nT, ns] (a token of query tile i of pair p selected kv block j) ->
  (blocks int32 [width], tiles int32 [width], total int32): the `total` visited
  (p, j, i) in (p, j, i) order as blocks = p·ns + j and tiles = i; entries past
  `total` repeat the last visit (0 when there is none), so a TPU step over them
  issues no DMA. `width` >= total (static). Built with a cumsum and a scatter."""
  p, nt, ns = hit.shape
  flat = jnp.swapaxes(hit, 1, 2).reshape(-1)                          # (p, j, i) order
  dest = jnp.where(flat, jnp.cumsum(flat, dtype=jnp.int32) - 1, width)
  total = jnp.sum(flat, dtype=jnp.int32)
  past = jnp.arange(width) >= total

  def put(axis):
    x = jnp.zeros((width,), jnp.int32).at[dest].set(
        lax.broadcasted_iota(jnp.int32, (p * ns, nt), axis).reshape(-1), mode="drop")
    return jnp.where(past, x[jnp.maximum(total - 1, 0)], x)
  return put(0), put(1), total


def union_tables(sel_bct: jax.Array, num_blocks: int, block_q: int):
  """sel_bct int32 [B, Hkv, T, n] (-1 = invalid) -> (hit bool [B, Hkv, nT, ns]: some
  token of tile i selected block j, forward CSR (blocks, counts), the dk/dv visit list
  (`visit_list` over the B·Hkv pairs; width B·Hkv·nT·M, M the forward's slots))."""
  b, hkv, t, n = sel_bct.shape
  nt = t // block_q
  bi = jnp.arange(b)[:, None, None, None]
  ci = jnp.arange(hkv)[None, :, None, None]
  ti = (jnp.arange(t) // block_q)[None, None, :, None]
  col = jnp.where(sel_bct >= 0, sel_bct, num_blocks)
  hit = jnp.zeros((b, hkv, nt, num_blocks + 1), jnp.int32).at[bi, ci, ti, col].max(1)
  hit = hit[..., :num_blocks] > 0
  m = max(1, min(num_blocks, block_q * n))
  fwd = csr_from_bool(hit, m)
  visits = visit_list(hit.reshape(b * hkv, nt, num_blocks), b * hkv * nt * m)
  return hit, fwd, visits


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


def chunk_width(t: int, n: int, num_blocks: int, chunk_tokens: int) -> int:
  """Static length W of `chunk_list` per (batch, kv head) pair: Σ_j ⌈cnt_j / C⌉ with
  Σ_j cnt_j <= T·n over at most min(ns, T·n) non-empty blocks is at most
  ⌊(T·n + min(ns, T·n)·(C − 1)) / C⌋ (at least 1)."""
  return max(1, (t * n + min(num_blocks, t * n) * (chunk_tokens - 1)) // chunk_tokens)


def chunk_list(offsets: jax.Array, chunk_tokens: int, width: int):
  """Inverse-CSR offsets int32 [P, ns + 1] -> the GPU dk/dv work list: each block's
  token list cut into chunks of at most C = chunk_tokens entries, (blocks, begins,
  ends int32 [P, width], bounds int32 [P, ns + 1]). Item w < total_p covers list
  entries [begins, ends) of kv block blocks[p, w]; items are in (block, chunk) order
  and block j owns items [bounds[p, j], bounds[p, j + 1]); items past the total have
  block −1 and an empty range. Built with a cumsum, a scatter and a cummax (no sort)."""
  p, ns = offsets.shape[0], offsets.shape[1] - 1
  count = offsets[:, 1:] - offsets[:, :-1]
  chunks = (count + chunk_tokens - 1) // chunk_tokens
  bounds = jnp.pad(jnp.cumsum(chunks, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
  dest = jnp.where(chunks > 0, bounds[:, :-1], width)          # a block's first item
  rows = jnp.arange(p)[:, None]
  blocks = jnp.full((p, width), -1, jnp.int32).at[rows, dest].set(
      jnp.broadcast_to(jnp.arange(ns, dtype=jnp.int32), (p, ns)), mode="drop")
  item = jnp.arange(width, dtype=jnp.int32)[None, :]
  blocks = jnp.where(item < bounds[:, -1:], lax.cummax(blocks, axis=1), -1)
  jc = jnp.maximum(blocks, 0)
  begins = (jnp.take_along_axis(offsets, jc, 1)
            + (item - jnp.take_along_axis(bounds, jc, 1)) * chunk_tokens)
  ends = jnp.minimum(begins + chunk_tokens, jnp.take_along_axis(offsets, jc + 1, 1))
  live = blocks >= 0
  return blocks, jnp.where(live, begins, 0), jnp.where(live, ends, 0), bounds


def nsa_selection_kernel(q, k, v, block_idx, valid, *, select_block: int,
                         scale: float | None = None, q_positions=None,
                         block_q: int | None = None, interpret=False,
                         backend: str | None = None, num_warps: int = 4,
                         chunk_tokens: int = 256, tile_rows: int | None = None,
                         dkv_num_warps: int = 8,
                         smem_table_bytes: int = SMEM_TABLE_BYTES):
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
    chunk_tokens: GPU dk/dv: most entries of a kv block's token list per program
      (power of two; `chunk_list`).
    tile_rows: GPU dk/dv: matmul rows per inner step, tokens × next power of two >= G
      (power of two >= 16; `gpu.dkv_tile`); default 128 for bfloat16, 16 for float32
      (`gpu.default_tile_rows`).
    dkv_num_warps: Triton warps of the GPU dk/dv chunk kernel (power of two).
    smem_table_bytes: TPU: most bytes of scalar-prefetched tables per pallas_call;
      longer tables are split into several calls (`tpu_chunks`, `dkv_chunk`).

  Returns:
    out [B, T, Hq, Dv] in q.dtype.
  """
  q, k, v = map(jnp.asarray, (q, k, v))
  block_idx, valid = jnp.asarray(block_idx), jnp.asarray(valid)
  backend = default_backend() if backend is None else backend
  _check(q, k, v, block_idx, valid, select_block, block_q, backend, chunk_tokens,
         tile_rows, dkv_num_warps)
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
  # Inside a jax.shard_map (check_vma): one manual-axis type for all inputs, so the
  # custom_vjp's cotangents match them and every out_struct states it.
  q, k, v, sel, pos = match_vma(q, k, v, sel, pos)
  kh = jnp.swapaxes(k, 1, 2)                                          # [B, Hkv, S', D]
  vh = jnp.swapaxes(v, 1, 2)
  kw = dict(scale=scale, select_block=lsel, seq_len=s_len)

  if backend == "tpu":
    tq = default_block_q(t, g, 8 * max(1, 4 // q.dtype.itemsize)) \
        if block_q is None else block_q
    rows, bc, nt = tq * g, b * hkv, t // tq
    sel_bct = jnp.swapaxes(sel, 1, 2)                                  # [B,Hkv,T,n]
    _, fwd_t, visits = union_tables(sel_bct, ns, tq)
    flat = lambda x: x.reshape(bc, 1, *x.shape[2:])    # (b, c) pairs as the batch axis
    # s ≤ min(pos, S − 1) is "s ≤ pos and s < S".
    pos_rows = jnp.repeat(jnp.minimum(pos, s_len - 1), g, axis=1)[..., None]
    tables = (flat(jnp.repeat(sel_bct, g, axis=2)), jnp.repeat(pos_rows, hkv, axis=0),
              tuple(map(flat, fwd_t)), visits)
    kw.update(block_rows=rows, interpret=interpret)
    kh, vh = flat(kh), flat(vh)

    def to_kernel(q):   # [B, T, Hq, D] -> [B·Hkv, 1, T·G, D]
      q = q.reshape(b, t, hkv, g, -1).transpose(0, 2, 1, 3, 4)
      return q.reshape(bc, 1, t * g, -1)

    def from_kernel(o):
      return o.reshape(b, hkv, t, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, -1)

    def unchunk(o, nb, nr):  # [nb·nr, bc_c, 1, L, X] -> [B·Hkv, 1, nr·L, X]
      o = o.reshape(nb, nr, o.shape[1], 1, o.shape[3], o.shape[4])
      return o.transpose(0, 2, 3, 1, 4, 5).reshape(bc, 1, nr * o.shape[4], o.shape[5])

    def by_tiles(call, xs, k, v, tab):
      """call(*xs, k, v, sel, pos, blocks, counts) over (pair, tile) chunks."""
      sel_r, pos_r, (blocks, counts), _ = tab
      bcc, rc = tpu_chunks(bc, nt, blocks.shape[3], smem_table_bytes)
      nb, nr = bc // bcc, nt // rc

      def one(i):
        bi, ri = i // nr, i % nr
        part = [take(take(x, 0, bi, bcc), 2, ri, rc * rows) for x in (*xs, sel_r)]
        kvs = [take(x, 0, bi, bcc) for x in (k, v)]
        tabs = [take(take(x, 0, bi, bcc), 2, ri, rc) for x in (blocks, counts)]
        return call(*part[:-1], *kvs, part[-1],
                    take(take(pos_r, 0, bi, bcc), 1, ri, rc * rows), *tabs)
      return jax.tree.map(lambda o: unchunk(o, nb, nr), map_chunks(one, nb * nr))

    def fwd(q, k, v, tab):
      return by_tiles(lambda q, k, v, *r: nsa_fwd_tpu(q, k, v, *r, **kw), (q,), k, v, tab)

    def bwd(q, k, v, do, lse, di, tab):
      dq = by_tiles(lambda q, do, lse, di, k, v, *r: nsa_dq_tpu(q, k, v, do, lse, di, *r,
                                                                **kw),
                    (q, do, lse, di[..., None]), k, v, tab)
      sel_r, pos_r, _, (blocks, tiles, total) = tab
      chunk = dkv_chunk(blocks.shape[0], smem_table_bytes)
      pad = -blocks.shape[0] % chunk
      blocks, tiles = (jnp.pad(x, (0, pad), mode="edge") for x in (blocks, tiles))

      # Pallas' TPU interpreter runs a shard_map's devices in lock step (a barrier per
      # kernel call): there every device makes all blocks.size / chunk calls, each over
      # a static grid of `chunk` steps; compiled, ⌈total / chunk⌉ calls of `steps`.
      lockstep = bool(interpret) and _in_shard_map()
      calls = blocks.shape[0] // chunk if lockstep else (total + chunk - 1) // chunk

      def one(i, acc):    # visits [i·chunk, min((i+1)·chunk, total)): one call each
        steps = jnp.clip(total - i * chunk, 0, chunk)
        return tuple(nsa_dkv_tpu(q, k, v, do, lse, di[..., None], sel_r, pos_r,
                                 take(blocks, 0, i, chunk), take(tiles, 0, i, chunk),
                                 steps, *acc, static_grid=lockstep, **kw))
      acc = match_vma(jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
                      k)[:2]
      dk, dv = lax.fori_loop(0, calls, one, acc)
      return dq, (dk * scale).astype(k.dtype), dv.astype(v.dtype)
  else:
    gp = max(16, 1 << (g - 1).bit_length())
    offsets, tokens = inverse_csr(sel, ns)
    work = chunk_list(offsets.reshape(b * hkv, ns + 1), chunk_tokens,
                      chunk_width(t, n, ns, chunk_tokens))
    tables = (sel.reshape(-1), pos.reshape(-1), tokens.reshape(-1),
              tuple(x.reshape(-1) for x in work))
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
      dk, dv = nsa_dkv_gpu(q, k, v, do, lse, di, tab[1], tab[2], *tab[3], group=g,
                           chunk_tokens=chunk_tokens, tile_rows=tile_rows,
                           dkv_num_warps=dkv_num_warps, **kw)
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
           "inverse_csr", "chunk_list", "chunk_width", "csr_from_bool", "visit_list", "default_block_q", "dkv_chunk",
           "BACKENDS", "MASK_VALUE", "EMPTY_LSE", "SUPPORTED_DTYPES"]
