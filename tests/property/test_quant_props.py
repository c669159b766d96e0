"""Properties of the BitNet b1.58 quantizers and ternary packing on random inputs.

ternary_quantize / absmax_quantize: codes recomputed in NumPy float32 from the op's own
scale (bit-exact: same IEEE operations), the scale against a float64 reference, the
round-trip error bound; fake_* = codes · scale with an identity gradient;
pack_ternary / unpack_ternary: an independent byte layout and a bitwise round trip.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from prop_helpers import (assert_same, f64, float_arrays, float_dtypes, int_dtypes, seeds,
                          shapes)
from sparsejax.ops import (absmax_quantize, fake_absmax, fake_ternary, pack_ternary,
                           ternary_quantize, unpack_ternary)
from sparsejax.ops.ternary_pack import check_packed, packed_size

EPS = 1e-5


def ref_codes(x32, s, lo, hi):
  """clip(round_half_even(x · s), lo, hi) in float32; 0 where x · s is not finite."""
  with np.errstate(invalid="ignore"):
    scaled = x32 * s
  codes = np.clip(np.rint(scaled), lo, hi)
  return np.where(np.isfinite(scaled), codes, 0).astype(np.int8)


def cotangent(seed, x):
  return np.asarray(jnp.asarray(np.random.default_rng(seed).standard_normal(x.shape),
                                x.dtype))


@jax.jit
def ternary_all(w, g):
  codes, scale = ternary_quantize(w)
  fake, vjp = jax.vjp(fake_ternary, w)
  return codes, scale, fake, vjp(g)[0]


@pytest.mark.slow
@given(shapes(1, 3, 1, 9), float_dtypes, st.data(), seeds)
def test_ternary_codes_scale_and_ste(shape, dtype, data, seed):
  w = data.draw(float_arrays(shape, dtype, specials=data.draw(st.booleans())))
  g = cotangent(seed, w)
  codes, scale, fake, dw = ternary_all(w, g)
  w32 = np.asarray(w, np.float32)
  assert codes.dtype == jnp.int8 and codes.shape == shape and scale.shape == ()
  assert set(np.unique(codes)) <= {-1, 0, 1}
  if not np.isfinite(w32).all():
    assert np.isnan(scale) and np.isnan(f64(fake)).all()
    np.testing.assert_array_equal(codes, ref_codes(w32, np.float32(np.nan), -1, 1))
  else:
    want = max(np.abs(f64(w)).mean(), EPS)
    np.testing.assert_allclose(float(scale), want, rtol=1e-5)
    np.testing.assert_array_equal(codes, ref_codes(w32, np.float32(1) / scale, -1, 1))
    assert_same(fake, np.asarray(jnp.asarray(np.asarray(codes, np.float32) * scale,
                                             dtype)))
    small = np.abs(w32 / scale) <= 1.5                 # no clipping: error <= scale / 2
    err = np.abs(np.asarray(codes, np.float64) * float(scale) - f64(w))
    assert (err[small] <= float(scale) * (0.5 + 1e-5)).all()
  assert_same(dw, g)


@functools.partial(jax.jit, static_argnames="bits")
def absmax_all(x, g, bits):
  codes, scale = absmax_quantize(x, bits)
  fake, vjp = jax.vjp(lambda x: fake_absmax(x, bits), x)
  return codes, scale, fake, vjp(g)[0]


@pytest.mark.slow
@given(shapes(1, 3, 1, 9), float_dtypes, st.integers(2, 8), st.data(), seeds)
def test_absmax_codes_scale_and_ste(shape, dtype, bits, data, seed):
  x = data.draw(float_arrays(shape, dtype, specials=data.draw(st.booleans())))
  g = cotangent(seed, x)
  codes, scale, fake, dx = absmax_all(x, g, bits)
  qb = 2 ** (bits - 1) - 1
  x32 = np.asarray(x, np.float32)
  amax = np.max(np.abs(x32), axis=-1, keepdims=True)
  finite = np.isfinite(x32).all(-1, keepdims=True)
  assert codes.dtype == jnp.int8 and scale.shape == (*shape[:-1], 1)
  assert (-qb - 1 <= np.asarray(codes)).all() and (np.asarray(codes) <= qb).all()
  s = np.float32(qb) / np.maximum(amax, np.float32(EPS))
  np.testing.assert_array_equal(codes, ref_codes(x32, s, -qb - 1, qb))
  want = np.where(finite, np.maximum(f64(amax), EPS) / qb, np.nan)
  np.testing.assert_allclose(np.asarray(scale, np.float64), want, rtol=1e-6)
  ref_fake = np.asarray(jnp.asarray(np.asarray(codes, np.float32) * scale, dtype))
  assert_same(fake, ref_fake)
  assert np.isnan(f64(fake)[~finite[..., 0]]).all()  # a non-finite token is all NaN
  err = np.abs(np.asarray(codes, np.float64) * np.asarray(scale, np.float64) - f64(x))
  rows = np.broadcast_to(finite, shape)
  assert (err[rows] <= np.broadcast_to(np.asarray(scale), shape)[rows] * (0.5 + 1e-5)).all()
  assert_same(dx, g)


@given(shapes(1, 3, 1, 5), int_dtypes, st.data())
def test_bad_quantizer_inputs_raise(shape, int_dtype, data):
  x = np.ones(shape, int_dtype)
  for fn in (ternary_quantize, fake_ternary, absmax_quantize, fake_absmax):
    with pytest.raises(ValueError, match=f"floating-point.*{x.dtype}"):
      fn(x)
  y = np.ones(shape, data.draw(float_dtypes))
  bits = data.draw(st.sampled_from((0, 1, 9, 16, -8, 8.0, True, "8")))
  for fn in (absmax_quantize, fake_absmax):
    with pytest.raises(ValueError, match="bits="):
      fn(y, bits)
  empty = np.ones((*shape[:-1], 0), y.dtype)
  for fn in (ternary_quantize, fake_ternary):
    with pytest.raises(ValueError, match="non-empty"):
      fn(empty)
  for fn in (absmax_quantize, fake_absmax):
    with pytest.raises(ValueError, match=r"d >= 1"):
      fn(empty)
    with pytest.raises(ValueError, match=r"d >= 1"):
      fn(np.ones((), y.dtype))


def ref_pack(codes, per_byte):
  """Byte b holds codes 5b..5b+4 (4b..4b+3 for 2bit), digit = code + 1, first code in
  the least significant digit, tail padded with code 0."""
  flat = [int(c) + 1 for c in np.asarray(codes).reshape(-1)]
  flat += [1] * (-len(flat) % per_byte)
  base = 3 if per_byte == 5 else 4
  return np.array([sum(d * base**i for i, d in enumerate(flat[j:j + per_byte]))
                   for j in range(0, len(flat), per_byte)], np.uint8)


@given(shapes(1, 3, 1, 7), st.sampled_from(("base3", "2bit")),
       st.sampled_from((np.int8, np.int32, np.int64)), seeds)
def test_pack_unpack_round_trip(shape, fmt, dtype, seed):
  codes = np.random.default_rng(seed).integers(-1, 2, size=shape).astype(dtype)
  packed, meta = pack_ternary(codes, format=fmt)
  per_byte = 5 if fmt == "base3" else 4
  np.testing.assert_array_equal(packed, ref_pack(codes, per_byte))
  assert packed.dtype == np.uint8 and packed.shape == (-(-codes.size // per_byte),)
  assert meta == {"format": fmt, "shape": list(shape), "num_codes": codes.size,
                  "num_bytes": packed_size(codes.size, fmt)}
  check_packed(packed, shape, format=fmt)
  out = jax.jit(lambda p: unpack_ternary(p, shape, format=fmt))(jnp.asarray(packed))
  assert out.dtype == jnp.int8
  np.testing.assert_array_equal(out, codes)


@given(shapes(1, 3, 1, 7), st.sampled_from(("base3", "2bit")), st.data(), seeds)
def test_bad_packing_inputs_raise(shape, fmt, data, seed):
  rng = np.random.default_rng(seed)
  codes = rng.integers(-1, 2, size=shape).astype(np.int8)
  bad = codes.copy()
  bad.reshape(-1)[rng.integers(bad.size)] = data.draw(st.sampled_from((2, -2, 5, -128)))
  with pytest.raises(ValueError, match="codes must be in"):
    pack_ternary(bad, format=fmt)
  with pytest.raises(ValueError, match="integer codes"):
    pack_ternary(codes.astype(np.float32), format=fmt)
  with pytest.raises(ValueError, match="non-empty"):
    pack_ternary(np.zeros((0, 2), np.int8), format=fmt)
  with pytest.raises(ValueError, match="format="):
    pack_ternary(codes, format=data.draw(st.sampled_from(("base4", "", "2BIT"))))
  packed, _ = pack_ternary(codes, format=fmt)
  with pytest.raises(ValueError, match="packed has"):
    unpack_ternary(np.concatenate([packed, packed[:1]]), shape, format=fmt)
  with pytest.raises(ValueError, match="packed must be a 1-D uint8"):
    unpack_ternary(packed.astype(np.int32), shape, format=fmt)
  corrupt = packed.copy()
  corrupt[rng.integers(corrupt.size)] = 255          # invalid in both formats
  with pytest.raises(ValueError, match="not a valid"):
    check_packed(corrupt, shape, format=fmt)
