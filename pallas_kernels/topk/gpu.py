"""Top-K sparsification: GPU (Pallas Triton) kernel.

For every row of `x[R, D]` keep the `k` entries of largest magnitude (ties broken
lowest-column-first, exactly like `lax.top_k` on `|x|`) and zero the rest.

One row per program (grid = R). The row lives in registers as a power-of-2 block
B = next_pow2(D) loaded with a mask; lanes ≥ D get key −1 and are never selected.
  key = bitcast(f32(|x|), int32)        monotone in |x|; NaN keys sit above +inf
  1. bisection on the key bits, MSB first, for the largest t with count(key ≥ t) ≥ k:
     31 passes for f32, 15 for bf16, 18 for f16 (low key bits of an upcast are zero);
  2. tie pass only when count(key ≥ t) > k (`lax.cond`, a per-program branch):
     bisection over the column index (log2 B passes) for the column c of the need-th
     tie, need = k − count(key > t); keep = key > t | (key == t & col ≤ c).
No sort/top_k (they do not lower to Triton). Counts are int32 block reductions.

Roofline: bytes = R·D·(b_in + b_out) (f32: 8 B/element, bf16: 4 B/element), one read
and one write; no tensor-core FLOPs. ALU work ≈ 3 ops/element/pass (compare, convert,
add) × (31 | 15) passes plus a block reduction per pass, so large rows are ALU/reduction
bound rather than HBM bound. Registers bound B: with num_warps=8 a row of ≤ 16K f32
stays in registers; larger rows spill. Backward (STE) is the identity: no kernel.

Tuning: `num_warps` (default `default_num_warps(D)`: one warp per 512 columns, 1..16)
spreads the row over more threads. `num_stages` (default 1) is Triton's software
pipelining depth for loops that stream memory; this kernel loads its row once, before
the bisection loops, so there is nothing to pipeline and more stages would only
reserve shared memory. There is no matmul (no precision setting): counts are exact
int32 sums.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import out_struct, triton_params

MAX_BLOCK = 1 << 20   # Triton's limit on the elements of one block (TRITON_MAX_TENSOR_NUMEL)


def key_low_bit(dtype) -> int:
  """Lowest bit of the f32 key that can be non-zero for `dtype` upcast to f32."""
  return 23 - jnp.finfo(dtype).nmant


def default_num_warps(d: int) -> int:
  return min(max(pl.next_power_of_2(d) // 512, 1), 16)


def _kernel(x_ref, o_ref, *thr_refs, k: int, d: int, block: int, lo_bit: int):
  col = lax.broadcasted_iota(jnp.int32, (block,), 0)
  valid = col < d
  x = pltriton.load(x_ref.at[pl.ds(0, block)], mask=valid, other=0.0)
  key = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF
  key = jnp.where(valid, key, -1)

  def count(pred):
    return jnp.sum(pred.astype(jnp.int32))

  def value_pass(i, t):
    cand = t | jnp.left_shift(jnp.int32(1), 30 - i)
    return jnp.where(count(key >= cand) >= k, cand, t)

  t = lax.fori_loop(0, 31 - lo_bit, value_pass, jnp.int32(0))
  nb = max(1, (block - 1).bit_length())

  def tie_pass(t):
    eq = key == t
    need = k - count(key > t)

    def col_pass(i, c):
      cand = c | jnp.left_shift(jnp.int32(1), nb - 1 - i)
      return jnp.where(count(eq & (col < cand)) < need, cand, c)

    return lax.fori_loop(0, nb, col_pass, jnp.int32(0))

  def no_ties(t):
    # Computed from an operand on purpose: the Triton lowering of `cond` fails
    # ("scf.yield ... is not a Value") when a branch returns a bare literal.
    return (t & 0) + jnp.int32(d - 1)

  c = lax.cond(count(key >= t) > k, tie_pass, no_ties, t)
  keep = (key > t) | ((key == t) & (col <= c))
  pltriton.store(o_ref.at[pl.ds(0, block)],
                 jnp.where(keep, x, jnp.zeros_like(x)), mask=valid)
  if thr_refs:
    thr_refs[0][...] = t
    thr_refs[1][...] = c


def topk_sparsify_gpu(x2d: jax.Array, k: int, *, interpret: bool = False,
                      return_threshold: bool = False, num_warps: int | None = None,
                      num_stages: int = 1):
  """Top-k by magnitude per row of `x2d[R, D]` (no autodiff; see `topk_sparsify_kernel`).

  Args:
    x2d: float32 / bfloat16 / float16 array of shape [R, D].
    k: static int in [1, D].
    interpret: run with the generic Pallas interpreter (CPU tests).
    return_threshold: also return per-row `(t, c)` int32 arrays of shape [R] (see
      `pallas_kernels.topk.apply_threshold`).
    num_warps: Triton warps per program (default grows with D).
    num_stages: Triton pipelining stages (default 1: the row is loaded once).

  Returns:
    y[R, D] (same dtype), or (y, t, c) if `return_threshold`.
  """
  r, d = x2d.shape
  block = pl.next_power_of_2(d)
  if block > MAX_BLOCK:
    raise ValueError(f"row length D={d} is too long for the GPU top-k kernel (the row "
                     f"is one Triton block of at most {MAX_BLOCK} elements); use "
                     f"impl='xla'")
  if num_warps is None:
    num_warps = default_num_warps(d)
  lo_bit = key_low_bit(x2d.dtype)
  itemsize = jnp.dtype(x2d.dtype).itemsize
  out_shape = [out_struct((r, d), x2d.dtype, x2d)]
  out_specs = [pl.BlockSpec((None, d), lambda i: (i, 0))]
  if return_threshold:
    out_shape += [out_struct((r,), jnp.int32, x2d)] * 2
    out_specs += [pl.BlockSpec((None,), lambda i: (i,))] * 2
  outs = pl.pallas_call(
      functools.partial(_kernel, k=k, d=d, block=block, lo_bit=lo_bit),
      grid=(r,),
      in_specs=[pl.BlockSpec((None, d), lambda i: (i, 0))],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=triton_params(num_warps, num_stages),
      cost_estimate=pl.CostEstimate(
          flops=3 * (31 - lo_bit) * r * block, transcendentals=0,
          bytes_accessed=2 * r * d * itemsize),
      interpret=interpret,
      name="topk_sparsify_gpu",
  )(x2d)
  return tuple(outs) if return_threshold else outs[0]


__all__ = ["topk_sparsify_gpu", "default_num_warps", "key_low_bit"]
