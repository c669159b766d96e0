"""Memory lookup (PKM / UltraMem weighted gather-sum): TPU (Mosaic) kernels.

    out[l, g, :] = Σ_k w[l, k] · [groups[l, k] = g] · V[idx[l, k], :]  (f32 accumulation)

Shapes: V [N, v] float32/bfloat16 (stays in HBM), idx/groups int32 [L, K], w [L, K]
(upcast to f32), out [L, G, v] in result_type(V, w).

Forward (`lookup_fwd_tpu`): grid over token tiles of TL = 8 tokens ("arbitrary": the
steps run in order). The flat indices [L·K] are scalar-prefetched into SMEM; w and
groups are VMEM blocks [TL, K]. Each step issues one `make_async_copy` per looked-up
row (TL·K row DMAs of v·b(V) bytes, HBM → VMEM scratch [2, TL, K, v]) for the *next*
tile into the other slot, then waits for its own tile (double buffering across grid
steps, the paged-attention pattern), and per token computes the weighted one-hot
[G, K] (from w and groups) @ rows [K, v] on the MXU in f32 (precision HIGHEST).
SMEM holds L·K·4 bytes of indices: the wrapper chunks the call over tokens so that a
chunk holds at most 512 KiB (131072 lookups). Rows are not deduplicated within a tile.

Backward:
  * d_values (`lookup_dvalues_tpu`): deterministic, no atomics. The XLA wrapper builds
    a CSR of the flat lookups sorted by row (stable argsort + bincount/cumsum); grid over
    value-row tiles of R = 32 rows, each tile's dV block written exactly once. The
    per-tile bounds into the sorted lookups ([N/R + 1] int32, i.e. ≤ 512 KiB of SMEM up
    to N ≈ 4M rows; not chunked) are scalar-prefetched;
    per chunk of C = 64 sorted lookups the kernel DMAs the metadata (dY row id
    l·G + g, target row, weight) HBM → SMEM, then the C dY rows HBM → VMEM [C, v]
    (one DMA each), builds the weighted one-hot [R, C] and accumulates
    one-hot @ dY-rows into an f32 [R, v] scratch on the MXU. Chunks of a tile are not
    overlapped with each other (start-all-then-wait within a chunk).
  * d_weights (`lookup_dweights_tpu`): the forward's gather pipeline over token tiles;
    dY arrives as a VMEM block [TL, G, v]; per token S = dY[l] @ rows^T [G, K] and
    dw[l, k] = S[groups[l, k], k] (one-hot select). Output f32 [L, K].

Roofline (b(·) = bytes per element, FLOPs negligible; HBM bound, and at small v·b(V)
bound by the DMA issue rate — keep rows ≥ 2-4 KB):
  forward    L·K·v·b(V) + L·G·v·b(out) + L·K·(4 + 4 + b(w))
  d_values   L·K·v·b(dY) + N·v·b(V) + L·K·(4 + 4 + 4) (+ the XLA sort of L·K int32)
  d_weights  L·K·v·b(V) + L·G·v·b(dY) + L·K·(4 + 4 + 4)
Out-of-range indices are clamped to [0, N) by the wrapper (as XLA's `mode="clip"`).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import HIGHEST, interpret_params

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
TOKEN_TILE = 8            # tokens per forward / d_weights grid step
ROW_TILE = 32             # value rows per d_values grid step
CHUNK = 64                # sorted lookups per d_values DMA chunk
SMEM_INDEX_BYTES = 512 * 1024   # max scalar-prefetched index bytes per forward call



def _pad_tokens(x, lp):
  return x if x.shape[0] == lp else jnp.pad(x, ((0, lp - x.shape[0]),) + ((0, 0),) *
                                            (x.ndim - 1))


class _RowGather:
  """Double-buffered per-row DMAs V[idx[step·TL·K + j]] -> buf[slot, j // K, j % K]."""

  def __init__(self, idx_ref, v_hbm, buf, sem, tl: int, k: int):
    self.idx_ref, self.v_hbm, self.buf, self.sem, self.tl, self.k = (
        idx_ref, v_hbm, buf, sem, tl, k)

  def start(self, step, slot):
    base = step * (self.tl * self.k)

    def body(j, carry):
      row = self.idx_ref[base + j]
      pltpu.make_async_copy(
          self.v_hbm.at[pl.ds(row, 1)],
          self.buf.at[slot, lax.div(j, self.k), pl.ds(lax.rem(j, self.k), 1)],
          self.sem.at[slot]).start()
      return carry

    lax.fori_loop(0, self.tl * self.k, body, 0)

  def wait(self, slot):
    def body(j, carry):   # every copy has the same size: wait with a same-shaped one
      pltpu.make_async_copy(self.v_hbm.at[pl.ds(0, 1)],
                            self.buf.at[slot, 0, pl.ds(0, 1)], self.sem.at[slot]).wait()
      return carry

    lax.fori_loop(0, self.tl * self.k, body, 0)

  def pipeline(self):
    """Starts this step's (first step only) and the next step's copies, waits for this
    step's; returns the slot holding this step's rows."""
    i, n = pl.program_id(0), pl.num_programs(0)
    slot = lax.rem(i, 2)     # (lax div/rem: `%`/`//` lower via `sign`, needs a TPU)

    @pl.when(i == 0)
    def _():
      self.start(0, 0)

    @pl.when(i + 1 < n)
    def _():
      self.start(i + 1, 1 - slot)

    self.wait(slot)
    return slot


def _fwd_kernel(idx_ref, v_hbm, w_ref, g_ref, o_ref, buf, sem, *, tl, k, num_groups):
  slot = _RowGather(idx_ref, v_hbm, buf, sem, tl, k).pipeline()
  w, g = w_ref[...], g_ref[...]                                   # [TL, K] f32, int32
  gi = lax.broadcasted_iota(jnp.int32, (num_groups, k), 0)
  for t in range(tl):
    rows = buf[slot, t].astype(jnp.float32)                        # [K, v]
    onehot = jnp.where(gi == g[t:t + 1, :], w[t:t + 1, :], 0.0)    # [G, K]
    o_ref[t] = jnp.dot(onehot, rows, precision=HIGHEST,
                       preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _dw_kernel(idx_ref, v_hbm, g_ref, dy_ref, dw_ref, buf, sem, *, tl, k, num_groups):
  slot = _RowGather(idx_ref, v_hbm, buf, sem, tl, k).pipeline()
  g = g_ref[...]
  gi = lax.broadcasted_iota(jnp.int32, (num_groups, k), 0)
  for t in range(tl):
    rows = buf[slot, t].astype(jnp.float32)                        # [K, v]
    dy = dy_ref[t].astype(jnp.float32)                             # [G, v]
    s = lax.dot_general(dy, rows, (((1,), (1,)), ((), ())), precision=HIGHEST,
                        preferred_element_type=jnp.float32)        # [G, K]
    dw_ref[pl.ds(t, 1), :] = jnp.sum(jnp.where(gi == g[t:t + 1, :], s, 0.0), axis=0,
                                     keepdims=True)


def _gather_call(kernel, idx, values, block_args, block_specs, out_shape, out_spec,
                 *, lp, k, interpret, name, bytes_accessed):
  tl = TOKEN_TILE
  v = values.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(lp // tl,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] + block_specs,
      out_specs=out_spec,
      scratch_shapes=[pltpu.VMEM((2, tl, k, v), values.dtype),
                      pltpu.SemaphoreType.DMA((2,))])
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      # Sequential grid: step i prefetches step i+1's rows.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      cost_estimate=pl.CostEstimate(flops=2 * lp * k * v, transcendentals=0,
                                    bytes_accessed=bytes_accessed),
      interpret=interpret_params(interpret),
      name=name,
  )(idx.reshape(-1), values, *block_args)


def _token_chunks(l: int, k: int):
  """Token ranges of at most SMEM_INDEX_BYTES of scalar-prefetched indices each."""
  per = max(TOKEN_TILE, (SMEM_INDEX_BYTES // (4 * k)) // TOKEN_TILE * TOKEN_TILE)
  return [(s, min(l, s + per)) for s in range(0, max(l, 1), per)]


def _clip(indices, n):
  return jnp.clip(indices.astype(jnp.int32), 0, n - 1)


def lookup_fwd_tpu(values, indices, weights, groups, num_groups: int, *, interpret=False):
  """Forward: values [N, v], indices/weights/groups [L, K] -> [L, G, v] (no autodiff)."""
  n, v = values.shape
  l, k = indices.shape
  out_dtype = jnp.result_type(values.dtype, weights.dtype)
  idx = _clip(indices, n)
  w = weights.astype(jnp.float32)
  grp = groups.astype(jnp.int32)
  outs = []
  for s, e in _token_chunks(l, k):
    lc = e - s
    lp = pl.cdiv(lc, TOKEN_TILE) * TOKEN_TILE
    tl = TOKEN_TILE
    bytes_accessed = (lc * k * v * values.dtype.itemsize
                      + lc * num_groups * v * jnp.dtype(out_dtype).itemsize
                      + lc * k * (4 + 4 + weights.dtype.itemsize))
    out = _gather_call(
        functools.partial(_fwd_kernel, tl=tl, k=k, num_groups=num_groups),
        _pad_tokens(idx[s:e], lp), values,
        [_pad_tokens(w[s:e], lp), _pad_tokens(grp[s:e], lp)],
        [pl.BlockSpec((tl, k), lambda i, idx_ref: (i, 0)),
         pl.BlockSpec((tl, k), lambda i, idx_ref: (i, 0))],
        jax.ShapeDtypeStruct((lp, num_groups, v), out_dtype),
        pl.BlockSpec((tl, num_groups, v), lambda i, idx_ref: (i, 0, 0)),
        lp=lp, k=k, interpret=interpret, name="memory_lookup_fwd_tpu",
        bytes_accessed=bytes_accessed)
    outs.append(out[:lc])
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def lookup_dweights_tpu(values, indices, groups, d_out, *, interpret=False):
  """d_weights[l, k] = <d_out[l, groups[l, k]], values[indices[l, k]]> as f32 [L, K]."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  idx = _clip(indices, n)
  grp = groups.astype(jnp.int32)
  outs = []
  for s, e in _token_chunks(l, k):
    lc = e - s
    lp = pl.cdiv(lc, TOKEN_TILE) * TOKEN_TILE
    tl = TOKEN_TILE
    bytes_accessed = (lc * k * v * values.dtype.itemsize
                      + lc * num_groups * v * d_out.dtype.itemsize + lc * k * 12)
    out = _gather_call(
        functools.partial(_dw_kernel, tl=tl, k=k, num_groups=num_groups),
        _pad_tokens(idx[s:e], lp), values,
        [_pad_tokens(grp[s:e], lp), _pad_tokens(d_out[s:e], lp)],
        [pl.BlockSpec((tl, k), lambda i, idx_ref: (i, 0)),
         pl.BlockSpec((tl, num_groups, v), lambda i, idx_ref: (i, 0, 0))],
        jax.ShapeDtypeStruct((lp, k), jnp.float32),
        pl.BlockSpec((tl, k), lambda i, idx_ref: (i, 0)),
        lp=lp, k=k, interpret=interpret, name="memory_lookup_dweights_tpu",
        bytes_accessed=bytes_accessed)
    outs.append(out[:lc])
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def sorted_csr(indices, weights, groups, num_rows: int, num_groups: int):
  """CSR of the flat lookups sorted (stably) by value row, built in XLA.

  Returns (offsets [num_rows + 1] int32, rows [M] int32 sorted row ids,
  src [M] int32 = l·G + g (the dY row of each sorted lookup), w [M] f32).
  """
  k = indices.shape[1]
  flat = indices.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  rows = flat[order]
  src = (order // k) * num_groups + groups.reshape(-1).astype(jnp.int32)[order]
  w = weights.reshape(-1).astype(jnp.float32)[order]
  counts = jnp.zeros((num_rows,), jnp.int32).at[flat].add(1, mode="drop")
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts,
                                                                    dtype=jnp.int32)])
  return offsets, rows, src, w


def _dv_kernel(bounds_ref, dy_hbm, src_hbm, row_hbm, w_hbm, dv_ref,
               buf, src_s, row_s, w_s, acc, sem, msem, *, r, c):
  i = pl.program_id(0)
  s0, s1 = bounds_ref[i], bounds_ref[i + 1]
  r0 = i * r
  acc[...] = jnp.zeros_like(acc)
  ri = lax.broadcasted_iota(jnp.int32, (r, c), 0)
  ci = lax.broadcasted_iota(jnp.int32, (r, c), 1)
  cr = lax.broadcasted_iota(jnp.int32, (c, 1), 0)

  def chunk(ch, carry):
    base = s0 + ch * c
    cnt = jnp.minimum(c, s1 - base)
    meta = [pltpu.make_async_copy(hbm.at[0, pl.ds(base, c)], smem, msem.at[j])
            for j, (hbm, smem) in enumerate([(src_hbm, src_s), (row_hbm, row_s),
                                             (w_hbm, w_s)])]
    for cp in meta:
      cp.start()
    for cp in meta:
      cp.wait()

    def start(j, carry):
      pltpu.make_async_copy(dy_hbm.at[pl.ds(src_s[j], 1)], buf.at[pl.ds(j, 1)],
                            sem.at[0]).start()
      return carry

    def wait(j, carry):
      pltpu.make_async_copy(dy_hbm.at[pl.ds(0, 1)], buf.at[pl.ds(0, 1)],
                            sem.at[0]).wait()
      return carry

    lax.fori_loop(0, cnt, start, 0)

    def onehot_col(j, oh):    # overlaps the in-flight row DMAs
      return jnp.where((ci == j) & (ri == row_s[j] - r0), w_s[j], oh)

    onehot = lax.fori_loop(0, cnt, onehot_col, jnp.zeros((r, c), jnp.float32))
    lax.fori_loop(0, cnt, wait, 0)
    rows = jnp.where(cr < cnt, buf[...].astype(jnp.float32), 0.0)  # stale rows -> 0
    acc[...] += jnp.dot(onehot, rows, precision=HIGHEST,
                        preferred_element_type=jnp.float32)
    return carry

  lax.fori_loop(0, lax.div(s1 - s0 + c - 1, c), chunk, 0)
  dv_ref[...] = acc[...].astype(dv_ref.dtype)


def lookup_dvalues_tpu(values, indices, weights, groups, d_out, *, interpret=False):
  """d_values [N, v] (values' dtype) = Σ_{(l,k): idx=n} w[l,k] · d_out[l, groups[l,k]]."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  r, c = ROW_TILE, CHUNK
  npad = pl.cdiv(n, r) * r
  offsets, rows, src, w = sorted_csr(_clip(indices, n), weights, groups, npad,
                                     num_groups)
  bounds = offsets[::r]                                            # [npad / r + 1]
  # [1, M + c]: chunk DMAs may read c past the end (2-D: rank-1 HBM operands need a
  # TPU to lower).
  pad = lambda x: jnp.pad(x, (0, c))[None]
  dy = d_out.reshape(l * num_groups, v)
  m = l * k
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(npad // r,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 4,
      out_specs=pl.BlockSpec((r, v), lambda i, b: (i, 0)),
      scratch_shapes=[pltpu.VMEM((c, v), dy.dtype),
                      pltpu.SMEM((c,), jnp.int32), pltpu.SMEM((c,), jnp.int32),
                      pltpu.SMEM((c,), jnp.float32),
                      pltpu.VMEM((r, v), jnp.float32),
                      pltpu.SemaphoreType.DMA((1,)), pltpu.SemaphoreType.DMA((3,))])
  out = pl.pallas_call(
      functools.partial(_dv_kernel, r=r, c=c),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((npad, v), values.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * v, transcendentals=0,
          bytes_accessed=m * v * dy.dtype.itemsize + npad * v * values.dtype.itemsize
          + m * 12),
      interpret=interpret_params(interpret),
      name="memory_lookup_dvalues_tpu",
  )(bounds, dy, pad(src), pad(rows), pad(w))
  return out[:n]


__all__ = ["lookup_fwd_tpu", "lookup_dvalues_tpu", "lookup_dweights_tpu", "sorted_csr",
           "SUPPORTED_DTYPES", "TOKEN_TILE", "ROW_TILE", "CHUNK"]
