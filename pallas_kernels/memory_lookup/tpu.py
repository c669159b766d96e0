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
    parity of r with two one-hot matmuls (even / odd lookups). N must be even.
    This moves 2× the ideal bytes of a bf16 row (the bytes of an f32 row).
  * d_values metadata (sorted lookups) is DMA'd HBM → SMEM in 128-lane-aligned windows
    of META_WINDOW entries.

Forward (`lookup_fwd_tpu`): grid over token tiles of TL = 8 tokens ("arbitrary": the
steps run in order). The flat indices [L·K] are scalar-prefetched into SMEM; w, groups
(and for bf16 the index parities) are VMEM blocks [TL, K]. Each step issues one DMA per
lookup (HBM → VMEM scratch, TL·K rows or row pairs) for the *next* tile into the other
slot, then waits for its own tile (double buffering across grid steps, the
paged-attention pattern), and per token computes the weighted one-hot [G, K] @ rows
[K, v] on the MXU in f32 (precision HIGHEST). SMEM holds L·K·4 bytes of indices: the
wrapper chunks the call over tokens so that a chunk holds at most SMEM_TABLE_BYTES
(256 KiB, 65536 lookups). Rows are not deduplicated within a tile.

Backward:
  * d_values (`lookup_dvalues_tpu`): deterministic, no atomics. The XLA wrapper builds
    a CSR of the valid flat lookups sorted by row (stable argsort + bincount/cumsum);
    grid over value-row tiles of R = 32 rows, each tile's dV block written exactly once.
    The per-tile bounds into the sorted lookups (int32, scalar-prefetched) are split
    into calls of at most DVALUES_TILES = SMEM_TABLE_BYTES / 4 − 1 tiles (2M rows);
    per chunk of C = 64 sorted lookups the kernel DMAs an aligned metadata window (dY
    row id l·G + g, target row, weight) HBM → SMEM, then the C dY rows (row pairs for
    bf16) HBM → VMEM, builds the weighted one-hot [R, C] and accumulates
    one-hot @ dY-rows into an f32 [R, v] scratch on the MXU.
  * d_weights (`lookup_dweights_tpu`): the forward's gather pipeline over token tiles;
    dY arrives as a VMEM block [TL, G, v]; per token S = dY[l] @ rows^T [G, K] and
    dw[l, k] = S[groups[l, k], k] (one-hot select). Output f32 [L, K].

VMEM (bytes, b = 4 for the row buffers of both dtypes, K' = K rounded up to 128 lanes):
  forward    2·TL·K·v·4 (row slots) + 3·K·v·4 (f32 rows, temporaries)
             + 2·TL·G·v·4 (out blocks) + 6·TL·K'·4 (w, groups, parity blocks)
  d_weights  the forward's + 2·TL·G·v·4 (dY blocks)
  d_values   C·v·4 + 3·R·v·4 + 3·C·v·4
`vmem_bytes` computes the larger of forward and d_weights; `kernel_unmet` in the
package turns a footprint over VMEM_BUDGET (12 MiB, under v5e's 16 MiB default scoped
limit) into an XLA fallback for impl="auto".

Roofline (b(·) = bytes per element, FLOPs negligible; HBM bound, and at small v·b(V)
bound by the DMA issue rate — keep rows ≥ 2-4 KB):
  forward    L·K·v·b(V) + L·G·v·b(out) + L·K·(4 + 4 + b(w))    (moved: 4 for b(V))
  d_values   L·K·v·b(dY) + N·v·b(V) + L·K·(4 + 4 + 4) (+ the XLA sort of L·K int32)
  d_weights  L·K·v·b(V) + L·G·v·b(dY) + L·K·(4 + 4 + 4)
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import (SMEM_TABLE_BYTES, dot, dot_nt, interpret_params,
                                     out_struct)
from pallas_kernels.memory_lookup.rule import mask_lookups

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
TOKEN_TILE = 8            # tokens per forward / d_weights grid step
ROW_TILE = 32             # value rows per d_values grid step
CHUNK = 64                # sorted lookups per d_values DMA chunk
META_WINDOW = 256         # metadata entries per aligned SMEM window (>= 127 + CHUNK)
VMEM_BUDGET = 12 * 1024 * 1024  # largest forward / d_weights VMEM footprint accepted
DVALUES_TILES = SMEM_TABLE_BYTES // 4 - 1   # d_values row tiles per call (SMEM bounds)
_LANES = 128


def packing(dtype) -> int:
  """Table rows per DMA: 2 for bfloat16 (a packed 32-bit sublane), else 1."""
  return 2 if jnp.dtype(dtype) == jnp.bfloat16 else 1


def vmem_bytes(v: int, k: int, num_groups: int) -> int:
  """VMEM footprint (bytes) of the forward / d_weights kernels, the larger one."""
  tl, kl = TOKEN_TILE, pl.cdiv(k, _LANES) * _LANES
  forward = 2 * tl * k * v * 4 + 3 * k * v * 4 + 2 * tl * num_groups * v * 4 \
      + 6 * tl * kl * 4
  return forward + 2 * tl * num_groups * v * 4


def _pad_tokens(x, lp):
  return x if x.shape[0] == lp else jnp.pad(x, ((0, lp - x.shape[0]),) + ((0, 0),) *
                                            (x.ndim - 1))


def _unpack_rows(x, p: int):
  """Rows in a VMEM buffer -> [(f32 rows, parity they hold)] (parity None: all rows).

  p = 1: x [M, v] f32 -> [(x, None)]. p = 2: x [2M, v] bf16 row pairs -> the even
  rows (low 16 bits of each uint32 word) and the odd rows (high 16 bits), each [M, v].
  """
  if p == 1:
    return [(x.astype(jnp.float32), None)]
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


class _RowGather:
  """Double-buffered row DMAs V[idx[step·TL·K + j]] -> buf[slot, j·p : (j+1)·p]."""

  def __init__(self, idx_ref, v_hbm, buf, sem, tl: int, k: int, p: int):
    self.idx_ref, self.v_hbm, self.buf, self.sem, self.tl, self.k, self.p = (
        idx_ref, v_hbm, buf, sem, tl, k, p)

  def start(self, step, slot):
    base = step * (self.tl * self.k)

    def body(j, carry):
      _row_copy(self.v_hbm, self.idx_ref[base + j], self.buf.at[slot], j,
                self.sem.at[slot], self.p).start()
      return carry

    lax.fori_loop(0, self.tl * self.k, body, 0)

  def wait(self, slot):
    def body(j, carry):   # every copy has the same size: wait with a same-shaped one
      _row_copy(self.v_hbm, 0, self.buf.at[slot], 0, self.sem.at[slot], self.p).wait()
      return carry

    lax.fori_loop(0, self.tl * self.k, body, 0)

  def pipeline(self):
    """Starts this step's (first step only) and the next step's copies, waits for this
    step's; returns the unpacked rows of this step (see `_unpack_rows`), [TL·K, v]."""
    i, n = pl.program_id(0), pl.num_programs(0)
    slot = lax.rem(i, 2)     # (lax div/rem: `%`/`//` lower via `sign`, needs a TPU)

    @pl.when(i == 0)
    def _():
      self.start(0, 0)

    @pl.when(i + 1 < n)
    def _():
      self.start(i + 1, 1 - slot)

    self.wait(slot)
    return _unpack_rows(self.buf[slot], self.p)


def _select(parts, par_row, t, k):
  """Per token t: [(rows [K, v], lookup mask [1, K] or None)] for the row halves."""
  return [(rows[t * k:(t + 1) * k], None if parity is None else par_row == parity)
          for rows, parity in parts]


def _fwd_kernel(idx_ref, v_hbm, w_ref, g_ref, par_ref, o_ref, buf, sem, *, tl, k,
                num_groups, p):
  parts = _RowGather(idx_ref, v_hbm, buf, sem, tl, k, p).pipeline()
  w, g, par = w_ref[...], g_ref[...], par_ref[...]                 # [TL, K]
  gi = lax.broadcasted_iota(jnp.int32, (num_groups, k), 0)
  for t in range(tl):
    hit = gi == g[t:t + 1, :]                                      # [G, K]
    acc = jnp.zeros(o_ref.shape[1:], jnp.float32)
    for rows, sel in _select(parts, par[t:t + 1, :], t, k):
      mask = hit if sel is None else hit & sel
      acc += dot(jnp.where(mask, w[t:t + 1, :], 0.0), rows)
    o_ref[t] = acc.astype(o_ref.dtype)


def _dw_kernel(idx_ref, v_hbm, g_ref, par_ref, dy_ref, dw_ref, buf, sem, *, tl, k,
               num_groups, p):
  parts = _RowGather(idx_ref, v_hbm, buf, sem, tl, k, p).pipeline()
  g, par = g_ref[...], par_ref[...]
  gi = lax.broadcasted_iota(jnp.int32, (num_groups, k), 0)
  for t in range(tl):
    dy = dy_ref[t].astype(jnp.float32)                             # [G, v]
    s = jnp.zeros((num_groups, k), jnp.float32)
    for rows, sel in _select(parts, par[t:t + 1, :], t, k):
      st = dot_nt(dy, rows)                                        # [G, K]
      s = st if sel is None else jnp.where(sel, st, s)
    dw_ref[pl.ds(t, 1), :] = jnp.sum(jnp.where(gi == g[t:t + 1, :], s, 0.0), axis=0,
                                     keepdims=True)


def _gather_call(kernel, idx, values, block_args, block_specs, out_rows, out_dtype,
                 out_spec, *, lp, k, interpret, name, bytes_accessed):
  tl, p = TOKEN_TILE, packing(values.dtype)
  v = values.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(lp // tl,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] + block_specs,
      out_specs=out_spec,
      scratch_shapes=[pltpu.VMEM((2, tl * k * p, v), values.dtype),
                      pltpu.SemaphoreType.DMA((2,))])
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_struct(out_rows, out_dtype, idx, values, *block_args),
      # Sequential grid: step i prefetches step i+1's rows.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      cost_estimate=pl.CostEstimate(flops=2 * lp * k * v, transcendentals=0,
                                    bytes_accessed=bytes_accessed),
      interpret=interpret_params(interpret),
      name=name,
  )(idx.reshape(-1), values, *block_args)


def _token_chunks(l: int, k: int):
  """Token ranges of at most SMEM_TABLE_BYTES of scalar-prefetched indices each."""
  per = max(TOKEN_TILE, (SMEM_TABLE_BYTES // (4 * k)) // TOKEN_TILE * TOKEN_TILE)
  return [(s, min(l, s + per)) for s in range(0, max(l, 1), per)]


def _check_rows(values):
  n = values.shape[0]
  if packing(values.dtype) == 2 and n % 2:
    raise ValueError(f"bfloat16 values need an even number of rows (the TPU kernel "
                     f"reads aligned row pairs), got N={n}")


def _chunked_gather(kernel, idx, values, blocks, out_row_shape, out_dtype, *, k,
                    interpret, name, bytes_per_token):
  """Runs a gather kernel over token chunks: blocks are [L, ...] per-token inputs."""
  tl = TOKEN_TILE
  block_spec = lambda x: pl.BlockSpec((tl,) + x.shape[1:],
                                      lambda i, idx_ref: (i,) + (0,) * (x.ndim - 1))
  out_spec = pl.BlockSpec((tl,) + out_row_shape,
                          lambda i, idx_ref: (i,) + (0,) * len(out_row_shape))
  outs = []
  for s, e in _token_chunks(idx.shape[0], k):
    lp = pl.cdiv(e - s, tl) * tl
    args = [_pad_tokens(x[s:e], lp) for x in blocks]
    out = _gather_call(
        kernel, _pad_tokens(idx[s:e], lp), values, args, [block_spec(x) for x in args],
        (lp,) + out_row_shape, out_dtype, out_spec,
        lp=lp, k=k, interpret=interpret, name=name,
        bytes_accessed=(e - s) * bytes_per_token)
    outs.append(out[:e - s])
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def lookup_fwd_tpu(values, indices, weights, groups, num_groups: int, *, interpret=False):
  """Forward: values [N, v], indices/weights/groups [L, K] -> [L, G, v] (no autodiff)."""
  _check_rows(values)
  n, v = values.shape
  k = indices.shape[1]
  out_dtype = jnp.result_type(values.dtype, weights.dtype)
  idx, w, grp, _ = mask_lookups(indices, weights, groups, n, num_groups)
  p = packing(values.dtype)
  return _chunked_gather(
      functools.partial(_fwd_kernel, tl=TOKEN_TILE, k=k, num_groups=num_groups, p=p),
      idx, values, [w.astype(jnp.float32), grp, idx & 1], (num_groups, v), out_dtype,
      k=k, interpret=interpret, name="memory_lookup_fwd_tpu",
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
      functools.partial(_dw_kernel, tl=TOKEN_TILE, k=k, num_groups=num_groups, p=p),
      idx, values, [grp, idx & 1, d_out], (k,), jnp.float32,
      k=k, interpret=interpret, name="memory_lookup_dweights_tpu",
      bytes_per_token=k * v * values.dtype.itemsize * p
      + num_groups * v * d_out.dtype.itemsize + k * 12)
  return jnp.where(valid, dw, 0.0)


def sorted_csr(indices, weights, groups, num_rows: int, num_groups: int):
  """CSR of the valid flat lookups sorted (stably) by value row, built in XLA.

  Returns (offsets [num_rows + 1] int32, rows [M] int32 sorted row ids,
  src [M] int32 = l·G + g (the dY row of each sorted lookup), w [M] f32). Invalid
  lookups (row outside [0, num_rows), group outside [0, num_groups)) sort after
  offsets[num_rows] with weight 0, so no row's range contains them.
  """
  k = indices.shape[1]
  idx, w, grp, valid = mask_lookups(indices, weights, groups, num_rows, num_groups)
  flat = jnp.where(valid, idx, num_rows).reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  rows = flat[order]
  src = (order // k) * num_groups + grp.reshape(-1)[order]
  w = w.reshape(-1).astype(jnp.float32)[order]
  counts = jnp.zeros((num_rows,), jnp.int32).at[flat].add(1, mode="drop")
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts,
                                                                    dtype=jnp.int32)])
  return offsets, rows, src, w


def _dv_kernel(bounds_ref, dy_hbm, src_hbm, row_hbm, w_hbm, dv_ref,
               buf, src_s, row_s, w_s, acc, sem, msem, *, r, c, p, row0):
  i = pl.program_id(0)
  s0, s1 = bounds_ref[i], bounds_ref[i + 1]
  r0 = row0 + i * r
  acc[...] = jnp.zeros_like(acc)
  ri = lax.broadcasted_iota(jnp.int32, (r, c), 0)
  ci = lax.broadcasted_iota(jnp.int32, (r, c), 1)
  cr = lax.broadcasted_iota(jnp.int32, (c, 1), 0)

  def chunk(ch, carry):
    base = s0 + ch * c
    cnt = jnp.minimum(c, s1 - base)
    window = pl.multiple_of(lax.div(base, _LANES) * _LANES, _LANES)
    off = base - window                                   # < 128: off + c <= window
    meta = [pltpu.make_async_copy(hbm.at[0, pl.ds(window, META_WINDOW)], smem,
                                  msem.at[j])
            for j, (hbm, smem) in enumerate([(src_hbm, src_s), (row_hbm, row_s),
                                             (w_hbm, w_s)])]
    for cp in meta:
      cp.start()
    for cp in meta:
      cp.wait()

    def start(j, carry):
      _row_copy(dy_hbm, src_s[off + j], buf, j, sem.at[0], p).start()
      return carry

    def wait(j, carry):
      _row_copy(dy_hbm, 0, buf, 0, sem.at[0], p).wait()
      return carry

    lax.fori_loop(0, cnt, start, 0)

    def onehot_cols(j, ohs):    # overlaps the in-flight row DMAs
      hit = (ci == j) & (ri == row_s[off + j] - r0)
      w = w_s[off + j]
      if p == 1:
        return (jnp.where(hit, w, ohs[0]),)
      odd = lax.rem(src_s[off + j], 2) == 1
      return (jnp.where(hit & ~odd, w, ohs[0]), jnp.where(hit & odd, w, ohs[1]))

    ohs = lax.fori_loop(0, cnt, onehot_cols,
                        (jnp.zeros((r, c), jnp.float32),) * p)
    lax.fori_loop(0, cnt, wait, 0)
    for onehot, (rows, _) in zip(ohs, _unpack_rows(buf[...], p)):
      acc[...] += dot(onehot, jnp.where(cr < cnt, rows, 0.0))   # stale rows -> 0
    return carry

  lax.fori_loop(0, lax.div(s1 - s0 + c - 1, c), chunk, 0)
  dv_ref[...] = acc[...].astype(dv_ref.dtype)


def lookup_dvalues_tpu(values, indices, weights, groups, d_out, *, interpret=False):
  """d_values [N, v] (values' dtype) = Σ_{valid (l,k): idx = n} w[l,k]·d_out[l, g[l,k]]
  (g = groups)."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  r, c = ROW_TILE, CHUNK
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
  tiles = npad // r
  outs = []
  for t0 in range(0, tiles, DVALUES_TILES):
    nt = min(DVALUES_TILES, tiles - t0)
    bounds = offsets[t0 * r:(t0 + nt) * r + 1:r]                   # [nt + 1]
    outs.append(_dvalues_call(bounds, dy, src, rows, w, t0 * r, nt, values.dtype, m,
                              p=p, interpret=interpret))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  return out[:n]


def _dvalues_call(bounds, dy, src, rows, w, row0: int, num_tiles: int, dtype, m: int,
                  *, p: int, interpret):
  """dV rows [row0, row0 + num_tiles·R) from the CSR (bounds: the tiles' offsets)."""
  r, c, v = ROW_TILE, CHUNK, dy.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(num_tiles,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 4,
      out_specs=pl.BlockSpec((r, v), lambda i, b: (i, 0)),
      scratch_shapes=[pltpu.VMEM((c * p, v), dy.dtype),
                      pltpu.SMEM((META_WINDOW,), jnp.int32),
                      pltpu.SMEM((META_WINDOW,), jnp.int32),
                      pltpu.SMEM((META_WINDOW,), jnp.float32),
                      pltpu.VMEM((r, v), jnp.float32),
                      pltpu.SemaphoreType.DMA((1,)), pltpu.SemaphoreType.DMA((3,))])
  return pl.pallas_call(
      functools.partial(_dv_kernel, r=r, c=c, p=p, row0=row0),
      grid_spec=grid_spec,
      out_shape=out_struct((num_tiles * r, v), dtype, bounds, dy, src, rows, w),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * v, transcendentals=0,
          bytes_accessed=m * v * dy.dtype.itemsize * p
          + num_tiles * r * v * jnp.dtype(dtype).itemsize + m * 12),
      interpret=interpret_params(interpret),
      name="memory_lookup_dvalues_tpu",
  )(bounds, dy, src, rows, w)


__all__ = ["lookup_fwd_tpu", "lookup_dvalues_tpu", "lookup_dweights_tpu", "sorted_csr",
           "vmem_bytes", "packing", "SUPPORTED_DTYPES", "TOKEN_TILE", "ROW_TILE",
           "CHUNK", "META_WINDOW", "VMEM_BUDGET"]
