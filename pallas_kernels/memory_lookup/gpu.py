"""Memory lookup (PKM / UltraMem weighted gather-sum): GPU (Pallas Triton) kernels.

    out[l, g, :] = Σ_k w[l, k] · [groups[l, k] = g] · V[idx[l, k], :]  (f32 accumulation)

Shapes: V [N, v] float32/bfloat16, idx/groups int32 [L, K], w [L, K] (upcast to f32),
out [L, G, v] in result_type(V, w). All operands are whole-array refs (pointers);
Triton blocks are powers of two, so the column chunk BV = pow2 ≤ 512 (smaller for large
G), G is padded to Gp = next_pow2(G) and K to a multiple of the lookup block KB inside
the wrapper, with masked loads/stores.

Every kernel GATHERS a block of rows per load: `V[idx_vec[:, None], cols[None, :]]`
([KB, BV], masked) — KB independent rows in flight per program instead of one row per
loop iteration (Triton turns the pointer tensor into vectorized loads).

Forward (`lookup_fwd_gpu`): grid (L, ⌈v / BV⌉), one token × one column chunk per program.
A loop over the ⌈K / KB⌉ lookup blocks loads KB indices / weights / groups as vectors,
gathers the rows [KB, BV] and adds Σ_k onehot[g, k]·w[k]·row[k] ([Gp, KB, BV] product
reduced over k) to an f32 [Gp, BV] register tile, stored once (masked to [G, v]).
KB: Gp·KB·BV ≤ FWD_ELEMENTS.

Backward (deterministic, no atomics):
  * d_values (`lookup_dvalues_gpu`): the XLA wrapper sorts the flat lookups by row
    (`csr.sorted_csr`) and lists the TOUCHED rows (`csr.touched_tiles`, R = 1; at
    most min(N, L·K)); the output is an XLA zeros [N, v] aliased into the kernel. Grid
    (min(N, L·K), ⌈v / BV⌉): program i owns the i-th touched row × a column chunk,
    gathers its sorted lookups' dY rows KB at a time ([KB, BV]), accumulates
    Σ w · dY in f32 (a fixed order and reduction tree: bitwise reproducible) and
    writes its dV chunk once; programs past the touched count store nothing.
  * d_weights (`lookup_dweights_gpu`): grid (L,); per block of KB lookups, per column
    chunk, gathers V rows and dY rows [KB, BV] each and accumulates their row-wise
    dot products; the [KB] results are stored once. KB·BV ≤ DW_ELEMENTS.

Roofline (b(·) = bytes per element; FLOPs negligible, HBM bound):
  forward    L·K·v·b(V) + L·G·v·b(out) + L·K·(4 + 4 + b(w))
  d_values   L·K·v·b(dY) + N·v·b(V) (the zeros, + touched rows) + L·K·(4 + 4)
             (+ the XLA sort of L·K int32)
  d_weights  L·K·v·(b(V) + b(dY)) + L·K·(4 + 4 + 4)   (dY rows re-read once per lookup,
             from L1/L2: a token's G·v dY elements are shared by its K lookups)
Counts at T·H = L = 8192, K = 32, v = 256, N = 262144 (G = 1, BV = 256). Before →
after: forward programs 8192 (unchanged), rows in flight per program 1 → KB = 32
(K / KB = 1 loop step instead of 32); d_weights loop steps per program 32·1 → 1·1
with 32 rows in flight; d_values programs N = 262144 → min(N, L·K) touched-row slots
(262144 here, 2048 at L = 64) with up to KB = 32 dY rows in flight each.
Invalid lookups (index outside [0, N) or group outside [0, G)) contribute exactly
zero and get zero gradients (`rule.mask_lookups`: row 0 with weight 0 in the gathers,
d_weights masked, left out of the d_values CSR).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import match_vma, out_struct, triton_params
from pallas_kernels.memory_lookup.csr import sorted_csr, touched_tiles
from pallas_kernels.memory_lookup.rule import mask_lookups

MAX_BLOCK_V = 512          # default column chunk (elements)
ACC_ELEMENTS = 8192        # bound on the forward's f32 [Gp, BV] accumulator
FWD_ELEMENTS = 16384       # bound on the forward's [Gp, KB, BV] weighted rows
DW_ELEMENTS = 8192         # bound on each gathered [KB, BV] block of d_weights / d_values
MAX_BLOCK_K = 64           # lookups gathered per load


def block_v(v: int, num_groups: int = 1, block: int | None = None) -> int:
  """Column chunk: a power of two ≤ next_pow2(v), ≤ MAX_BLOCK_V and Gp·BV ≤ 8192."""
  gp = pl.next_power_of_2(num_groups)
  bv = min(pl.next_power_of_2(v), MAX_BLOCK_V, max(16, ACC_ELEMENTS // gp))
  if block is not None:
    if block < 1 or block & (block - 1):
      raise ValueError(f"block_v={block} must be a power of two")
    bv = block
  return bv


def block_k(k: int, per_lookup: int, budget: int) -> int:
  """Lookups per gather: a power of two ≤ next_pow2(k), ≤ MAX_BLOCK_K, with the
  gathered block (`per_lookup` elements each) ≤ `budget` elements."""
  return max(1, min(pl.next_power_of_2(max(k, 1)), MAX_BLOCK_K, budget // per_lookup))


def _pad_k(x, kp: int):
  return x if x.shape[1] == kp else jnp.pad(x, ((0, 0), (0, kp - x.shape[1])))


def _fwd_kernel(idx_ref, w_ref, g_ref, v_ref, o_ref, *, k, kb, v, num_groups, gp, bv):
  l, c0 = pl.program_id(0), pl.program_id(1) * bv
  cols = c0 + lax.broadcasted_iota(jnp.int32, (bv,), 0)
  cmask = cols < v
  gi = lax.broadcasted_iota(jnp.int32, (gp, 1), 0)
  ki = lax.broadcasted_iota(jnp.int32, (kb,), 0)

  def body(b, acc):
    blk = pl.ds(b * kb, kb)
    rows, w, grp = idx_ref[l, blk], w_ref[l, blk], g_ref[l, blk]          # [KB]
    mask = (b * kb + ki < k)[:, None] & cmask[None, :]
    x = pltriton.load(v_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0)
    onehot = jnp.where(gi == grp[None, :], w[None, :], 0.0)               # [Gp, KB]
    return acc + jnp.sum(onehot[:, :, None] * x.astype(jnp.float32)[None], axis=1)

  acc = lax.fori_loop(0, pl.cdiv(k, kb), body, jnp.zeros((gp, bv), jnp.float32))
  pltriton.store(o_ref.at[l, pl.ds(0, gp), pl.ds(c0, bv)],
                 acc.astype(o_ref.dtype), mask=(gi < num_groups) & cmask[None, :])


def lookup_fwd_gpu(values, indices, weights, groups, num_groups: int, *,
                   interpret: bool = False, num_warps: int = 4,
                   block: int | None = None):
  """Forward: values [N, v], indices/weights/groups [L, K] -> [L, G, v] (no autodiff)."""
  n, v = values.shape
  l, k = indices.shape
  out_dtype = jnp.result_type(values.dtype, weights.dtype)
  bv = block_v(v, num_groups, block)
  gp = pl.next_power_of_2(num_groups)
  kb = block_k(k, gp * bv, FWD_ELEMENTS)
  kp = pl.cdiv(k, kb) * kb
  idx, weights, groups, _ = mask_lookups(indices, weights, groups, n, num_groups)
  idx, weights, groups = (_pad_k(x, kp) for x in (idx, weights.astype(jnp.float32),
                                                   groups))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, k=k, kb=kb, v=v, num_groups=num_groups, gp=gp,
                        bv=bv),
      grid=(l, pl.cdiv(v, bv)),
      out_shape=out_struct((l, num_groups, v), out_dtype, idx, weights, groups, values),
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * l * k * num_groups * v, transcendentals=0,
          bytes_accessed=l * k * v * values.dtype.itemsize
          + l * num_groups * v * jnp.dtype(out_dtype).itemsize
          + l * k * (8 + weights.dtype.itemsize)),
      interpret=interpret,
      name="memory_lookup_fwd_gpu",
  )(idx, weights, groups, values)


def _dv_kernel(num_ref, row_ref, start_ref, end_ref, src_ref, w_ref, dy_ref, dv_in,
               dv_ref, *, v, bv, kb):
  del dv_in                        # the zeros aliased to dv_ref: never read
  i, c0 = pl.program_id(0), pl.program_id(1) * bv
  cols = c0 + lax.broadcasted_iota(jnp.int32, (bv,), 0)
  cmask = cols < v
  ji = lax.broadcasted_iota(jnp.int32, (kb,), 0)
  real = i < num_ref[0]
  s0, s1 = start_ref[i], end_ref[i]

  def body(b, acc):
    base = s0 + b * kb
    src, w = src_ref[pl.ds(base, kb)], w_ref[pl.ds(base, kb)]            # [KB]
    w = jnp.where(base + ji < s1, w, 0.0)
    mask = (base + ji < s1)[:, None] & cmask[None, :]
    x = pltriton.load(dy_ref.at[src[:, None], cols[None, :]], mask=mask, other=0.0)
    return acc + jnp.sum(w[:, None] * x.astype(jnp.float32), axis=0)

  steps = jnp.where(real, lax.div(s1 - s0 + kb - 1, kb), 0)   # padding slots: none
  acc = lax.fori_loop(0, steps, body, jnp.zeros((bv,), jnp.float32))
  pltriton.store(dv_ref.at[row_ref[i], pl.ds(c0, bv)], acc.astype(dv_ref.dtype),
                 mask=cmask & real)


def lookup_dvalues_gpu(values, indices, weights, groups, d_out, *,
                       interpret: bool = False, num_warps: int = 4,
                       block: int | None = None):
  """d_values [N, v] (values' dtype) = Σ_{valid (l,k): idx = n} w[l,k]·d_out[l, g[l,k]]
  (g = groups)."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  bv = block_v(v, 1, block)
  kb = block_k(k, bv, DW_ELEMENTS)
  m = l * k
  offsets, _, src, w = sorted_csr(indices, weights, groups, n, num_groups)
  src, w = (jnp.pad(x, (0, kb)) for x in (src, w))       # whole blocks past the end
  slots = min(n, m)                                      # touched rows: ≤ one a lookup
  rows, starts, ends, num = touched_tiles(offsets, n, 1, slots)
  dy = d_out.reshape(l * num_groups, v)
  dv = match_vma(jnp.zeros((n, v), values.dtype), dy, values)[0]   # aliased output
  return pl.pallas_call(
      functools.partial(_dv_kernel, v=v, bv=bv, kb=kb),
      grid=(slots, pl.cdiv(v, bv)),
      out_shape=out_struct((n, v), values.dtype, rows, src, w, dy, dv),
      input_output_aliases={7: 0},
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * v, transcendentals=0,
          bytes_accessed=m * v * dy.dtype.itemsize + slots * v * values.dtype.itemsize
          + m * 8 + slots * 12),
      interpret=interpret,
      name="memory_lookup_dvalues_gpu",
  )(num.reshape(1), rows, starts, ends, src, w, dy, dv)


def _dw_kernel(idx_ref, g_ref, v_ref, dy_ref, dw_ref, *, k, kb, v, bv, num_groups):
  l = pl.program_id(0)
  ki = lax.broadcasted_iota(jnp.int32, (kb,), 0)
  ci = lax.broadcasted_iota(jnp.int32, (bv,), 0)

  def block(b, carry):
    blk = pl.ds(b * kb, kb)
    rows, dy_rows = idx_ref[l, blk], l * num_groups + g_ref[l, blk]       # [KB]
    kmask = (b * kb + ki < k)[:, None]

    def chunk(c, s):
      cols = c * bv + ci
      mask = kmask & (cols < v)[None, :]
      a = pltriton.load(v_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0)
      d = pltriton.load(dy_ref.at[dy_rows[:, None], cols[None, :]], mask=mask,
                        other=0.0)
      return s + jnp.sum(a.astype(jnp.float32) * d.astype(jnp.float32), axis=1)

    dw_ref[l, blk] = lax.fori_loop(0, pl.cdiv(v, bv), chunk,
                                   jnp.zeros((kb,), jnp.float32))
    return carry

  lax.fori_loop(0, pl.cdiv(k, kb), block, 0)


def lookup_dweights_gpu(values, indices, groups, d_out, *, interpret: bool = False,
                        num_warps: int = 4, block: int | None = None):
  """d_weights[l, k] = <d_out[l, groups[l, k]], values[indices[l, k]]> as f32 [L, K]
  (0 for invalid lookups)."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  bv = block_v(v, 1, block)
  kb = block_k(k, bv, DW_ELEMENTS)
  kp = pl.cdiv(k, kb) * kb
  idx, _, grp, valid = mask_lookups(indices, jnp.zeros(indices.shape, jnp.float32),
                                    groups, n, num_groups)
  idx, grp = _pad_k(idx, kp), _pad_k(grp, kp)
  dy = d_out.reshape(l * num_groups, v)
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, k=k, kb=kb, v=v, bv=bv, num_groups=num_groups),
      grid=(l,),
      out_shape=out_struct((l, kp), jnp.float32, idx, grp, values, dy),
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * l * k * v, transcendentals=0,
          bytes_accessed=l * k * v * (values.dtype.itemsize + d_out.dtype.itemsize)
          + l * k * 12),
      interpret=interpret,
      name="memory_lookup_dweights_gpu",
  )(idx, grp, values, dy)
  return jnp.where(valid, dw[:, :k], 0.0)


__all__ = ["lookup_fwd_gpu", "lookup_dvalues_gpu", "lookup_dweights_gpu", "block_v",
           "block_k"]
