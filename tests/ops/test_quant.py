"""Tests of sparsejax.ops.quant (BitNet b1.58) against independent NumPy formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import ops

# jitted (one compile per shape instead of op-by-op dispatch); errors raise at trace time
ternary_quantize = jax.jit(ops.ternary_quantize)
fake_ternary = jax.jit(ops.fake_ternary)
absmax_quantize = jax.jit(ops.absmax_quantize, static_argnums=1)
fake_absmax = jax.jit(ops.fake_absmax, static_argnums=1)

# A float32 kernel can land within float error of a rounding boundary (x.5) where the
# float64 reference rounds the other way; such codes may differ by one.
BOUNDARY_TOL = 1e-4


def np_ternary(w):
  """BitNet b1.58 absmean, float64: (codes, dequantizing scale, scaled values)."""
  w = np.asarray(w, np.float64)
  scale = max(np.mean(np.abs(w)), 1e-5)
  scaled = w * (1.0 / scale)
  return np.clip(np.round(scaled), -1, 1), scale, scaled


def np_absmax(x, bits=8):
  """Per-token absmax along the last axis, float64: (codes, scale [..., 1], scaled)."""
  x = np.asarray(x, np.float64)
  qb = 2 ** (bits - 1) - 1
  amax = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), 1e-5)
  scaled = x * (qb / amax)
  return np.clip(np.round(scaled), -qb - 1, qb), amax / qb, scaled


def assert_codes_match(codes, ref_codes, scaled):
  codes = np.asarray(codes, np.int64)
  near_half = np.abs(np.abs(scaled) % 1.0 - 0.5) < BOUNDARY_TOL
  np.testing.assert_array_equal(codes[~near_half], ref_codes[~near_half])
  assert np.all(np.abs(codes - ref_codes) <= 1)


def normal(seed, shape, scale=1.0, dtype=jnp.float32):
  """Fresh N(0, scale²) inputs (NumPy RNG: no per-shape compile of jax.random)."""
  x = scale * np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(x.astype(np.float32), dtype)


@pytest.mark.parametrize("shape,std", [((7,), 1.0), ((16, 24), 0.02), ((3, 4, 5), 30.0)])
def test_ternary_quantize_matches_numpy(rng_seed, shape, std):
  w = normal(rng_seed, shape, std)
  w_q, scale = ternary_quantize(w)
  ref_codes, ref_scale, scaled = np_ternary(w)
  assert w_q.dtype == jnp.int8 and w_q.shape == shape
  assert scale.dtype == jnp.float32 and scale.shape == ()
  assert set(np.unique(np.asarray(w_q))) <= {-1, 0, 1}
  assert {-1, 0, 1} <= set(np.unique(np.asarray(w_q)))   # a normal W uses all three
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
  assert_codes_match(w_q, ref_codes, scaled)


def test_fake_ternary_is_codes_times_scale_with_error_bound(rng_seed):
  w = normal(rng_seed, (32, 16), 0.05)
  w_hat = fake_ternary(w)
  w_q, scale = ternary_quantize(w)
  assert w_hat.dtype == w.dtype
  np.testing.assert_array_equal(w_hat, np.asarray(w_q, np.float32) * np.float32(scale))
  w64, s = np.asarray(w, np.float64), float(scale)
  err = np.abs(np.asarray(w_hat, np.float64) - w64)
  inside = np.abs(w64) <= 1.5 * s            # no clipping: round-to-nearest error
  assert np.all(err[inside] <= s / 2 * (1 + 1e-5))
  np.testing.assert_allclose(np.abs(np.asarray(w_hat))[~inside], s, rtol=1e-6)
  np.testing.assert_array_equal(np.sign(w_hat)[~inside], np.sign(w64)[~inside])


def test_ternary_tiny_weights_use_eps_scale(rng_seed):
  w = normal(rng_seed, (8, 8), 1e-8)
  w_q, scale = ternary_quantize(w)
  np.testing.assert_allclose(scale, 1e-5, rtol=1e-6)
  np.testing.assert_array_equal(w_q, 0)   # |w| · 1e5 ≪ 0.5


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 8)])
def test_absmax_quantize_matches_numpy(rng_seed, bits, shape):
  x = normal(rng_seed, shape, 3.0)
  x_q, scale = absmax_quantize(x, bits)
  ref_codes, ref_scale, scaled = np_absmax(x, bits)
  qb = 2 ** (bits - 1) - 1
  assert x_q.dtype == jnp.int8 and x_q.shape == shape
  assert scale.dtype == jnp.float32
  chex.assert_shape(scale, (*shape[:-1], 1))       # one scale per token
  codes = np.asarray(x_q, np.int64)
  assert codes.min() >= -qb - 1 and codes.max() <= qb
  np.testing.assert_array_equal(np.abs(codes).max(-1), qb)   # the absmax entry hits ±Qb
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
  assert_codes_match(x_q, ref_codes, scaled)


@pytest.mark.parametrize("bits", [8, 3])
def test_fake_absmax_value_and_error_bound(rng_seed, bits):
  x = normal(rng_seed, (4, 6, 32), 2.0)
  x_hat = fake_absmax(x, bits)
  x_q, scale = absmax_quantize(x, bits)
  np.testing.assert_array_equal(x_hat, np.asarray(x_q, np.float32) * np.asarray(scale))
  err = np.abs(np.asarray(x_hat, np.float64) - np.asarray(x, np.float64))
  assert np.all(err <= np.asarray(scale, np.float64) / 2 * (1 + 1e-5))  # never clips


def test_bfloat16_inputs_keep_dtype_and_match_float32(rng_seed):
  x = normal(rng_seed, (3, 16), 1.0, jnp.bfloat16)
  w = normal(rng_seed + 1, (16, 8), 0.02, jnp.bfloat16)
  x_hat, w_hat = fake_absmax(x, 8), fake_ternary(w)
  assert x_hat.dtype == jnp.bfloat16 and w_hat.dtype == jnp.bfloat16
  x_q, x_s = absmax_quantize(x, 8)
  w_q, w_s = ternary_quantize(w)
  assert x_s.dtype == jnp.float32 and w_s.dtype == jnp.float32
  ref_x = np.asarray(x_q, np.float32) * np.asarray(x_s)
  ref_w = np.asarray(w_q, np.float32) * np.float32(w_s)
  np.testing.assert_allclose(np.asarray(x_hat, np.float32), ref_x, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(w_hat, np.float32), ref_w, rtol=1e-2)
  assert_codes_match(x_q, *np_absmax(np.asarray(x, np.float32))[::2])


@pytest.mark.parametrize("fn", [ops.fake_ternary, ops.fake_absmax],
                         ids=["ternary", "absmax"])
def test_ste_gradient_is_identity(rng_seed, fn):
  x = normal(rng_seed, (4, 16), 0.5)
  g = normal(rng_seed + 1, (4, 16))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * g)))(x)
  np.testing.assert_array_equal(grad, g)
  _, tangent = jax.jit(lambda x, g: jax.jvp(fn, (x,), (g,)))(x, g)   # forward mode too
  np.testing.assert_array_equal(tangent, g)


def test_non_finite_token_gets_nan_scale_other_tokens_unaffected(rng_seed):
  x = np.array(normal(rng_seed, (3, 8)))
  x[0, 2], x[1, 5] = np.nan, np.inf
  x_q, scale = absmax_quantize(x, 8)
  assert np.all(np.isnan(scale[:2])) and np.isfinite(scale[2, 0])
  x_hat = np.asarray(fake_absmax(x, 8))
  assert np.all(np.isnan(x_hat[:2]))
  np.testing.assert_array_equal(x_hat[2], fake_absmax(x[2:], 8)[0])
  assert np.all(np.abs(np.asarray(x_q, np.int64)) <= 128)
  w_q, w_scale = ternary_quantize(x)
  assert np.isnan(w_scale) and np.all(np.isnan(np.asarray(fake_ternary(x))))
  assert set(np.unique(np.asarray(w_q))) <= {-1, 0, 1}


def test_errors():
  ints = jnp.arange(8, dtype=jnp.int32)
  for fn in (ops.ternary_quantize, ops.fake_ternary, ops.absmax_quantize, ops.fake_absmax):
    with pytest.raises(ValueError, match="floating-point input, got dtype int32"):
      fn(ints)
  x = jnp.linspace(-1.0, 1.0, 8)
  for bits in (1, 9, 0, 16):
    with pytest.raises(ValueError, match=rf"bits={bits} must be in \[2, 8\]"):
      ops.absmax_quantize(x, bits)
  for bits in (8.0, True):
    with pytest.raises(ValueError, match="must be a static Python int"):
      ops.fake_absmax(x, bits)
  with pytest.raises(ValueError, match="d >= 1"):
    ops.absmax_quantize(jnp.float32(1.0))
  with pytest.raises(ValueError, match="non-empty"):
    ops.ternary_quantize(jnp.zeros((0, 4)))
