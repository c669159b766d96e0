"""Block-sparse flash attention kernels: TPU (Mosaic), GPU (Triton), with a custom_vjp.

`block_sparse_attention_kernel(q, k, v, tables, scale=)` computes, for query head h
reading kv head h // G (GQA, Hq = G · Hkv),

    out[b, h, t] = Σ_s P[b, h, t, s] · v[b, h // G, s]
    P[b, h, t, :] = softmax_s(scale · q[b, h, t] · k[b, h // G, s] | allowed_h[t, s])

in f32 (online softmax, finite mask value), out [B, Hq, T, Dv] in q.dtype. Layout is
heads-major: q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (the op
`sparsejax.ops.sparse_attention` transposes from [B, T, H, D]). A query row with
no allowed key gives exactly 0 output and zero gradients.

The mask arrives as one `BlockTables` (tables.py; `sparsejax.ops.masks.MaskInfo.
kernel_tables()` builds it — this package imports nothing from sparsejax): CSR of the
non-empty kv blocks per q block and its transpose, block kinds (empty / partial /
full), deduplicated partial tiles; their shapes fix block_q, block_kv. From them the
wrapper derives per-slot tables (kind and tile index of every CSR slot; non-partial
slots repeat the previous partial tile's index so the TPU pipeline issues no new mask
DMA). Empty blocks are never visited; full blocks are not masked; partial blocks apply
the stored tile. Block sizes: `sizing.default_blocks` (TPU 512 × 512, GPU 128 × 64
when the sequence allows); grid steps `sizing.grid_steps` (causal 32k: 4,096 TPU steps
per head at 512-blocks instead of 65,536 at 128).

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

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import (BACKENDS, HIGHEST, MASK_VALUE, SMEM_TABLE_BYTES,
                                    default_backend, map_chunks, match_vma, take)
from pallas_kernels.block_sparse_attention.gpu import (bsa_dkv_gpu, bsa_dq_gpu,
                                                       bsa_fwd_gpu)
from pallas_kernels.block_sparse_attention.sizing import (default_blocks, grid_steps,
                                                          tpu_chunks, tpu_footprint,
                                                          tpu_vmem)
from pallas_kernels.block_sparse_attention.tables import BlockTables, slot_tables
from pallas_kernels.block_sparse_attention.tpu import bsa_dkv_tpu, bsa_dq_tpu, bsa_fwd_tpu

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def _check(q, k, v, tables: BlockTables, backend):
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
  tables.check(hq, t, s)
  if backend == "gpu":
    for name, n in (("block_q", tables.block_q), ("block_kv", tables.block_kv),
                    ("D", d), ("Dv", v.shape[3])):
      if n < 16 or not _pow2(n):
        raise ValueError(f"{name}={n} must be a power of two >= 16 for the Triton "
                         "kernel (pl.dot tiles)")


def _unchunk(o, nh, nr, b, rows):
  """[nh·nr, B, hc, rc, ...] (chunk (hi, ri) of heads × rows) -> [B, nh·hc, nr·rc, ...]."""
  rest = o.shape[4:]
  o = o.reshape(nh, nr, b, o.shape[2], o.shape[3], *rest)
  o = o.transpose(2, 0, 3, 1, 4, *range(5, 5 + len(rest)))
  return o.reshape(b, nh * o.shape[2], rows, *rest)


def _tpu_fwd(fwd, q, k, v, tables, tiles, interpret, budget, **kw):
  """The TPU forward (or dq, with `fwd` = partial of bsa_dq_tpu over (d_out, lse, di)
  in `q`'s tuple) split by `tpu_chunks`: chunk (hi, ri) runs q heads
  [hi·hc, (hi+1)·hc) and q blocks [ri·rc, (ri+1)·rc) (their kv heads and table slices)."""
  qs = q if isinstance(q, tuple) else (q,)
  b, hq, t = qs[0].shape[:3]
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

  return jax.tree.map(lambda o: _unchunk(o, nh, nr, b, t), map_chunks(one, nh * nr))


def _tpu_dkv(q, k, v, d_out, lse, di, tables, tiles_t, interpret, budget, **kw):
  """bsa_dkv_tpu split by `tpu_chunks` over (q-head groups, kv-block rows)."""
  b, hq = q.shape[:2]
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
    return bsa_dkv_tpu(xs[0], *ks, *xs[1:], *tabs, tiles_t, interpret=interpret, **kw)

  return jax.tree.map(lambda o: _unchunk(o, nh, nr, b, s), map_chunks(one, nh * nr))


def block_sparse_attention_kernel(q, k, v, tables: BlockTables | Sequence, *,
                                  scale: float, interpret=False,
                                  backend: str | None = None,
                                  smem_table_bytes: int = SMEM_TABLE_BYTES,
                                  num_warps: int | None = None,
                                  num_stages: int | None = None,
                                  precision=HIGHEST):
  """Block-sparse attention, differentiable in q, k, v (see the module docstring).

  Args:
    q: [B, Hq, T, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv] (float32 / bfloat16).
    tables: the mask's `BlockTables` (e.g. `MaskInfo.kernel_tables()`), whose
      partial_masks [P, block_q, block_kv] fix the tile sizes (TPU: multiples of 128
      run best, 512 by default; GPU: powers of two >= 16, as are D and Dv).
    scale: logit scale (static float).
    interpret: interpret mode for CPU tests (True, or a `pltpu.InterpretParams`).
    backend: "tpu" or "gpu"; default by `jax.default_backend()`.
    smem_table_bytes: TPU: most bytes of scalar-prefetched tables per pallas_call;
      longer tables are split into several calls (`tpu_chunks`).
    num_warps, num_stages: GPU (Triton) launch parameters; default 4 / 8 warps by tile
      size and 2 pipeline stages (gpu.py gives the sweep to tune them on device).
    precision: matmul precision for float32 operands (both backends): HIGHEST (the
      default: exact f32 against the reference) or lax.Precision.DEFAULT (GPU TF32,
      TPU one bf16 pass). bfloat16 operands always run at the native precision with
      f32 accumulation.

  Returns:
    out [B, Hq, T, Dv] in q.dtype.
  """
  q, k, v = map(jnp.asarray, (q, k, v))
  backend = default_backend() if backend is None else backend
  if len(tables) != len(BlockTables._fields):
    raise TypeError(f"tables must be a BlockTables ({', '.join(BlockTables._fields)}), "
                    f"got {type(tables).__name__} of {len(tables)} items")
  tables = BlockTables(*(x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)
                         for x in tables))
  _check(q, k, v, tables, backend)
  bq, bkv = tables.block_q, tables.block_kv
  kv_blocks, q_blocks = (jnp.asarray(x, jnp.int32) for x in (tables.kv_blocks,
                                                             tables.q_blocks))
  kv_counts, q_counts = (jnp.asarray(x, jnp.int32) for x in (tables.kv_counts,
                                                             tables.q_counts))
  kind = jnp.asarray(tables.block_kind, jnp.int32)
  pidx = jnp.asarray(tables.partial_index, jnp.int32)
  # Inside a jax.shard_map (check_vma): q, k, v and the tables share one manual-axis
  # type, so dk/dv match k/v's (K/V replicated over an axis q varies on: the pcast's
  # transpose sums their gradient) and every out_struct states it.
  q, k, v, kv_blocks, kv_counts, kind, pidx, q_blocks, q_counts, masks = match_vma(
      q, k, v, kv_blocks, kv_counts, kind, pidx, q_blocks, q_counts,
      jnp.asarray(tables.partial_masks))
  fkind, fmask = slot_tables(kv_blocks, kv_counts, kind, pidx)
  tkind, tmask = slot_tables(q_blocks, q_counts, jnp.swapaxes(kind, 1, 2),
                             jnp.swapaxes(pidx, 1, 2))
  tiles = masks.astype(jnp.int32)
  # The TPU dk/dv kernel works on transposed tiles ([bkv, bq]); Triton's takes the same.
  bwd_tiles = jnp.swapaxes(tiles, 1, 2) if backend == "tpu" else tiles
  fwd_tables = (kv_blocks, kv_counts, fkind, fmask)
  bwd_tables = (q_blocks, q_counts, tkind, tmask)
  kw = dict(scale=float(scale), block_q=bq, block_kv=bkv, precision=precision)
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
    kw.update(num_warps=num_warps, num_stages=num_stages, interpret=bool(interpret))

    def fwd(q, k, v, tables, tiles):
      return bsa_fwd_gpu(q, k, v, *tables, tiles, **kw)

    def dq_fn(q, k, v, d_out, lse, di, tables, tiles):
      return bsa_dq_gpu(q, k, v, d_out, lse, di, *tables, tiles, **kw)

    def dkv_fn(q, k, v, d_out, lse, di, tables, tiles):
      return bsa_dkv_gpu(q, k, v, d_out, lse, di, *tables, tiles, **kw)

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
    dk, dv = dkv_fn(q, k, v, d_out, lse, di, tables[1], tables[3])
    return dq, dk, dv, None            # the integer tables get no cotangent

  attn.defvjp(attn_fwd, attn_bwd)
  return attn(q, k, v, (fwd_tables, bwd_tables, tiles, bwd_tiles))


__all__ = ["block_sparse_attention_kernel", "BlockTables", "default_blocks", "grid_steps",
           "tpu_chunks", "tpu_footprint", "tpu_vmem", "bsa_fwd_tpu", "bsa_dq_tpu",
           "bsa_dkv_tpu", "bsa_fwd_gpu", "bsa_dq_gpu", "bsa_dkv_gpu", "BACKENDS",
           "MASK_VALUE", "SUPPORTED_DTYPES"]
