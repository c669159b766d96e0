"""BitNet b1.58 quantizers: ternary absmean weights and per-token absmax activations.

Weights, per tensor (absmean):     s = 1 / max(mean|W|, 1e-5)
                                   w_q = clip(round(W·s), −1, 1)        ∈ {−1, 0, +1}
Activations, per token (absmax):   Qb = 2^(bits−1) − 1  (127 for 8 bits)
                                   s = Qb / max(max|x|, 1e-5)           along the last axis
                                   x_q = clip(round(x·s), −Qb−1, Qb)

Scale convention: every `*_quantize` returns the **dequantizing multiplier**
`scale = 1/s`, so that `W ≈ w_q * scale` and `x ≈ x_q * scale` (ternary: `scale =
max(mean|W|, 1e-5)`, a float32 scalar; absmax: `scale = max(max|x|, 1e-5) / Qb`, float32
of shape [..., 1]). The fake-quantized values Ŵ = w_q · scale are exactly what the packed
(deployed) model computes with.

The `fake_*` versions return the dequantized value in the input dtype with a
straight-through gradient (identity: ∂L/∂w = ∂L/∂Ŵ). The forward value is exactly the
dequantized value (written `sg(Ŵ) + (w − sg(w))`, which is bit-exact for finite w, unlike
`w + sg(Ŵ − w)`), and it works under every JAX transformation (grad, jvp, vmap).

Rounding is round-half-to-even (`jnp.round`, like torch.round). The quantization math is
done in at least float32 (bf16/f16 inputs are upcast, then the result is cast back).

Non-finite values: a tensor (ternary) or a token (absmax) containing NaN or ±inf gets a
NaN scale, so its fake-quantized values are all NaN; its integer codes are 0 where the
scaled value is not finite. Other tokens are unaffected. Round trip error for finite
inputs: |Ŵ − W| ≤ scale/2 wherever |W·s| ≤ 1.5 (larger weights clip to ±scale), and
|x̂ − x| ≤ scale/2 everywhere (absmax never clips).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

EPS = 1e-5


def _check_float(x, fn: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{fn} needs a floating-point input, got dtype {x.dtype}")


def _check_bits(bits) -> int:
  try:
    if isinstance(bits, bool):
      raise TypeError
    bits = operator.index(bits)
  except TypeError:
    raise ValueError(f"bits={bits!r} must be a static Python int in [2, 8]") from None
  if not 2 <= bits <= 8:
    raise ValueError(f"bits={bits} must be in [2, 8] (codes are stored as int8)")
  return bits


def _compute_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _ste(x, q):
  """Forward: q (exactly, for finite x); backward: identity w.r.t. x."""
  return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))


def _codes(scaled, lo: int, hi: int):
  """int8 codes clip(round(scaled), lo, hi); 0 where `scaled` is not finite."""
  codes = jnp.clip(jnp.round(scaled), lo, hi)
  return jnp.where(jnp.isfinite(scaled), codes, 0).astype(jnp.int8)


def ternary_quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """BitNet b1.58 absmean ternary quantization of a whole tensor.

  Args:
    w: floating-point array of any shape (one scale for the whole tensor), non-empty.

  Returns:
    (w_q, scale): w_q int8 of w's shape with values in {−1, 0, 1}; scale a float32 (or
    float64 for float64 input) scalar, the dequantizing multiplier
    `scale = max(mean|W|, 1e-5)`, so that `W ≈ w_q * scale`. Not differentiable (use
    `fake_ternary` for training).
  """
  w = jnp.asarray(w)
  _check_float(w, "ternary_quantize")
  if w.size == 0:
    raise ValueError(f"ternary_quantize needs a non-empty array, got shape {w.shape}")
  wf = w.astype(_compute_dtype(w))
  mean = jnp.mean(jnp.abs(wf))
  scale = jnp.maximum(mean, EPS)
  scale = jnp.where(jnp.isfinite(mean), scale, jnp.nan)
  s = 1.0 / scale
  return _codes(wf * s, -1, 1), scale


def fake_ternary(w: jax.Array) -> jax.Array:
  """Ŵ = w_q · scale (see `ternary_quantize`) in w's dtype, straight-through gradient."""
  w = jnp.asarray(w)
  _check_float(w, "fake_ternary")
  w_q, scale = ternary_quantize(jax.lax.stop_gradient(w))
  return _ste(w, (w_q.astype(scale.dtype) * scale).astype(w.dtype))


def absmax_quantize(x: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
  """Per-token absmax quantization along the last axis to signed `bits`-bit codes.

  Args:
    x: floating-point array [..., d] with d ≥ 1; every row along the last axis (token)
      gets its own scale.
    bits: static int in [2, 8]; codes lie in [−2^(bits−1), 2^(bits−1) − 1].

  Returns:
    (x_q, scale): x_q int8 of x's shape; scale float32 (float64 for float64 input) of
    shape [..., 1], the dequantizing multiplier `max(max|x|, 1e-5) / (2^(bits−1) − 1)`,
    so that `x ≈ x_q * scale`. Not differentiable (use `fake_absmax` for training).
  """
  x = jnp.asarray(x)
  _check_float(x, "absmax_quantize")
  bits = _check_bits(bits)
  if x.ndim == 0 or x.shape[-1] == 0:
    raise ValueError(f"absmax_quantize needs an input [..., d] with d >= 1, got shape "
                     f"{x.shape}")
  qb = 2 ** (bits - 1) - 1
  xf = x.astype(_compute_dtype(x))
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  scale = jnp.maximum(amax, EPS) / qb
  scale = jnp.where(jnp.isfinite(amax), scale, jnp.nan)
  s = qb / jnp.maximum(amax, EPS)
  return _codes(xf * s, -qb - 1, qb), scale


def fake_absmax(x: jax.Array, bits: int = 8) -> jax.Array:
  """x̂ = x_q · scale (see `absmax_quantize`) in x's dtype, straight-through gradient."""
  x = jnp.asarray(x)
  _check_float(x, "fake_absmax")
  x_q, scale = absmax_quantize(jax.lax.stop_gradient(x), bits)
  return _ste(x, (x_q.astype(scale.dtype) * scale).astype(x.dtype))


__all__ = ["ternary_quantize", "fake_ternary", "absmax_quantize", "fake_absmax"]
