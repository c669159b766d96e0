"""Tests of sparsejax.ops.ternary_pack: packed ternary codes (5 trits or 4 per byte)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import ops
from sparsejax.ops.ternary_pack import (FORMATS, bits_per_weight, check_packed,
                                        pack_ternary, packed_size, unpack_ternary)

PER_BYTE = {"base3": 5, "2bit": 4}


def random_codes(rng, shape):
  return rng.integers(-1, 2, shape).astype(np.int8)


def np_decode_byte(byte, format):
  """Independent decoder: the codes stored in one byte, least significant digit first."""
  byte, out = int(byte), []
  for _ in range(PER_BYTE[format]):
    if format == "base3":
      byte, digit = divmod(byte, 3)
    else:
      byte, digit = byte >> 2, byte & 3
    out.append(digit - 1)
  return out


def test_exported_from_ops():
  assert ops.pack_ternary is pack_ternary and ops.unpack_ternary is unpack_ternary


@pytest.mark.slow
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (7,), (19,), (20,), (21,),
                                   (3, 7), (2, 3, 5), (4, 6, 11)])
def test_round_trip(rng_seed, format, shape):
  rng = np.random.default_rng(rng_seed + sum(shape))
  codes = random_codes(rng, shape)
  packed, meta = pack_ternary(codes, format=format)
  n = codes.size
  assert packed.dtype == np.uint8 and packed.ndim == 1
  assert packed.shape == (-(-n // PER_BYTE[format]),) == (packed_size(n, format),)
  assert meta == {"format": format, "shape": list(shape), "num_codes": n,
                  "num_bytes": packed.shape[0]}
  out = unpack_ternary(packed, shape, format=format)
  assert out.dtype == jnp.int8 and out.shape == shape
  np.testing.assert_array_equal(out, codes)
  check_packed(packed, shape, format=format)


@pytest.mark.parametrize("format", FORMATS)
def test_every_byte_decodes_independently(rng_seed, format):
  """Each byte holds codes [k·b, k·b + k) in its digits, least significant first; the tail
  is padded with code 0."""
  rng = np.random.default_rng(rng_seed)
  k = PER_BYTE[format]
  codes = random_codes(rng, (6 * k + 2,))
  packed, _ = pack_ternary(codes, format=format)
  decoded = np.concatenate([np_decode_byte(b, format) for b in packed])
  np.testing.assert_array_equal(decoded[:codes.size], codes)
  np.testing.assert_array_equal(decoded[codes.size:], 0)


def test_known_bytes():
  # base3: Σ (t_i + 1)·3^i = 2·1 + 0·3 + 1·9 + 2·27 + 1·81 = 146
  assert pack_ternary(np.array([1, -1, 0, 1, 0], np.int8))[0].tolist() == [146]
  assert pack_ternary(np.array([1, 1, 1, 1, 1], np.int8))[0].tolist() == [242]
  assert pack_ternary(np.array([1], np.int8))[0].tolist() == [2 + 3 + 9 + 27 + 81]
  # 2bit: Σ (t_i + 1) << 2i = 2 | 0 << 2 | 1 << 4 | 2 << 6 = 146
  two_bit = pack_ternary(np.array([1, -1, 0, 1], np.int8), format="2bit")[0]
  assert two_bit.tolist() == [146]
  assert pack_ternary(np.array([-1], np.int8), format="2bit")[0].tolist() == [0b01010100]


@pytest.mark.parametrize("format", FORMATS)
def test_bits_per_weight(rng_seed, format):
  assert bits_per_weight(format) == {"base3": 1.6, "2bit": 2.0}[format]
  codes = random_codes(np.random.default_rng(rng_seed), (64, 40))   # no padding
  packed, _ = pack_ternary(codes, format=format)
  assert 8 * packed.nbytes / codes.size == bits_per_weight(format)


@pytest.mark.parametrize("format", FORMATS)
def test_unpack_jits_and_accepts_device_arrays(rng_seed, format):
  codes = random_codes(np.random.default_rng(rng_seed), (6, 9))
  packed, _ = pack_ternary(jnp.asarray(codes), format=format)      # JAX input too
  unpack = jax.jit(functools.partial(unpack_ternary, shape=codes.shape, format=format))
  np.testing.assert_array_equal(unpack(jnp.asarray(packed)), codes)


def test_pack_errors(rng_seed):
  codes = random_codes(np.random.default_rng(rng_seed), (3, 4))
  bad = codes.copy()
  bad[1, 2] = 2
  with pytest.raises(ValueError, match=r"codes must be in \{-1, 0, 1\}; found 2 at index "
                                       r"\(1, 2\)"):
    pack_ternary(bad)
  bad[1, 2] = -3
  with pytest.raises(ValueError, match="found -3"):
    pack_ternary(bad, format="2bit")
  with pytest.raises(ValueError, match="needs integer codes.*float32"):
    pack_ternary(codes.astype(np.float32))
  with pytest.raises(ValueError, match="non-empty"):
    pack_ternary(np.zeros((0, 3), np.int8))
  for fn in (lambda: pack_ternary(codes, format="base4"),
             lambda: unpack_ternary(np.zeros(3, np.uint8), (12,), format="3bit"),
             lambda: bits_per_weight("int2")):
    with pytest.raises(ValueError, match=r"format=.* must be one of \('base3', '2bit'\)"):
      fn()


def test_unpack_and_check_errors(rng_seed):
  codes = random_codes(np.random.default_rng(rng_seed), (12,))
  packed, _ = pack_ternary(codes)                                   # 3 bytes
  with pytest.raises(ValueError, match=r"has 3 bytes, but shape \(13,\) \(13 codes\) in "
                                       r"format '2bit' needs 4"):
    unpack_ternary(packed, (13,), format="2bit")
  with pytest.raises(ValueError, match=r"has 3 bytes, but shape \(4, 4\) \(16 codes\) in "
                                       r"format 'base3' needs 4"):
    unpack_ternary(packed, (4, 4))
  with pytest.raises(ValueError, match="1-D uint8"):
    unpack_ternary(packed.astype(np.int32), (12,))
  with pytest.raises(ValueError, match="1-D uint8"):
    unpack_ternary(packed.reshape(1, 3), (12,))
  corrupt = packed.copy()
  corrupt[1] = 243
  with pytest.raises(ValueError, match="byte 1 = 243 is not a valid 'base3' byte"):
    check_packed(corrupt, (12,), format="base3")
  packed2, _ = pack_ternary(codes, format="2bit")
  corrupt2 = packed2.copy()
  corrupt2[2] |= 0b1100                                             # field 1 = 3
  with pytest.raises(ValueError, match="byte 2 = .* not a valid '2bit' byte"):
    check_packed(corrupt2, (12,), format="2bit")
