"""Memory lookup (PKM / UltraMem weighted gather-sum): TPU (Mosaic) kernels.

    out[l, g, :] = Σ_k w[l, k] · [groups[l, k] = g] · V[idx[l, k], :]  (f32 accumulation)

Shapes: V [N, v] float32/bfloat16 (stays in HBM), idx/groups int32 [L, K], w [L, K]
(upcast to f32), out [L, G, v] in result_type(V, w). Invalid lookups (index outside
[0, N) or group outside [0, G)) contribute exactly zero and get zero gradients
(`rule.mask_lookups`: the wrappers send them to row 0 with weight 0, mask their
d_weights and leave them out of the d_values CSR).

Tile alignment (Mosaic rejects DMAs at offsets that are not aligned to the memory
tiles: "Offsets along tiled dimensions must be aligned to tiles"):
  * float32 tables: one DMA per looked-up row V[r] (a 32-bit row at any sublane offset).
  * bfloat16 tables pack two rows per 32-bit sublane, so a single row is half a
    packed sublane: each lookup DMAs the aligned row pair V[2⌊r/2⌋ : 2⌊r/2⌋ + 2] into
    an even row pair of a bf16 VMEM buffer; the buffer is bitcast to uint32 words
    (low half = even row, high half = odd row) and the lookup's half is selected by the
    parity of r (even / odd one-hot matmuls). N must be even. This moves 2× the ideal
    bytes of a bf16 row (the bytes of an f32 row).
  * d_values metadata (sorted lookups) is DMA'd HBM → SMEM in 128-lane-aligned windows
    of META_WINDOW entries.

Forward (`lookup_fwd_tpu`): grid (cores, steps) over token tiles of TL tokens
(`token_tile`: TL·K ≈ LOOKUPS_PER_STEP, TL in [8, 64], a multiple of 8); tile =
core·steps + step. The leading axis is "parallel" (the two TensorCores of a megacore
chip, v4 / v5p, each take half the tiles; one core runs both halves in turn), the inner
one "arbitrary": step s issues the J = TL·K row DMAs (HBM → VMEM) of tile s + 1 into
the other slot before it waits for its own tile (step 0 of each core first issues its
own), so the rows of the next tile stream in while the current one computes (the
paged-attention double buffer); the whole slot is waited for with ONE semaphore wait
(the DMA semaphore counts bytes; the slot's J copies fill it exactly, as the ragged
paged-attention kernels wait). The flat indices are scalar-prefetched into SMEM; per
lookup a code (its output row t·G + g in the tile, + TL·G for odd bf16 rows) and its
f32 weight arrive as lane-dense [1, J] blocks, from which the block-diagonal weighted
one-hot W [TL·G, J] is built with one compare, and out_tile = W @ rows [J, v] is ONE
MXU matmul per step (two for bf16: even / odd rows), f32 HIGHEST. SMEM holds the
call's indices: the wrapper chunks the call over tokens to ≤ SMEM_TABLE_BYTES
(256 KiB, 65536 lookups). Rows are not deduplicated: with random lookups into N rows
a tile of J lookups repeats ≈ J²/(2N) rows (0.5 at J = 512, N = 256k), not worth a sort.

Backward:
  * d_values (`lookup_dvalues_tpu`): deterministic, no atomics. The XLA wrapper builds
    a CSR of the valid flat lookups sorted by row (stable argsort + bincount/cumsum)
    and the list of TOUCHED row tiles (R = 32 rows with ≥ 1 lookup; at most
    min(⌈N/R⌉, L·K) of them). The grid walks only that list (scalar-prefetched tile
    ids and lookup ranges, split into calls of ≤ DVALUES_SLOTS tiles for SMEM) with a
    (cores "parallel", steps "arbitrary") grid; the output is an XLA zeros [N, v]
    aliased into the kernel (`input_output_aliases`), whose BlockSpec writes exactly
    the touched tiles, each once: untouched rows keep their zeros without a grid step.
    Padding slots repeat the last touched tile without recomputing it (its block stays
    resident); the first step of a core recomputes it (same bits). Per tile, chunks of
    C = 64 sorted lookups: an aligned metadata window (dY row id l·G + g, target row,
    weight) HBM → SMEM, then the chunk's dY rows (row pairs for bf16) HBM → VMEM,
    the weighted one-hot [R, C] and acc += one-hot @ dY-rows on the MXU (f32). The
    first chunk of the next tile is prefetched during the current one (metadata two
    steps ahead in a 3-slot SMEM ring, rows one step ahead in a 2-slot VMEM buffer);
    further chunks of a hot tile are fetched in turn.
  * d_weights (`lookup_dweights_tpu`): the forward's gather pipeline; dY arrives as a
    VMEM block [TL·G, v]; S = dY @ rowsᵀ [TL·G, J] (one matmul) and
    dw[j] = Σ_r [code[j] = r] · S[r, j], stored as a lane-dense [1, J] block. f32 [L, K].

VMEM (bytes; J = TL·K, J' = J rounded up to 128 lanes, TG = TL·G; b = 4 for the row
buffers of both dtypes):
  forward    2·J·v·4 (row slots) + 3·J·v·4 (f32 rows, bf16 halves) + 3·TG·J'·4 (one-hots)
             + 3·TG·v·4 (out blocks, acc) + 4·8·J'·4 (code, weight blocks)
  d_weights  the same with the dY blocks (2·TG·v·4) for the out blocks and [1, J] outputs
  d_values   2·C·v·4 + 3·R·v·4 + 3·C·v·4
`vmem_bytes` computes the larger of forward and d_weights; `kernel_unmet` in the
package turns a footprint over VMEM_BUDGET (12 MiB, under v5e's 16 MiB default scoped
limit) into an XLA fallback for impl="auto".

Roofline (b(·) = bytes per element, FLOPs negligible; HBM bound, and at small v·b(V)
bound by the DMA issue rate — one descriptor per lookup; keep rows ≥ 2-4 KB):
  forward    ideal L·K·v·b(V) + L·G·v·b(out) + L·K·(4 + 4 + b(w))
             moved: b(V) → 4 (bf16 row pairs); per lookup 4 (index) + 4 (code: the
             group) + 4 (f32 weight)
  d_values   ideal L·K·v·b(dY) + N·v·b(V) + L·K·(4 + 4 + 4) (+ the XLA sort of L·K int32)
             moved: the dY row pairs for bf16; untouched tiles cost the XLA zeros only
  d_weights  ideal L·K·v·b(V) + L·G·v·b(dY) + L·K·(4 + 4 + 4)  (moved: as the forward)
Counts at T·H = L = 8192, K = 32, v = 256, N = 262144, G = 1 (computed from
these tilings by the kernel tests). Before → after:
  forward / d_weights  grid steps 1024 → 512 (TL 8 → 16; 4 SMEM chunks × 2 cores ×
             64 steps); row DMAs 262144 (unchanged: one per lookup); semaphore waits
             262144 → 512; matmuls per step TL = 8 → 1 (2 for bf16)
  d_values   grid steps 8192 → ≤ 8192 touched tiles (all touched at this shape: random
             rows hit every 32-row tile; at L = 64 only ≤ 2048 of the 8192); DMA round
             trips exposed per tile (metadata, then rows) 2 → 0 when the next tile's
             first chunk (≈ 32 lookups per tile here, one chunk) lands within a step.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (SMEM_TABLE_BYTES, dot, dot_nt, interpret_params,
                                     match_vma, out_struct)
from pallas_kernels.memory_lookup.csr import sorted_csr, touched_tiles
from pallas_kernels.memory_lookup.rule import mask_lookups

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
LOOKUPS_PER_STEP = 512    # target row DMAs per forward / d_weights grid step
MIN_TOKEN_TILE, MAX_TOKEN_TILE = 8, 64
NUM_CORES = 2             # leading "parallel" grid axis: the TensorCores of a megacore
ROW_TILE = 32             # value rows per d_values grid step
CHUNK = 64                # sorted lookups per d_values DMA chunk
META_WINDOW = 256         # metadata entries per aligned SMEM window (>= 127 + CHUNK)
VMEM_BUDGET = 12 * 1024 * 1024  # largest forward / d_weights VMEM footprint accepted
DVALUES_SLOTS = SMEM_TABLE_BYTES // 12   # touched tiles per d_values call (3 tables)
_LANES = 128


def packing(dtype) -> int:
  """Table rows per DMA: 2 for bfloat16 (a packed 32-bit sublane), else 1."""
  return 2 if jnp.dtype(dtype) == jnp.bfloat16 else 1


def token_tile(k: int) -> int:
  """Tokens per forward / d_weights step: TL·K ≈ LOOKUPS_PER_STEP, a multiple of 8 in
  [MIN_TOKEN_TILE, MAX_TOKEN_TILE]."""
  tl = LOOKUPS_PER_STEP // max(k, 1) // 8 * 8
  return max(MIN_TOKEN_TILE, min(MAX_TOKEN_TILE, tl))


def vmem_bytes(v: int, k: int, num_groups: int) -> int:
  """VMEM footprint (bytes) of the forward / d_weights kernels, the larger one."""
  tl = token_tile(k)
  j, tg = tl * k, tl * num_groups
  jl = pl.cdiv(j, _LANES) * _LANES
  rows = 2 * j * v * 4 + 3 * j * v * 4 + 3 * tg * jl * 4
  forward = rows + 3 * tg * v * 4 + 4 * 8 * jl * 4
  d_weights = rows + 2 * tg * v * 4 + 4 * 8 * jl * 4
  return max(forward, d_weights)


def _pad_tokens(x, lp):
  return x if x.shape[0] == lp else jnp.pad(x, ((0, lp - x.shape[0]),) + ((0, 0),) *
                                            (x.ndim - 1))


def _unpack_rows(x, p: int):
  """Rows in a VMEM buffer -> [(f32 rows, parity they hold)] (parity 0 for f32).

  p = 1: x [M, v] f32 -> [(x, 0)]. p = 2: x [2M, v] bf16 row pairs -> the even
  rows (low 16 bits of each uint32 word, parity 0) and the odd rows (high 16 bits,
  parity 1), each [M, v].
  """
  if p == 1:
    return [(x.astype(jnp.float32), 0)]
  words = pltpu.bitcast(x, jnp.uint32)
  return [(pltpu.bitcast(words << 16, jnp.float32), 0),
          (pltpu.bitcast(words & jnp.uint32(0xFFFF0000), jnp.float32), 1)]


def _row_copy(src_hbm, row, dst, j, sem, p: int):
  """DMA of row `row` (p = 1) or of its aligned row pair (p = 2) into slot j of dst."""
  if p == 1:
    return pltpu.make_async_copy(src_hbm.at[pl.ds(row, 1)], dst.at[pl.ds(j, 1)], sem)
  start = pl.multiple_of(lax.div(row, 2) * 2, 2)
  return pltpu.make_async_copy(src_hbm.at[pl.ds(start, 2)],
                               dst.at[pl.ds(pl.multiple_of(2 * j, 2), 2)], sem)


def _wait_all(ref, sem):
  """One wait for every copy into `ref` on `sem` (together exactly ref's bytes): a
  same-sized descriptor, as ragged paged attention waits for a block of pages."""
  pltpu.make_async_copy(ref, ref, sem).wait()


def _grid_position():
  """(tile, step, steps) of a (cores, steps) grid: tile = core·steps + step."""
  s, steps = pl.program_id(1), pl.num_programs(1)
  return pl.program_id(0) * steps + s, s, steps


def _gather_rows(idx_ref, v_hbm, buf, sem, *, j: int, p: int):
  """The double-buffered row DMAs of the forward / d_weights: tile t's J rows
  V[idx[t·J + j]] go to buf[slot, j·p : (j+1)·p]. Starts this step's copies (step 0
  of a core only) and the next step's, waits for this step's; returns its unpacked
  rows (`_unpack_rows`), [J, v] each."""
  tile, s, steps = _grid_position()
  slot = lax.rem(s, 2)     # (lax div/rem: `%`/`//` lower via `sign`, needs a TPU)

  def start(t, slot):
    base = t * j

    def body(i, carry):
      _row_copy(v_hbm, idx_ref[base + i], buf.at[slot], i, sem.at[slot], p).start()
      return carry

    lax.fori_loop(0, j, body, 0)

  @pl.when(s == 0)
  def _():
    start(tile, slot)

  @pl.when(s + 1 < steps)
  def _():
    start(tile + 1, 1 - slot)

  _wait_all(buf.at[slot], sem.at[slot])
  return _unpack_rows(buf[slot], p)


def _fwd_kernel(idx_ref, v_hbm, code_ref, w_ref, o_ref, buf, sem, *, j, tg, p):
  parts = _gather_rows(idx_ref, v_hbm, buf, sem, j=j, p=p)
  code, w = code_ref[0], w_ref[0]                                   # [1, J]
  ri = lax.broadcasted_iota(jnp.int32, (tg, j), 0)
  acc = None
  for rows, parity in parts:
    part = dot(jnp.where(ri + parity * tg == code, w, 0.0), rows)   # [TG, v]
    acc = part if acc is None else acc + part
  o_ref[...] = acc.astype(o_ref.dtype)


def _dw_kernel(idx_ref, v_hbm, code_ref, dy_ref, dw_ref, buf, sem, *, j, tg, p):
  parts = _gather_rows(idx_ref, v_hbm, buf, sem, j=j, p=p)
  code, dy = code_ref[0], dy_ref[...].astype(jnp.float32)          # [1, J], [TG, v]
  ri = lax.broadcasted_iota(jnp.int32, (tg, j), 0)
  dw = None
  for rows, parity in parts:
    s = dot_nt(dy, rows)                                             # [TG, J]
    part = jnp.sum(jnp.where(ri + parity * tg == code, s, 0.0), axis=0, keepdims=True)
    dw = part if dw is None else dw + part
  dw_ref[0] = dw


def _token_chunks(l: int, k: int, tl: int):
  """Token ranges of at most SMEM_TABLE_BYTES of scalar-prefetched indices each."""
  per = max(tl, (SMEM_TABLE_BYTES // (4 * k)) // tl * tl)
  return [(s, min(l, s + per)) for s in range(0, max(l, 1), per)]


def _core_split(num: int) -> tuple[int, int]:
  """(cores, steps per core) for `num` grid items on the leading "parallel" axis."""
  cores = min(NUM_CORES, max(num, 1))
  return cores, pl.cdiv(max(num, 1), cores)


def _check_rows(values):
  n = values.shape[0]
  if packing(values.dtype) == 2 and n % 2:
    raise ValueError(f"bfloat16 values need an even number of rows (the TPU kernel "
                     f"reads aligned row pairs), got N={n}")


def _chunked_gather(kernel, idx, values, code, lookup_arg, row_arg, out_flat: bool,
                    out_dtype, *, num_groups, interpret, name, bytes_per_token):
  """Runs a gather kernel over token chunks (SMEM) and token tiles (grid).

  idx, code [L, K] int32; lookup_arg [L, K] (the forward's weights) or None; row_arg
  [L, G, v] (d_weights' dY) or None. Output: [L, G, v] (out_flat False) or [L, K]
  f32 (out_flat True)."""
  l, k = idx.shape
  v = values.shape[1]
  tl, p = token_tile(k), packing(values.dtype)
  j, tg = tl * k, tl * num_groups
  outs = []
  for s, e in _token_chunks(l, k, tl):
    cores, steps = _core_split(pl.cdiv(e - s, tl))
    lp = cores * steps * tl
    tile = lambda c, st, *_: c * steps + st
    flat = lambda x: _pad_tokens(x[s:e], lp).reshape(lp // tl, 1, j)
    flat_spec = pl.BlockSpec((1, 1, j), lambda c, st, *_: (tile(c, st), 0, 0))
    row_spec = pl.BlockSpec((tg, v), lambda c, st, *_: (tile(c, st), 0))
    args = [flat(code)]
    if lookup_arg is not None:
      args.append(flat(lookup_arg))
    if row_arg is not None:
      args.append(_pad_tokens(row_arg[s:e], lp).reshape(lp * num_groups, v))
    specs = [flat_spec] * (len(args) - (row_arg is not None)) + [row_spec] * (
        row_arg is not None)
    if out_flat:
      out_shape, out_spec = (lp // tl, 1, j), flat_spec
    else:
      out_shape, out_spec = (lp * num_groups, v), row_spec
    idx_c = _pad_tokens(idx[s:e], lp).reshape(-1)
    out = pl.pallas_call(
        functools.partial(kernel, j=j, tg=tg, p=p),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(cores, steps),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)] + specs,
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((2, j * p, v), values.dtype),
                            pltpu.SemaphoreType.DMA((2,))]),
        out_shape=out_struct(out_shape, out_dtype, idx_c, values, *args),
        # Cores split the tiles; within a core step s prefetches step s + 1's rows.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * lp * k * tg * v, transcendentals=0,
                                      bytes_accessed=(e - s) * bytes_per_token),
        interpret=interpret_params(interpret),
        name=name,
    )(idx_c, values, *args)
    outs.append(out.reshape((lp, k) if out_flat else (lp, num_groups, v))[:e - s])
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def _codes(idx, grp, num_groups: int, p: int):
  """int32 [L, K]: each lookup's output row t·G + g within its token tile, + TL·G for
  the odd row of a bf16 row pair (the second one-hot)."""
  l, k = idx.shape
  tl = token_tile(k)
  code = (jnp.arange(l, dtype=jnp.int32) % tl)[:, None] * num_groups + grp
  return code + (idx & 1) * (tl * num_groups) if p == 2 else code


def lookup_fwd_tpu(values, indices, weights, groups, num_groups: int, *, interpret=False):
  """Forward: values [N, v], indices/weights/groups [L, K] -> [L, G, v] (no autodiff)."""
  _check_rows(values)
  n, v = values.shape
  k = indices.shape[1]
  out_dtype = jnp.result_type(values.dtype, weights.dtype)
  idx, w, grp, _ = mask_lookups(indices, weights, groups, n, num_groups)
  p = packing(values.dtype)
  return _chunked_gather(
      _fwd_kernel, idx, values, _codes(idx, grp, num_groups, p), w.astype(jnp.float32),
      None, False, out_dtype, num_groups=num_groups, interpret=interpret,
      name="memory_lookup_fwd_tpu",
      bytes_per_token=k * v * values.dtype.itemsize * p
      + num_groups * v * jnp.dtype(out_dtype).itemsize + k * (4 + 4 + 4))


def lookup_dweights_tpu(values, indices, groups, d_out, *, interpret=False):
  """d_weights[l, k] = <d_out[l, groups[l, k]], values[indices[l, k]]> as f32 [L, K]
  (0 for invalid lookups)."""
  _check_rows(values)
  n, v = values.shape
  k = indices.shape[1]
  num_groups = d_out.shape[1]
  idx, _, grp, valid = mask_lookups(indices, jnp.zeros(indices.shape, jnp.float32),
                                    groups, n, num_groups)
  p = packing(values.dtype)
  dw = _chunked_gather(
      _dw_kernel, idx, values, _codes(idx, grp, num_groups, p), None, d_out, True,
      jnp.float32, num_groups=num_groups, interpret=interpret,
      name="memory_lookup_dweights_tpu",
      bytes_per_token=k * v * values.dtype.itemsize * p
      + num_groups * v * d_out.dtype.itemsize + k * 12)
  return jnp.where(valid, dw, 0.0)


class _Meta:
  """Aligned metadata windows (dY row ids, target rows, weights of the sorted lookups)
  HBM → a 3-slot SMEM ring; entry e of the window of slot m starting at lookup `base`
  is read at m·META_WINDOW + (base − window) + e."""

  def __init__(self, hbms, smems, sem):
    self.hbms, self.smems, self.sem = hbms, smems, sem

  @staticmethod
  def window(base):
    return pl.multiple_of(lax.div(base, _LANES) * _LANES, _LANES)

  def copies(self, base, m):
    w = self.window(base)
    return [pltpu.make_async_copy(hbm.at[0, pl.ds(w, META_WINDOW)],
                                  smem.at[pl.ds(m * META_WINDOW, META_WINDOW)],
                                  self.sem.at[m, i])
            for i, (hbm, smem) in enumerate(zip(self.hbms, self.smems))]

  def start(self, base, m):
    for cp in self.copies(base, m):
      cp.start()

  def wait(self, base, m):
    for cp in self.copies(base, m):
      cp.wait()

  def at(self, base, m):
    """Offset of lookup `base` in the SMEM tables for slot m."""
    return m * META_WINDOW + base - self.window(base)


def _dv_kernel(tile_ref, start_ref, end_ref, num_ref, dy_hbm, src_hbm, row_hbm, w_hbm,
               dv_in, dv_ref, buf, src_s, row_s, w_s, acc, sem, msem, *, r, c, p):
  del dv_in                        # the zeros aliased to dv_ref: never read
  g, s, steps = _grid_position()
  num = num_ref[0]
  meta = _Meta((src_hbm, row_hbm, w_hbm), (src_s, row_s, w_s), msem)
  mslot, rslot = lax.rem(s, 3), lax.rem(s, 2)

  def issue(base, end, m, slot):
    """Row DMAs of the chunk of ≤ C lookups from `base` (metadata in slot m)."""
    o = meta.at(base, m)

    def body(j, carry):
      _row_copy(dy_hbm, src_s[o + j], buf.at[slot], j, sem.at[slot], p).start()
      return carry

    lax.fori_loop(0, jnp.minimum(c, end - base), body, 0)

  def consume(base, end, m, slot, r0):
    """acc += weighted one-hot [R, C] @ the chunk's dY rows (waits for them)."""
    cnt = jnp.minimum(c, end - base)
    o = meta.at(base, m)
    ri = lax.broadcasted_iota(jnp.int32, (r, c), 0)
    ci = lax.broadcasted_iota(jnp.int32, (r, c), 1)

    def onehot_cols(j, ohs):    # overlaps the in-flight row DMAs
      hit = (ci == j) & (ri == row_s[o + j] - r0)
      w = w_s[o + j]
      if p == 1:
        return (jnp.where(hit, w, ohs[0]),)
      odd = lax.rem(src_s[o + j], 2) == 1
      return (jnp.where(hit & ~odd, w, ohs[0]), jnp.where(hit & odd, w, ohs[1]))

    ohs = lax.fori_loop(0, cnt, onehot_cols, (jnp.zeros((r, c), jnp.float32),) * p)

    def wait(j, carry):
      _row_copy(dy_hbm, 0, buf.at[slot], 0, sem.at[slot], p).wait()
      return carry

    lax.fori_loop(0, cnt, wait, 0)
    cr = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    for onehot, (rows, _) in zip(ohs, _unpack_rows(buf[slot], p)):
      acc[...] += dot(onehot, jnp.where(cr < cnt, rows, 0.0))   # stale rows -> 0

  @pl.when(s == 0)                 # prime: this tile's first chunk, next one's metadata
  def _():
    meta.start(start_ref[g], mslot)
    meta.wait(start_ref[g], mslot)
    issue(start_ref[g], end_ref[g], mslot, rslot)

    @pl.when((s + 1 < steps) & (g + 1 < num))
    def _():
      meta.start(start_ref[g + 1], lax.rem(s + 1, 3))

  @pl.when((s + 1 < steps) & (g + 1 < num))   # next tile: rows; the one after: metadata
  def _():
    m1 = lax.rem(s + 1, 3)
    meta.wait(start_ref[g + 1], m1)
    issue(start_ref[g + 1], end_ref[g + 1], m1, 1 - rslot)

    @pl.when((s + 2 < steps) & (g + 2 < num))
    def _():
      meta.start(start_ref[g + 2], lax.rem(s + 2, 3))

  @pl.when((g < num) | (s == 0))   # padding slots keep the resident block
  def _():
    s0, s1, r0 = start_ref[g], end_ref[g], tile_ref[g] * r
    acc[...] = jnp.zeros_like(acc)
    consume(s0, s1, mslot, rslot, r0)

    def chunk(ch, carry):          # the further chunks of a hot tile, in turn
      base = s0 + ch * c
      meta.start(base, mslot)
      meta.wait(base, mslot)
      issue(base, s1, mslot, rslot)
      consume(base, s1, mslot, rslot, r0)
      return carry

    lax.fori_loop(1, lax.div(s1 - s0 + c - 1, c), chunk, 0)
    dv_ref[...] = acc[...].astype(dv_ref.dtype)


def lookup_dvalues_tpu(values, indices, weights, groups, d_out, *, interpret=False):
  """d_values [N, v] (values' dtype) = Σ_{valid (l,k): idx = n} w[l,k]·d_out[l, g[l,k]]
  (g = groups)."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  r = ROW_TILE
  npad = pl.cdiv(n, r) * r
  valid = (indices >= 0) & (indices < n)           # rows in [n, npad) are not rows
  offsets, rows, src, w = sorted_csr(jnp.where(valid, indices, -1), weights, groups,
                                     npad, num_groups)
  m = l * k
  # [1, P]: aligned windows may read up to META_WINDOW past the last 128-lane start
  # (2-D: rank-1 HBM operands need a TPU to lower).
  total = pl.cdiv(m, _LANES) * _LANES + META_WINDOW
  src, rows, w = (jnp.pad(x, (0, total - m))[None] for x in (src, rows, w))
  dy = d_out.reshape(l * num_groups, v)
  p = packing(dy.dtype)
  if p == 2 and dy.shape[0] % 2:                   # row pairs: an even number of rows
    dy = jnp.pad(dy, ((0, 1), (0, 0)))
  slots = min(npad // r, m)                        # touched tiles: at most one a lookup
  tiles, starts, ends, num = touched_tiles(offsets, npad // r, r, slots)
  dv = match_vma(jnp.zeros((npad, v), values.dtype), dy, values)[0]   # aliased output
  for a in range(0, slots, DVALUES_SLOTS):
    b = min(slots, a + DVALUES_SLOTS)
    dv = _dvalues_call(tiles[a:b], starts[a:b], ends[a:b], jnp.clip(num - a, 0, b - a),
                       dy, src, rows, w, dv, m, p=p, interpret=interpret)
  return dv[:n]


def _dvalues_call(tiles, starts, ends, num, dy, src, rows, w, dv, m: int, *, p: int,
                  interpret):
  """Writes the dV tiles of `tiles` (the first `num` real, the rest repeats) into `dv`
  (aliased: the other rows keep their values)."""
  r, c, v = ROW_TILE, CHUNK, dy.shape[1]
  cores, steps = _core_split(tiles.shape[0])
  pad = cores * steps - tiles.shape[0]
  tiles, starts, ends = (jnp.pad(x, (0, pad), mode="edge") for x in (tiles, starts, ends))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(cores, steps),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 5,
      out_specs=pl.BlockSpec((r, v), lambda ci, s, t, *_: (t[ci * steps + s], 0)),
      scratch_shapes=[pltpu.VMEM((2, c * p, v), dy.dtype),
                      pltpu.SMEM((3 * META_WINDOW,), jnp.int32),
                      pltpu.SMEM((3 * META_WINDOW,), jnp.int32),
                      pltpu.SMEM((3 * META_WINDOW,), jnp.float32),
                      pltpu.VMEM((r, v), jnp.float32),
                      pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((3, 3))])
  num = jnp.reshape(num, (1,)).astype(jnp.int32)
  return pl.pallas_call(
      functools.partial(_dv_kernel, r=r, c=c, p=p),
      grid_spec=grid_spec,
      out_shape=out_struct(dv.shape, dv.dtype, tiles, dy, src, rows, w, dv),
      input_output_aliases={8: 0},
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * v, transcendentals=0,
          bytes_accessed=m * v * dy.dtype.itemsize * p
          + tiles.shape[0] * r * v * dv.dtype.itemsize + m * 12),
      interpret=interpret_params(interpret),
      name="memory_lookup_dvalues_tpu",
  )(tiles, starts, ends, num, dy, src, rows, w, dv)


__all__ = ["lookup_fwd_tpu", "lookup_dvalues_tpu", "lookup_dweights_tpu", "token_tile",
           "vmem_bytes", "packing", "SUPPORTED_DTYPES", "ROW_TILE", "CHUNK", "META_WINDOW",
           "VMEM_BUDGET"]
