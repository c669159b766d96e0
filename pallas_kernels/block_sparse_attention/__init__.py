"""Block-sparse flash attention kernels: TPU (Mosaic), GPU (Triton), with a custom_vjp.

`block_sparse_attention_kernel(q, k, v, <mask tables>, scale=, block_q=, block_kv=)`
computes, for query head h reading kv head h // G (GQA, Hq = G · Hkv),

    out[b, h, t] = Σ_s P[b, h, t, s] · v[b, h // G, s]
    P[b, h, t, :] = softmax_s(scale · q[b, h, t] · k[b, h // G, s] | allowed_h[t, s])

in f32 (online softmax, finite mask value), out [B, Hq, T, Dv] in q.dtype. Layout is
heads-major: q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (the op
`sparsejax.ops.sparse_attention` transposes from [B, T, H, D]). A query row with
no allowed key gives exactly 0 output and zero gradients.

The mask arrives as plain block tables (this package imports nothing from sparsejax;
they are the fields of `sparsejax.ops.masks.MaskInfo`, Hm = 1 or Hq mask heads):
    kv_blocks int32 [Hm, nq, M]   non-empty kv blocks per q block (CSR, padded by
                                  repeating the last valid index), kv_counts [Hm, nq];
    block_kind int8 [Hm, nq, nkv] 0 empty / 1 partial / 2 full;
    partial_masks bool [P, bq, bkv] deduplicated partial tiles, partial_index int32
                                  [Hm, nq, nkv] (-1 where not partial);
    q_blocks int32 [Hm, nkv, Mt]  transposed CSR (non-empty q blocks per kv block),
                                  q_counts [Hm, nkv].
From them the wrapper derives per-slot tables (kind and tile index of every CSR slot;
non-partial slots repeat the previous partial tile's index so the TPU pipeline issues
no new mask DMA). Empty blocks are never visited; full blocks are not masked; partial
blocks apply the stored tile.

Backward (`jax.custom_vjp`): the forward saves out and LSE [B, Hq, T]; di = Σ(do · out)
is computed in XLA; a dq kernel walks the CSR per q block, a dk/dv kernel walks the
transposed CSR per kv block and sums the G query heads of a group *inside* the kernel
(dk, dv are written once per kv head, no [B, Hq, S, D] intermediate).

Roofline (nnz = allowed (q, k) pairs per head, b = bytes per element, V = visited
blocks summed over heads (Σ kv_counts · B), each bq·bkv):
    FLOPs_fwd = 2 · B · Hq · nnz · (D + Dv) useful;
              executed 2 · V · bq · bkv · (D + Dv) (full tiles of partial blocks);
    FLOPs_bwd ≈ 2.5 × FLOPs_fwd (dq: q·kᵀ, do·vᵀ, ds·k; dkv: q·kᵀ, do·vᵀ, pᵀ·do,
              dsᵀ·q — q·kᵀ and do·vᵀ are recomputed in both kernels);
    bytes_fwd ideal = B · (Hq·T + Hkv·S) · (D + Dv) · b + 4·B·Hq·T (LSE);
    bytes_fwd moved = B·Hq·T·(D + Dv)·b + V·bkv·(D + Dv)·b + mask tiles (≤ V·bq·bkv·4,
              only when the tile index changes): K/V blocks are re-read once per
              visited (q block, q head) — no K/V sharing across the G heads of a group
              in the forward and dq kernels (dk/dv loads each K/V block once);
    block efficiency = Σ nnz / (V · bq · bkv) (`MaskInfo.block_efficiency`).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import (BACKENDS, MASK_VALUE, SMEM_TABLE_BYTES,
                                    default_backend, largest_divisor, map_chunks,
                                    match_vma, take)
from pallas_kernels.block_sparse_attention.gpu import (bsa_dkv_gpu, bsa_dq_gpu,
                                                       bsa_fwd_gpu)
from pallas_kernels.block_sparse_attention.tpu import bsa_dkv_tpu, bsa_dq_tpu, bsa_fwd_tpu

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def _check(q, k, v, tables, block_q, block_kv, backend):
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D [batch, heads, seq, dim], got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  b, hq, t, d = q.shape
  _, hkv, s, _ = k.shape
  if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape} do not match "
                     "q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]")
  if hq % hkv:
    raise ValueError(f"q heads Hq={hq} must be a multiple of kv heads Hkv={hkv}")
  for x, name in ((q, "q"), (k, "k"), (v, "v")):
    if x.dtype not in [jnp.dtype(dt) for dt in SUPPORTED_DTYPES]:
      raise ValueError(f"{name} must be float32 or bfloat16, got {x.dtype}")
  for name, blk, size in (("block_q", block_q, t), ("block_kv", block_kv, s)):
    if not isinstance(blk, int) or blk < 1 or size % blk:
      raise ValueError(f"{name}={blk!r} must be an int >= 1 dividing the sequence "
                       f"length {size}")
  if backend == "gpu":
    for name, n in (("block_q", block_q), ("block_kv", block_kv), ("D", d),
                    ("Dv", v.shape[3])):
      if n < 16 or not _pow2(n):
        raise ValueError(f"{name}={n} must be a power of two >= 16 for the Triton "
                         "kernel (pl.dot tiles)")
  kv_blocks, kv_counts, block_kind, partial_masks, partial_index, q_blocks, q_counts = \
      tables
  nq, nkv = t // block_q, s // block_kv
  hm = block_kind.shape[0]
  if hm not in (1, hq):
    raise ValueError(f"mask tables have {hm} heads; need 1 or Hq={hq}")
  want = {"block_kind": (hm, nq, nkv), "partial_index": (hm, nq, nkv),
          "kv_counts": (hm, nq), "q_counts": (hm, nkv)}
  got = {"block_kind": block_kind.shape, "partial_index": partial_index.shape,
         "kv_counts": kv_counts.shape, "q_counts": q_counts.shape}
  for name, shape in want.items():
    if tuple(got[name]) != shape:
      raise ValueError(f"{name} has shape {tuple(got[name])}, expected {shape} for "
                       f"T={t}, S={s}, block_q={block_q}, block_kv={block_kv}")
  if kv_blocks.shape[:2] != (hm, nq) or q_blocks.shape[:2] != (hm, nkv):
    raise ValueError(f"kv_blocks {kv_blocks.shape} / q_blocks {q_blocks.shape} must "
                     f"start with {(hm, nq)} / {(hm, nkv)}")
  if partial_masks.ndim != 3 or partial_masks.shape[1:] != (block_q, block_kv):
    raise ValueError(f"partial_masks {partial_masks.shape} must be [P, {block_q}, "
                     f"{block_kv}]")


def _slot_tables(blocks, counts, kind, pidx):
  """Per CSR slot: (kind int32 [Hm, R, M] (0 past the count), tile index int32).

  `kind` / `pidx` are [Hm, R, C] with R the CSR's row axis. The tile index of a slot
  that is not partial repeats the row's previous partial tile (0 before the first), so
  the TPU mask BlockSpec keeps its block and issues no DMA.
  """
  m = blocks.shape[-1]
  slot = jnp.arange(m, dtype=jnp.int32)
  valid = slot < counts[..., None]
  skind = jnp.where(valid, jnp.take_along_axis(kind, blocks, -1), 0).astype(jnp.int32)
  spidx = jnp.take_along_axis(pidx, blocks, -1).astype(jnp.int32)
  last = lax.cummax(jnp.where(skind == 1, slot, -1), axis=2)
  smask = jnp.where(last >= 0, jnp.take_along_axis(spidx, jnp.maximum(last, 0), -1), 0)
  return skind, smask.astype(jnp.int32)


def tpu_chunks(hq: int, hkv: int, hm: int, rows: int, slots: int,
               budget: int = SMEM_TABLE_BYTES) -> tuple[int, int]:
  """(query heads hc, table rows rc) per TPU call so that its scalar-prefetched tables,
  3 int32 [hm_c, rc, slots] (hm_c = 1 or hc), take <= `budget` bytes (when possible:
  at least one GQA group of G heads and one row per call).

  rows/slots: nq/M for the forward and dq (kv blocks per q block), nkv/Mt for dk/dv.
  A shared mask (hm = 1) keeps all heads; a per-head mask splits heads by GQA groups.
  """
  per_row = 12 * slots
  if hm == 1:
    return hq, largest_divisor(rows, budget // per_row)
  g = hq // hkv
  hc = g * largest_divisor(hkv, budget // (per_row * g))
  return hc, largest_divisor(rows, budget // (per_row * hc))


def tpu_footprint(*, hq: int, hkv: int, hm: int, nq: int, nkv: int, m: int, mt: int,
                  block_q: int, block_kv: int, d: int, dv: int, itemsize: int,
                  budget: int = SMEM_TABLE_BYTES) -> dict[str, int]:
  """Bytes of one TPU call after `tpu_chunks`: scalar-prefetch SMEM of the forward/dq
  and of the dk/dv call, and VMEM of each kernel (double-buffered blocks, f32 scratch;
  [rows, 1] f32 columns pad to 128 lanes). Formulas in tpu.py's docstring."""
  hc, rc = tpu_chunks(hq, hkv, hm, nq, m, budget)
  hct, rct = tpu_chunks(hq, hkv, hm, nkv, mt, budget)
  bq, bkv, b = block_q, block_kv, itemsize
  col = 128 * 4                                   # a [rows, 1] f32 VMEM column per row
  tile = bq * bkv * 4
  fwd = 2 * (bq * d * b + bkv * (d + dv) * b + tile + bq * dv * b + bq * col) \
      + 2 * bq * col + bq * dv * 4
  dq = 2 * (bq * (d + dv) * b + bkv * (d + dv) * b + 2 * bq * col + tile + bq * d * b) \
      + bq * d * 4
  dkv = 2 * (bq * (d + dv) * b + bkv * (d + dv) * b + 2 * bq * col + tile
             + bkv * (d + dv) * b) + bkv * (d + dv) * 4
  return dict(smem_fwd=12 * (hc if hm > 1 else 1) * rc * m,
              smem_dkv=12 * (hct if hm > 1 else 1) * rct * mt,
              vmem_fwd=fwd, vmem_dq=dq, vmem_dkv=dkv)


def _tpu_fwd(fwd, q, k, v, tables, tiles, interpret, budget, **kw):
  """The TPU forward (or dq, with `fwd` = partial of bsa_dq_tpu over (d_out, lse, di)
  in `q`'s tuple) split by `tpu_chunks`: chunk (hi, ri) runs q heads
  [hi·hc, (hi+1)·hc) and q blocks [ri·rc, (ri+1)·rc) (their kv heads and table slices)."""
  qs = q if isinstance(q, tuple) else (q,)
  b, hq, t, _ = qs[0].shape
  hkv, g = k.shape[1], hq // k.shape[1]
  hm, nq, m = tables[0].shape
  hc, rc = tpu_chunks(hq, hkv, hm, nq, m, budget)
  nh, nr = hq // hc, nq // rc
  tc = rc * kw["block_q"]

  def one(i):
    hi, ri = i // nr, i % nr
    xs = [take(take(x, 1, hi, hc), 2, ri, tc) for x in qs]
    ks = [take(x, 1, hi, hc // g) for x in (k, v)]
    tabs = [take(x if hm == 1 else take(x, 0, hi, hc), 1, ri, rc) for x in tables]
    return fwd(*xs, *ks, *tabs, tiles, interpret=interpret, **kw)

  def unchunk(o):   # [nh·nr, B, hc, tc, X] -> [B, Hq, T, X]
    o = o.reshape(nh, nr, b, hc, tc, o.shape[-1])
    return o.transpose(2, 0, 3, 1, 4, 5).reshape(b, hq, t, o.shape[-1])

  return jax.tree.map(unchunk, map_chunks(one, nh * nr))


def _tpu_dkv(q, k, v, d_out, lse, di, tables, tiles, interpret, budget, **kw):
  """bsa_dkv_tpu split by `tpu_chunks` over (q-head groups, kv-block rows)."""
  b, hq, t, _ = q.shape
  hkv, s, g = k.shape[1], k.shape[2], hq // k.shape[1]
  hm, nkv, mt = tables[0].shape
  hc, rc = tpu_chunks(hq, hkv, hm, nkv, mt, budget)
  nh, nr = hq // hc, nkv // rc
  sc = rc * kw["block_kv"]

  def one(i):
    hi, ri = i // nr, i % nr
    xs = [take(x, 1, hi, hc) for x in (q, d_out, lse, di)]
    ks = [take(take(x, 1, hi, hc // g), 2, ri, sc) for x in (k, v)]
    tabs = [take(x if hm == 1 else take(x, 0, hi, hc), 1, ri, rc) for x in tables]
    return bsa_dkv_tpu(xs[0], *ks, *xs[1:], *tabs, tiles, interpret=interpret, **kw)

  def unchunk(o):   # [nh·nr, B, hc/G, sc, X] -> [B, Hkv, S, X]
    o = o.reshape(nh, nr, b, hc // g, sc, o.shape[-1])
    return o.transpose(2, 0, 3, 1, 4, 5).reshape(b, hkv, s, o.shape[-1])

  return jax.tree.map(unchunk, map_chunks(one, nh * nr))


def block_sparse_attention_kernel(q, k, v, kv_blocks, kv_counts, block_kind,
                                  partial_masks, partial_index, q_blocks, q_counts, *,
                                  scale: float, block_q: int, block_kv: int,
                                  interpret=False, backend: str | None = None,
                                  smem_table_bytes: int = SMEM_TABLE_BYTES):
  """Block-sparse attention, differentiable in q, k, v (see the module docstring).

  Args:
    q: [B, Hq, T, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv] (float32 / bfloat16).
    kv_blocks, kv_counts, block_kind, partial_masks, partial_index, q_blocks,
      q_counts: the mask's block tables (`sparsejax.ops.masks.MaskInfo` fields for
      the same block_q / block_kv), NumPy or jax arrays.
    scale: logit scale (static float).
    block_q, block_kv: tile sizes (TPU: multiples of 8 / 128 run best; GPU: powers of
      two >= 16, as are D and Dv).
    interpret: interpret mode for CPU tests (True, or a `pltpu.InterpretParams`).
    backend: "tpu" or "gpu"; default by `jax.default_backend()`.
    smem_table_bytes: TPU: most bytes of scalar-prefetched tables per pallas_call;
      longer tables are split into several calls (`tpu_chunks`).

  Returns:
    out [B, Hq, T, Dv] in q.dtype.
  """
  q, k, v = map(jnp.asarray, (q, k, v))
  backend = default_backend() if backend is None else backend
  raw = (kv_blocks, kv_counts, block_kind, partial_masks, partial_index, q_blocks,
         q_counts)
  raw = tuple(x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)
              for x in raw)
  _check(q, k, v, raw, block_q, block_kv, backend)
  kv_blocks, kv_counts, block_kind, partial_masks, partial_index, q_blocks, q_counts = \
      (jnp.asarray(x) for x in raw)
  kv_blocks, q_blocks = kv_blocks.astype(jnp.int32), q_blocks.astype(jnp.int32)
  kv_counts, q_counts = kv_counts.astype(jnp.int32), q_counts.astype(jnp.int32)
  kind = block_kind.astype(jnp.int32)
  pidx = partial_index.astype(jnp.int32)
  # Inside a jax.shard_map (check_vma): q, k, v and the tables share one manual-axis
  # type, so dk/dv match k/v's (K/V replicated over an axis q varies on: the pcast's
  # transpose sums their gradient) and every out_struct states it.
  q, k, v, kv_blocks, kv_counts, kind, pidx, q_blocks, q_counts, partial_masks = match_vma(
      q, k, v, kv_blocks, kv_counts, kind, pidx, q_blocks, q_counts, partial_masks)
  fkind, fmask = _slot_tables(kv_blocks, kv_counts, kind, pidx)
  tkind, tmask = _slot_tables(q_blocks, q_counts, jnp.swapaxes(kind, 1, 2),
                              jnp.swapaxes(pidx, 1, 2))
  tiles = partial_masks.astype(jnp.int32)
  fwd_tables = (kv_blocks, kv_counts, fkind, fmask)
  bwd_tables = (q_blocks, q_counts, tkind, tmask)
  kw = dict(scale=float(scale), block_q=block_q, block_kv=block_kv)
  if backend == "tpu":
    def fwd(q, k, v, tables, tiles):
      return _tpu_fwd(bsa_fwd_tpu, q, k, v, tables, tiles, interpret, smem_table_bytes,
                      **kw)

    def dq_fn(q, k, v, d_out, lse, di, tables, tiles):
      def call(q, d_out, lse, di, k, v, *rest, **kw):
        return bsa_dq_tpu(q, k, v, d_out, lse, di, *rest, **kw)
      return _tpu_fwd(call, (q, d_out, lse, di), k, v, tables, tiles, interpret,
                      smem_table_bytes, **kw)

    def dkv_fn(q, k, v, d_out, lse, di, tables, tiles):
      return _tpu_dkv(q, k, v, d_out, lse, di, tables, tiles, interpret,
                      smem_table_bytes, **kw)
  else:
    def fwd(q, k, v, tables, tiles):
      return bsa_fwd_gpu(q, k, v, *tables, tiles, interpret=bool(interpret), **kw)

    def dq_fn(q, k, v, d_out, lse, di, tables, tiles):
      return bsa_dq_gpu(q, k, v, d_out, lse, di, *tables, tiles,
                        interpret=bool(interpret), **kw)

    def dkv_fn(q, k, v, d_out, lse, di, tables, tiles):
      return bsa_dkv_gpu(q, k, v, d_out, lse, di, *tables, tiles,
                         interpret=bool(interpret), **kw)

  @jax.custom_vjp
  def attn(q, k, v, tables):
    return fwd(q, k, v, tables[0], tables[2])[0]

  def attn_fwd(q, k, v, tables):
    out, lse = fwd(q, k, v, tables[0], tables[2])
    return out, (q, k, v, out, lse, tables)

  def attn_bwd(res, d_out):
    q, k, v, out, lse, tables = res
    di = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
    d_out = d_out.astype(q.dtype)
    dq = dq_fn(q, k, v, d_out, lse, di, tables[0], tables[2])
    dk, dv = dkv_fn(q, k, v, d_out, lse, di, tables[1], tables[2])
    return dq, dk, dv, None            # the integer tables get no cotangent

  attn.defvjp(attn_fwd, attn_bwd)
  return attn(q, k, v, (fwd_tables, bwd_tables, tiles))


__all__ = ["block_sparse_attention_kernel", "bsa_fwd_tpu", "bsa_dq_tpu", "bsa_dkv_tpu",
           "bsa_fwd_gpu", "bsa_dq_gpu", "bsa_dkv_gpu", "BACKENDS", "MASK_VALUE",
           "SUPPORTED_DTYPES"]
