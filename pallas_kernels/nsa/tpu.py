"""NSA selection branch: TPU (Mosaic) kernels (forward, dq, dk/dv) — query-tile union.

Layout (built by the package wrapper): the G query heads of a kv group are folded into
the row axis, row r = t·G + g of a tile of Tq tokens, so one tile is R = Tq·G matmul rows
(the wrapper also folds the (batch, kv head) pairs into B and passes Hkv = 1):
    q [B, Hkv, T·G, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (S a multiple of l'),
    sel [B, Hkv, T·G, n] int32 selected block ids per row (-1 for an invalid slot),
    pos [B, T·G, 1] int32 query position per row.
Scalar-prefetched tables (flattened int32, see `__init__.union_tables`):
    fwd: blocks [B, Hkv, nT, M] = the sorted union of the blocks any token of tile i
         selected (padded by repeating the last entry, so padded steps issue no DMA),
         counts [B, Hkv, nT];
    dkv: the visit list (`__init__.visit_list`): the U visited (pair, kv block j,
         tile i) — tile i's union holds block j — sorted by (pair, j, i), as two flat
         int32 tables blocks = pair·ns + j and tiles = i.

Forward (`nsa_fwd_tpu`): grid (B, Hkv, nT, M), semantics (parallel ×3, arbitrary). Step
(b, c, i, u) loads kv block blocks[b, c, i, u] through the K/V index map and does nothing
unless u < counts (`pl.when`). Per row the block is allowed iff the row's token selected
it (max over its n slot ids == block, no sort/top_k) and, per key, key ≤ pos and
key < S (causality inside the current block). Online softmax in f32 VMEM scratch;
the output block (b, c, i) is revisited only on the consecutive steps u and written at
u = M − 1, with LSE (+0.7·f32max for a row with no allowed key, whose output is 0).
dq (`nsa_dq_tpu`): the forward's grid and tables, dq += ds·k in f32 scratch.
dk/dv (`nsa_dkv_tpu`): a 1-D dynamic grid of one step per listed visit (no empty
steps); the visits of a kv block are consecutive, so its f32 dk/dv output block is
revisited only on consecutive steps and accumulates in VMEM; the G heads of the group
are rows of the tile, so the GQA group sum happens inside the matmuls. The list is cut
into calls of `dkv_chunk` visits (a `lax.fori_loop` over ⌈U / chunk⌉ calls): f32
running sums [B, Hkv, S, D] / [.., Dv] are aliased input → output, a block's first
visit in a call loads its sum, so blocks straddling calls add up exactly as in one
call; dk = scale · Σ and the casts happen once at the end (XLA). The grid is
sequential ("arbitrary"): on two-TensorCore chips (v4, v5p) one core runs it. (Interpret
mode inside a `jax.shard_map` makes every call of the static list, each over a static
grid with `pl.when` skips: the interpreter runs the devices in lock step.)

Roofline (per kv head, nnz = allowed (token, key) pairs, U = Σ_i counts[i] visited
(tile, block) pairs): executed FLOPs_fwd = 2·U·R·l'·(D + Dv) vs useful
2·G·nnz·(D + Dv); bytes_fwd ≈ (T·G·(D + Dv) + U·l'·(D + Dv))·b + T·G·(n + 1)·4.
Without K/V reuse (one token per tile) each K/V byte feeds G rows: intensity ≈ G
FLOP/byte. With the tile union each loaded block feeds all R = Tq·G rows; the reuse
achieved is (Σ_i Σ_{t in tile i} n_t)/U = average number of tile tokens that selected a
visited block (1 … Tq; NSA's forced initial and local blocks are shared by every token
of a tile, so ≥ 3 of the n blocks are fully reused), and the executed/useful ratio
(wasted rows) is Tq·U/Σ n_t. Backward ≈ 2.5× forward FLOPs, same tables.

Limits per pallas_call (the package's `tpu_footprint` computes them; tested at 32k and
128k context). Chips: SMEM ~1 MiB per TensorCore (v4, v5e, v5p, v6e); VMEM 16 MiB
(v5e) / 32 MiB (v6e) default scoped limit, 128 MiB physical.
  SMEM (scalar prefetch, int32): forward/dq blocks + counts = 4·P·nT_c·(M + 1) bytes
    for P (batch, kv head) pairs per call; dk/dv 8 bytes per visit of the call.
    Unsplit they grow with T (B = 1, Hq 64, Hkv 4, n 16, l' 64, Tq·G = 128: forward
    2 MiB at 8k, 8 MiB at 32k; dk/dv up to 8·Hkv·T·n = 16 MiB at 32k), so the package
    runs the kernels on (b, c) pairs folded into the batch axis, splits the forward /
    dq grid into chunks of pairs × rows (`tpu_chunks`; one call per chunk inside a
    `lax.map`) and the dk/dv visit list into calls of `dkv_chunk` = 32768 visits, to
    stay within `SMEM_TABLE_BYTES` = 256 KiB. Floor: one row, 4·(M + 1) bytes.
  VMEM (b = itemsize; R = Tq·G rows; inputs/outputs double-buffered; [R, 1] and [R, n]
    blocks pad to 128 lanes = 512·R bytes; kv = l'·(D + Dv)·b):
      fwd  2·(R·D·b + kv + 1024·R + R·Dv·b + 512·R) + 1024·R + 4·R·Dv
      dq   2·(R·(D+Dv)·b + kv + 2048·R + R·D·b) + 4·R·D
      dkv  2·(R·(D+Dv)·b + kv + 2048·R) + 16·l'·(D+Dv)   (f32 sums in and out)
    (R = 128, l' = 64, D = Dv = 128, bf16: 0.75 / 0.81 / 0.94 MiB), independent of T.
  Grid steps: dk/dv takes U per pair, the visited (block, tile) pairs. The former
    transposed-union grid stepped all ns·nT slots, skipping the empty ones with
    `pl.when` (~0.35 µs each on TPU): with NSA's causal selection of random scores
    (l' 64, n 16, Tq 8) 131,072 -> 50,246 steps at 8k, 2,097,152 -> 331,558 at 32k
    (tests/kernels/test_nsa_kernel.py). The forward / dq still step nT·M slots.
Constraints: float32 / bfloat16; R and l' multiples of 8 (16 for bfloat16) unless they
cover the whole axis. Matmuls accumulate in f32, at HIGHEST precision for f32 operands
and the MXU's native precision for bf16 (Mosaic rejects HIGHEST on bf16).
"""

from __future__ import annotations

import functools

from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (EMPTY_LSE, MASK_VALUE, dot, dot_nt, dot_tn,
                                    interpret_params, out_struct)


def _allowed(sel, pos, blk, lsel, s_len):
  """bool [R, l']: row selected block `blk` and key ≤ pos, key < S."""
  rows = sel.shape[0]
  hit = jnp.max(jnp.where(sel == blk, 1.0, 0.0), axis=1, keepdims=True) > 0.0  # [R, 1]
  key = blk * lsel + lax.broadcasted_iota(jnp.int32, (rows, lsel), 1)
  return hit & (key <= pos) & (key < s_len)


def _fwd_kernel(blk_ref, cnt_ref, q_ref, k_ref, v_ref, sel_ref, pos_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, lsel, s_len, hkv, nt, m_slots):
  b, c, i, u = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (b * hkv + c) * nt + i

  @pl.when(u == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(u < cnt_ref[row])
  def _update():
    blk = blk_ref[row * m_slots + u]
    q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]
    allowed = _allowed(sel_ref[0, 0], pos_ref[0], blk, lsel, s_len)
    s = jnp.where(allowed, dot_nt(q, k) * scale, MASK_VALUE)       # [R, l']
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + dot(p.astype(v.dtype), v)
    m_sc[...] = m_new

  @pl.when(u == m_slots - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[0, 0] = (acc_sc[...] / safe_l).astype(o_ref.dtype)
    lse_ref[0, 0] = jnp.where(empty, EMPTY_LSE, m_sc[...] + jnp.log(safe_l))


def _q_specs(rows, hkv, nt, m_slots, d, dv, n, lsel):
  """BlockSpecs of the (B, Hkv, nT, M) grid: row tiles and the union's K/V block."""
  q_map = lambda b, c, i, u, blk, cnt: (b, c, i, 0)
  pos_map = lambda b, c, i, u, blk, cnt: (b, i, 0)
  kv_map = lambda b, c, i, u, blk, cnt: (b, c, blk[((b * hkv + c) * nt + i) * m_slots + u],
                                         0)
  return dict(
      q=pl.BlockSpec((1, 1, rows, d), q_map), do=pl.BlockSpec((1, 1, rows, dv), q_map),
      row1=pl.BlockSpec((1, 1, rows, 1), q_map), sel=pl.BlockSpec((1, 1, rows, n), q_map),
      pos=pl.BlockSpec((1, rows, 1), pos_map),
      k=pl.BlockSpec((1, 1, lsel, d), kv_map), v=pl.BlockSpec((1, 1, lsel, dv), kv_map))


def nsa_fwd_tpu(q, k, v, sel, pos, blocks, counts, *, scale, select_block, block_rows,
                seq_len, interpret=False):
  """Forward -> (out [B, Hkv, T·G, Dv] q.dtype, lse f32 [B, Hkv, T·G, 1]). No autodiff.

  blocks int32 [B, Hkv, nT, M], counts int32 [B, Hkv, nT]; block_rows = Tq·G.
  """
  b, hkv, tg, d = q.shape
  dv, n = v.shape[3], sel.shape[3]
  _, _, nt, m_slots = blocks.shape
  lsel, rows = select_block, block_rows
  sp = _q_specs(rows, hkv, nt, m_slots, d, dv, n, lsel)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, hkv, nt, m_slots),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["sel"], sp["pos"]],
      out_specs=[pl.BlockSpec((1, 1, rows, dv), sp["q"].index_map), sp["row1"]],
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, dv), jnp.float32)])
  visited = b * hkv * nt * m_slots
  itemsize = q.dtype.itemsize
  args = (blocks.reshape(-1), counts.reshape(-1), q, k, v, sel, pos)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, lsel=lsel, s_len=seq_len, hkv=hkv,
                        nt=nt, m_slots=m_slots),
      grid_spec=grid_spec,
      out_shape=[out_struct((b, hkv, tg, dv), q.dtype, *args),
                 out_struct((b, hkv, tg, 1), jnp.float32, *args)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * rows * lsel * (d + dv), transcendentals=visited * rows * lsel,
          bytes_accessed=b * hkv * tg * (d + dv) * itemsize
          + visited * lsel * (d + dv) * itemsize + b * hkv * tg * (n + 2) * 4),
      interpret=interpret_params(interpret),
      name="nsa_selection_fwd_tpu",
  )(*args)


def _probs(q, k, lse, allowed, scale):
  return jnp.where(allowed, jnp.exp(dot_nt(q, k) * scale - lse), 0.0)


def _dq_kernel(blk_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, sel_ref,
               pos_ref, dq_ref, dq_sc, *, scale, lsel, s_len, hkv, nt, m_slots):
  b, c, i, u = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (b * hkv + c) * nt + i

  @pl.when(u == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(u < cnt_ref[row])
  def _update():
    blk = blk_ref[row * m_slots + u]
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    allowed = _allowed(sel_ref[0, 0], pos_ref[0], blk, lsel, s_len)
    p = _probs(q, k, lse_ref[0, 0], allowed, scale)
    ds = p * (dot_nt(do, v) - di_ref[0, 0])
    dq_sc[...] += dot(ds.astype(k.dtype), k)

  @pl.when(u == m_slots - 1)
  def _finish():
    dq_ref[0, 0] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def nsa_dq_tpu(q, k, v, d_out, lse, di, sel, pos, blocks, counts, *, scale, select_block,
               block_rows, seq_len, interpret=False):
  """dq [B, Hkv, T·G, D] (q.dtype); lse, di f32 [B, Hkv, T·G, 1]."""
  b, hkv, tg, d = q.shape
  dv, n = v.shape[3], sel.shape[3]
  _, _, nt, m_slots = blocks.shape
  lsel, rows = select_block, block_rows
  sp = _q_specs(rows, hkv, nt, m_slots, d, dv, n, lsel)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, hkv, nt, m_slots),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["do"], sp["row1"], sp["row1"], sp["sel"],
                sp["pos"]],
      out_specs=sp["q"],
      scratch_shapes=[pltpu.VMEM((rows, d), jnp.float32)])
  visited = b * hkv * nt * m_slots
  itemsize = q.dtype.itemsize
  args = (blocks.reshape(-1), counts.reshape(-1), q, k, v, d_out, lse, di, sel, pos)
  return pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, lsel=lsel, s_len=seq_len, hkv=hkv,
                        nt=nt, m_slots=m_slots),
      grid_spec=grid_spec,
      out_shape=out_struct((b, hkv, tg, d), q.dtype, *args),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * rows * lsel * (2 * d + dv),
          transcendentals=visited * rows * lsel,
          bytes_accessed=b * hkv * tg * (2 * d + dv) * itemsize
          + visited * lsel * (d + dv) * itemsize + b * hkv * tg * (n + 3) * 4),
      interpret=interpret_params(interpret),
      name="nsa_selection_dq_tpu",
  )(*args)


def _dkv_kernel(steps_ref, blk_ref, tile_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                di_ref, sel_ref, pos_ref, dk_in_ref, dv_in_ref, dk_ref, dv_ref, *, scale,
                lsel, s_len, num_blocks):
  u = pl.program_id(0)
  blk = blk_ref[u]

  # The visits of a (pair, kv block) are consecutive; the first of this call starts
  # from the sums of the earlier calls (zeros before the first). Also on padded steps
  # (they repeat the last visit): a call of none still writes that block back intact.
  @pl.when((u == 0) | (blk_ref[jnp.maximum(u - 1, 0)] != blk))
  def _init():
    dk_ref[...] = dk_in_ref[...]
    dv_ref[...] = dv_in_ref[...]

  @pl.when(u < steps_ref[0])           # always, except on a static grid's padded steps
  def _visit():
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    allowed = _allowed(sel_ref[0, 0], pos_ref[0], lax.rem(blk, num_blocks), lsel, s_len)
    p = _probs(q, k, lse_ref[0, 0], allowed, scale)                  # [R, l']
    dv_ref[0, 0] += dot_tn(p.astype(do.dtype), do)
    ds = p * (dot_nt(do, v) - di_ref[0, 0])
    dk_ref[0, 0] += dot_tn(ds.astype(q.dtype), q)


def nsa_dkv_tpu(q, k, v, d_out, lse, di, sel, pos, blocks, tiles, steps, dk_acc, dv_acc,
                *, scale, select_block, block_rows, seq_len, static_grid=False,
                interpret=False):
  """(dk_acc, dv_acc) f32 [B, Hkv, S, D] / [.., Dv] plus the unscaled dk (Σ dsᵀ·q)
  and dv (Σ pᵀ·do) of the visits blocks[:steps], tiles[:steps].

  One grid step per visited (pair, kv block, query tile): blocks int32 [C] holds
  b·ns + j for (batch · kv head) pair b and kv block j (the wrapper folds the pairs
  into B and passes Hkv = 1), tiles int32 [C] the query tile, sorted by (b, j, tile);
  steps (int32 scalar <= C) is the dynamic grid size (entries past it repeat the last
  visit, so a step over them issues no DMA). static_grid=True runs a static grid of C
  steps instead, skipping those past `steps` — for interpret mode inside a
  `jax.shard_map`, whose devices Pallas' TPU interpreter runs in lock step (and whose
  grid indices a per-device bound would make vary over the mesh axes, unlike the
  constants they meet in the kernel). dk_acc / dv_acc are aliased to
  the outputs: a kv block's first visit in this call loads its running sums, so a
  block whose visits straddle two calls is summed across them in f32 (and blocks not
  visited keep theirs). GQA group summed (heads are tile rows).
  """
  b, hkv, tg, d = q.shape
  s, dv, n = k.shape[2], v.shape[3], sel.shape[3]
  lsel, rows = select_block, block_rows
  nb = s // lsel
  q_map = lambda u, n, blk, tile: (lax.div(blk[u], nb), 0, tile[u], 0)   # ids >= 0:
  pos_map = lambda u, n, blk, tile: (lax.div(blk[u], nb), tile[u], 0)    # C div/rem
  kv_map = lambda u, n, blk, tile: (lax.div(blk[u], nb), 0, lax.rem(blk[u], nb), 0)
  kv_specs = [pl.BlockSpec((1, 1, lsel, d), kv_map),
              pl.BlockSpec((1, 1, lsel, dv), kv_map)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(blocks.shape[0] if static_grid else steps,),
      in_specs=[pl.BlockSpec((1, 1, rows, d), q_map), *kv_specs,
                pl.BlockSpec((1, 1, rows, dv), q_map),
                pl.BlockSpec((1, 1, rows, 1), q_map),
                pl.BlockSpec((1, 1, rows, 1), q_map),
                pl.BlockSpec((1, 1, rows, n), q_map),
                pl.BlockSpec((1, rows, 1), pos_map), *kv_specs],
      out_specs=kv_specs)
  visited = blocks.shape[0]                                  # static bound on steps
  itemsize = q.dtype.itemsize
  args = (jnp.reshape(steps, (1,)), blocks, tiles, q, k, v, d_out, lse, di, sel, pos,
          dk_acc, dv_acc)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, lsel=lsel, s_len=seq_len,
                        num_blocks=nb),
      grid_spec=grid_spec,
      out_shape=[out_struct(dk_acc.shape, jnp.float32, *args),
                 out_struct(dv_acc.shape, jnp.float32, *args)],
      input_output_aliases={11: 0, 12: 1},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      cost_estimate=pl.CostEstimate(
          flops=2 * visited * rows * lsel * (2 * d + 2 * dv),
          transcendentals=visited * rows * lsel,
          bytes_accessed=b * hkv * s * 3 * (d + dv) * 4
          + visited * rows * (d + dv) * itemsize + visited * rows * (n + 3) * 4),
      interpret=interpret_params(interpret),
      name="nsa_selection_dkv_tpu",
  )(*args)


__all__ = ["nsa_fwd_tpu", "nsa_dq_tpu", "nsa_dkv_tpu", "MASK_VALUE", "EMPTY_LSE"]
