"""Top-K sparsification: TPU (Mosaic) kernel.

For every row of `x[R, D]` keep the `k` entries of largest magnitude (ties broken
lowest-column-first, exactly like `lax.top_k` on `|x|`) and zero the rest.

Algorithm (no sort/top_k: they do not lower on TPU). Per tile of TR rows × full D:
  key = bitcast(f32(|x|), int32)        monotone in |x|; NaN keys sit above +inf
  1. bisection on the key bits, MSB first, for the largest t with count(key ≥ t) ≥ k:
     31 passes for f32; 15 for bf16 (the low 16 key bits of an upcast bf16 are zero),
     18 for f16 — t is then exactly the k-th largest key of the row;
  2. tie pass, only when some row of the tile has count(key ≥ t) > k (`pl.when`):
     bisection over the column index (⌈log2 Dp⌉ passes) for the column c of the
     need-th tie, need = k − count(key > t); keep = key > t | (key == t & col ≤ c).
Counts are compare → f32 lane sums (exact below 2^24 columns).

Layout: row tiles of 8 (4-byte dtypes) or 16 (2-byte dtypes) rows on sublanes × the
full padded row on lanes. D is padded to a multiple of 128 and rows to a multiple of
the tile by the wrapper; padded columns get key −1 inside the kernel, so they are
never selected whatever the pad value.

VMEM per grid step (`vmem_bytes`) ≈ TR·Dp·(4·b + 12): in/out blocks double buffered
(4·b per element) plus the int32 keys/columns and compare temporaries. Measured with
the Mosaic compiler (libtpu AOT, v5e): f32 D = 98304 needs 20.85 MiB, D = 131072
27.85 MiB (8·28 B per column, as modelled); bf16 D = 65536 16.01 MiB, D = 98304 24 MiB
(16·16 B per column; the model's 16·20 B is conservative). `VMEM_BUDGET` = 16 MiB is
the default scoped-VMEM limit of v5e (v6e: 32 MiB), so rows up to D ≈ 74K (f32) /
52K (bf16, f16) compile everywhere; longer rows are refused (`kernel_unmet`) and
impl="auto" uses XLA.

Roofline: bytes = R·D·(b_in + b_out) (f32: 8 B/element; bf16: 4 B/element); no MXU
FLOPs. VPU work ≈ 3 ops/element/pass (compare, convert, add) × (31 | 15 passes) plus
the rarely taken tie pass, so the kernel is vector-unit bound, not HBM bound:
≈ 93 (f32) / 45 (bf16) VPU ops per element. Backward (STE) is the identity: no kernel.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import out_struct

LANES = 128
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
VMEM_BUDGET = 16 << 20     # the default scoped-VMEM limit of TPU v5e (bytes)


def row_tile(dtype) -> int:
  """Rows per grid step: one full (8|16, 128) vreg tile of `dtype` on sublanes."""
  return 8 if jnp.dtype(dtype).itemsize >= 4 else 16


def key_low_bit(dtype) -> int:
  """Lowest bit of the f32 key that can be non-zero for `dtype` upcast to f32."""
  return 23 - jnp.finfo(dtype).nmant


def vmem_bytes(d: int, dtype) -> int:
  """Modelled VMEM bytes of one grid step for rows of length `d` (see module doc)."""
  dp = pl.cdiv(d, LANES) * LANES
  return row_tile(dtype) * dp * (4 * jnp.dtype(dtype).itemsize + 12)


def _column_bits(dp: int) -> int:
  return max(1, (dp - 1).bit_length())


def _kernel(x_ref, o_ref, *thr_refs, k: int, r: int, d: int, lo_bit: int):
  x = x_ref[...]
  tr, dp = x.shape
  key = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF
  col = lax.broadcasted_iota(jnp.int32, (tr, dp), 1)
  if d != dp:
    key = jnp.where(col < d, key, -1)     # padded columns: never selected
  kf = float(k)

  def count(pred):
    return jnp.sum(pred.astype(jnp.float32), axis=1, keepdims=True)

  def value_pass(i, t):
    cand = t | jnp.left_shift(jnp.int32(1), 30 - i)
    return jnp.where(count(key >= cand) >= kf, cand, t)

  t = lax.fori_loop(0, 31 - lo_bit, value_pass, jnp.zeros((tr, 1), jnp.int32))
  excess = count(key >= t) - kf
  if r % tr:                              # padded rows must not trigger the tie pass
    row = pl.program_id(0) * tr + lax.broadcasted_iota(jnp.int32, (tr, 1), 0)
    excess = jnp.where(row < r, excess, 0.0)
  o_ref[...] = jnp.where(key >= t, x, jnp.zeros_like(x))
  if thr_refs:
    t_ref, c_ref = thr_refs
    t_ref[...] = t
    c_ref[...] = jnp.full((tr, 1), d - 1, jnp.int32)

  @pl.when(jnp.max(excess) > 0.0)
  def _tie_pass():
    eq = key == t
    need = kf - count(key > t)
    nb = _column_bits(dp)

    def col_pass(i, c):
      cand = c | jnp.left_shift(jnp.int32(1), nb - 1 - i)
      return jnp.where(count(eq & (col < cand)) < need, cand, c)

    c = lax.fori_loop(0, nb, col_pass, jnp.zeros((tr, 1), jnp.int32))
    keep = (key > t) | (eq & (col <= c))
    o_ref[...] = jnp.where(keep, x, jnp.zeros_like(x))
    if thr_refs:
      thr_refs[1][...] = c


def topk_sparsify_tpu(x2d: jax.Array, k: int, *, interpret=False,
                      return_threshold: bool = False):
  """Top-k by magnitude per row of `x2d[R, D]` (no autodiff; see `topk_sparsify_kernel`).

  Args:
    x2d: float32 / bfloat16 / float16 array of shape [R, D].
    k: static int in [1, D].
    interpret: False, True (→ `pltpu.InterpretParams()`), or an `InterpretParams`.
    return_threshold: also return per-row `(t, c)` int32 arrays of shape [R]: entry j is
      kept iff key_j > t or (key_j == t and j ≤ c), key = bitcast(f32(|x|), int32).

  Returns:
    y[R, D] (same dtype), or (y, t, c) if `return_threshold`.
  """
  r, d = x2d.shape
  tr = row_tile(x2d.dtype)
  dp = pl.cdiv(d, LANES) * LANES
  rp = pl.cdiv(r, tr) * tr
  xp = x2d
  if (rp, dp) != (r, d):
    xp = jnp.pad(x2d, ((0, rp - r), (0, dp - d)))
  if interpret is True:
    interpret = pltpu.InterpretParams()
  lo_bit = key_low_bit(x2d.dtype)
  itemsize = jnp.dtype(x2d.dtype).itemsize
  passes = 31 - lo_bit
  out_shape = [out_struct((rp, dp), x2d.dtype, xp)]
  out_specs = [pl.BlockSpec((tr, dp), lambda i: (i, 0))]
  if return_threshold:
    out_shape += [out_struct((rp, 1), jnp.int32, xp)] * 2
    out_specs += [pl.BlockSpec((tr, 1), lambda i: (i, 0))] * 2
  outs = pl.pallas_call(
      functools.partial(_kernel, k=k, r=r, d=d, lo_bit=lo_bit),
      grid=(rp // tr,),
      in_specs=[pl.BlockSpec((tr, dp), lambda i: (i, 0))],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=pl.CostEstimate(
          flops=3 * passes * rp * dp, transcendentals=0,
          bytes_accessed=2 * rp * dp * itemsize),
      interpret=interpret,
      name="topk_sparsify_tpu",
  )(xp)
  y = outs[0][:r, :d]
  if return_threshold:
    return y, outs[1][:r, 0], outs[2][:r, 0]
  return y


__all__ = ["topk_sparsify_tpu", "row_tile", "key_low_bit", "vmem_bytes", "VMEM_BUDGET",
           "SUPPORTED_DTYPES"]
