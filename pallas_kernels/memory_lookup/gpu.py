"""Memory lookup (PKM / UltraMem weighted gather-sum): GPU (Pallas Triton) kernels.

    out[l, g, :] = Σ_k w[l, k] · [groups[l, k] = g] · V[idx[l, k], :]  (f32 accumulation)

Shapes: V [N, v] float32/bfloat16, idx/groups int32 [L, K], w [L, K] (upcast to f32),
out [L, G, v] in result_type(V, w). All operands are whole-array refs (pointers);
Triton blocks are powers of two, so the column chunk BV = pow2 ≤ 512 (smaller for large
G) and G is padded to Gp = next_pow2(G) inside the kernel, with masked loads/stores.

Forward (`lookup_fwd_gpu`): grid (L, ⌈v / BV⌉), one token × one column chunk per program.
A loop over the K lookups loads idx/w/group as scalars, loads the row chunk
V[idx, c0:c0+BV] (masked past v) and accumulates the weighted one-hot [Gp, 1] × row
[1, BV] into an f32 [Gp, BV] register tile, stored once (masked to [G, v]).

Backward (deterministic, no atomics):
  * d_values (`lookup_dvalues_gpu`): the XLA wrapper sorts the flat lookups by row
    (stable argsort) and builds CSR offsets (bincount + cumsum). Grid (N, ⌈v / BV⌉): each
    program owns one value row × column chunk, loops over that row's sorted lookups
    (offsets[n] .. offsets[n+1]) accumulating w · dY[l, g, c0:c0+BV] in f32 (a fixed
    order, so bitwise reproducible), and writes its dV chunk exactly once.
  * d_weights (`lookup_dweights_gpu`): grid (L,); per lookup k, loops over column chunks
    accumulating Σ V[idx, c]·dY[l, g, c] in f32; the [K] results are stored once.

Roofline (b(·) = bytes per element; FLOPs negligible, HBM bound):
  forward    L·K·v·b(V) + L·G·v·b(out) + L·K·(4 + 4 + b(w))
  d_values   L·K·v·b(dY) + N·v·b(V) + L·K·(4 + 4) + N·4 (+ the XLA sort of L·K int32)
  d_weights  L·K·v·(b(V) + b(dY)) + L·K·(4 + 4 + 4)   (dY rows re-read once per lookup)
Rows of ≥ 512 B are needed to approach HBM bandwidth (one row chunk per load).
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

from pallas_kernels._common import out_struct, triton_params
from pallas_kernels.memory_lookup.rule import mask_lookups

MAX_BLOCK_V = 512          # default column chunk (elements)
ACC_ELEMENTS = 8192        # bound on the forward's f32 [Gp, BV] accumulator


def block_v(v: int, num_groups: int = 1, block: int | None = None) -> int:
  """Column chunk: a power of two ≤ next_pow2(v), ≤ MAX_BLOCK_V and Gp·BV ≤ 8192."""
  gp = pl.next_power_of_2(num_groups)
  bv = min(pl.next_power_of_2(v), MAX_BLOCK_V, max(16, ACC_ELEMENTS // gp))
  if block is not None:
    if block < 1 or block & (block - 1):
      raise ValueError(f"block_v={block} must be a power of two")
    bv = block
  return bv


def _fwd_kernel(idx_ref, w_ref, g_ref, v_ref, o_ref, *, k, v, num_groups, gp, bv):
  l = pl.program_id(0)
  c0 = pl.program_id(1) * bv
  cols = c0 + lax.broadcasted_iota(jnp.int32, (bv,), 0)
  cmask = cols < v
  gi = lax.broadcasted_iota(jnp.int32, (gp, 1), 0)

  def body(j, acc):
    row, w, grp = idx_ref[l, j], w_ref[l, j], g_ref[l, j]
    x = pltriton.load(v_ref.at[row, pl.ds(c0, bv)], mask=cmask, other=0.0)
    return acc + jnp.where(gi == grp, w, 0.0) * x.astype(jnp.float32)[None, :]

  acc = lax.fori_loop(0, k, body, jnp.zeros((gp, bv), jnp.float32))
  pltriton.store(o_ref.at[l, pl.ds(0, gp), pl.ds(c0, bv)], acc.astype(o_ref.dtype),
                 mask=(gi < num_groups) & cmask[None, :])


def lookup_fwd_gpu(values, indices, weights, groups, num_groups: int, *,
                   interpret: bool = False, num_warps: int = 4,
                   block: int | None = None):
  """Forward: values [N, v], indices/weights/groups [L, K] -> [L, G, v] (no autodiff)."""
  n, v = values.shape
  l, k = indices.shape
  out_dtype = jnp.result_type(values.dtype, weights.dtype)
  bv = block_v(v, num_groups, block)
  idx, weights, groups, _ = mask_lookups(indices, weights, groups, n, num_groups)
  weights = weights.astype(jnp.float32)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, k=k, v=v, num_groups=num_groups,
                        gp=pl.next_power_of_2(num_groups), bv=bv),
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


def _dv_kernel(off_ref, src_ref, w_ref, dy_ref, dv_ref, *, v, bv):
  r = pl.program_id(0)
  c0 = pl.program_id(1) * bv
  cmask = c0 + lax.broadcasted_iota(jnp.int32, (bv,), 0) < v

  def body(j, acc):
    x = pltriton.load(dy_ref.at[src_ref[j], pl.ds(c0, bv)], mask=cmask, other=0.0)
    return acc + w_ref[j] * x.astype(jnp.float32)

  acc = lax.fori_loop(off_ref[r], off_ref[r + 1], body, jnp.zeros((bv,), jnp.float32))
  pltriton.store(dv_ref.at[r, pl.ds(c0, bv)], acc.astype(dv_ref.dtype), mask=cmask)


def lookup_dvalues_gpu(values, indices, weights, groups, d_out, *,
                       interpret: bool = False, num_warps: int = 4,
                       block: int | None = None):
  """d_values [N, v] (values' dtype) = Σ_{valid (l,k): idx = n} w[l,k]·d_out[l, g[l,k]]
  (g = groups)."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  bv = block_v(v, 1, block)
  idx, w, grp, valid = mask_lookups(indices, weights, groups, n, num_groups)
  flat = jnp.where(valid, idx, n).reshape(-1)      # invalid: sorted past offsets[n]
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  src = (order // k) * num_groups + grp.reshape(-1)[order]
  w = w.reshape(-1).astype(jnp.float32)[order]
  counts = jnp.zeros((n,), jnp.int32).at[flat].add(1, mode="drop")
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                             jnp.cumsum(counts, dtype=jnp.int32)])
  dy = d_out.reshape(l * num_groups, v)
  m = l * k
  return pl.pallas_call(
      functools.partial(_dv_kernel, v=v, bv=bv),
      grid=(n, pl.cdiv(v, bv)),
      out_shape=out_struct((n, v), values.dtype, offsets, src, w, dy),
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * v, transcendentals=0,
          bytes_accessed=m * v * dy.dtype.itemsize + n * v * values.dtype.itemsize
          + m * 8 + n * 4),
      interpret=interpret,
      name="memory_lookup_dvalues_gpu",
  )(offsets, src, w, dy)


def _dw_kernel(idx_ref, g_ref, v_ref, dy_ref, dw_ref, *, k, kp, v, bv, num_groups):
  l = pl.program_id(0)
  ki = lax.broadcasted_iota(jnp.int32, (kp,), 0)
  cols = lax.broadcasted_iota(jnp.int32, (bv,), 0)

  def body(j, out):
    row, dy_row = idx_ref[l, j], l * num_groups + g_ref[l, j]

    def chunk(ci, s):
      c0 = ci * bv
      mask = c0 + cols < v
      a = pltriton.load(v_ref.at[row, pl.ds(c0, bv)], mask=mask, other=0.0)
      b = pltriton.load(dy_ref.at[dy_row, pl.ds(c0, bv)], mask=mask, other=0.0)
      return s + jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))

    s = lax.fori_loop(0, pl.cdiv(v, bv), chunk, jnp.zeros((), jnp.float32))
    return jnp.where(ki == j, s, out)

  out = lax.fori_loop(0, k, body, jnp.zeros((kp,), jnp.float32))
  pltriton.store(dw_ref.at[l, pl.ds(0, kp)], out, mask=ki < k)


def lookup_dweights_gpu(values, indices, groups, d_out, *, interpret: bool = False,
                        num_warps: int = 4, block: int | None = None):
  """d_weights[l, k] = <d_out[l, groups[l, k]], values[indices[l, k]]> as f32 [L, K]
  (0 for invalid lookups)."""
  n, v = values.shape
  l, k = indices.shape
  num_groups = d_out.shape[1]
  bv = block_v(v, 1, block)
  idx, _, grp, valid = mask_lookups(indices, jnp.zeros(indices.shape, jnp.float32),
                                    groups, n, num_groups)
  dy = d_out.reshape(l * num_groups, v)
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, k=k, kp=pl.next_power_of_2(k), v=v, bv=bv,
                        num_groups=num_groups),
      grid=(l,),
      out_shape=out_struct((l, k), jnp.float32, idx, grp, values, dy),
      compiler_params=triton_params(num_warps),
      cost_estimate=pl.CostEstimate(
          flops=2 * l * k * v, transcendentals=0,
          bytes_accessed=l * k * v * (values.dtype.itemsize + d_out.dtype.itemsize)
          + l * k * 12),
      interpret=interpret,
      name="memory_lookup_dweights_gpu",
  )(idx, grp, values, dy)
  return jnp.where(valid, dw, 0.0)


__all__ = ["lookup_fwd_gpu", "lookup_dvalues_gpu", "lookup_dweights_gpu", "block_v"]
