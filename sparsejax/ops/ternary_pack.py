"""Packed storage of ternary (BitNet b1.58) weight codes: 5 trits or 4 codes per byte.

Codes t ∈ {−1, 0, +1} (int8, from `ternary_quantize`) are flattened in C order, shifted
to digits d = t + 1 ∈ {0, 1, 2} and packed into a 1-D uint8 array:

  "base3"  5 trits per byte, byte = Σ_{i=0..4} d_i · 3^i  (≤ 242 < 256): 1.6 bits/weight
  "2bit"   4 codes per byte, byte = Σ_{i=0..3} d_i << 2i   (field 3 unused): 2 bits/weight

Digit i of a byte is the code at flat index 5·byte + i (4·byte + i for "2bit"), so the
first code sits in the least significant digit. The tail is padded with code 0 (digit 1)
to a whole byte; `unpack_ternary` drops it. The packed array has ceil(n / 5) (or
ceil(n / 4)) bytes for n codes.

`pack_ternary` runs on the host (NumPy: export is a one-off); `unpack_ternary` is pure
jnp and jittable (the shape is static), so packed weights can be shipped to the device
and decoded there at load time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("base3", "2bit")
CODES_PER_BYTE = {"base3": 5, "2bit": 4}
_BASE3_WEIGHTS = (1, 3, 9, 27, 81)       # 3^i
_BASE3_MAX = 242                         # 2 · (1 + 3 + 9 + 27 + 81)


def _check_format(format: str) -> int:
  if format not in CODES_PER_BYTE:
    raise ValueError(f"format={format!r} must be one of {FORMATS}")
  return CODES_PER_BYTE[format]


def bits_per_weight(format: str) -> float:
  """Storage bits per ternary code (excluding tail padding): 1.6 or 2."""
  return 8 / _check_format(format)


def packed_size(num_codes: int, format: str) -> int:
  """Bytes of the packed array for `num_codes` codes."""
  return -(-num_codes // _check_format(format))


def pack_ternary(codes: Any, *, format: str = "base3") -> tuple[np.ndarray, dict]:
  """Packs ternary codes into bytes (see the module docstring for the layout).

  Args:
    codes: integer array of any shape with values in {−1, 0, 1} (NumPy or JAX, e.g. the
      int8 codes of `ternary_quantize`), non-empty.
    format: "base3" (5 codes/byte, 1.6 bits) or "2bit" (4 codes/byte).

  Returns:
    (packed, meta): packed a 1-D uint8 NumPy array of `packed_size(codes.size, format)`
    bytes; meta = {"format", "shape" (list), "num_codes", "num_bytes"}.
  """
  per_byte = _check_format(format)
  codes = np.asarray(jax.device_get(codes))
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"pack_ternary needs integer codes in {{-1, 0, 1}}, got dtype "
                     f"{codes.dtype}")
  if codes.size == 0:
    raise ValueError(f"pack_ternary needs a non-empty array, got shape {codes.shape}")
  bad = (codes < -1) | (codes > 1)
  if bad.any():
    idx = np.unravel_index(int(np.argmax(bad)), codes.shape)
    raise ValueError(f"pack_ternary: codes must be in {{-1, 0, 1}}; found "
                     f"{int(codes[idx])} at index {tuple(int(i) for i in idx)} "
                     f"({int(bad.sum())} invalid of {codes.size})")
  n = codes.size
  num_bytes = packed_size(n, format)
  digits = np.ones(num_bytes * per_byte, np.uint8)          # padding: code 0
  digits[:n] = (codes.reshape(-1) + 1).astype(np.uint8)
  digits = digits.reshape(num_bytes, per_byte)
  if format == "base3":
    packed = digits.astype(np.uint16) @ np.asarray(_BASE3_WEIGHTS, np.uint16)
  else:
    packed = np.bitwise_or.reduce(
        digits.astype(np.uint16) << (2 * np.arange(per_byte, dtype=np.uint16)), axis=1)
  meta = {"format": format, "shape": list(codes.shape), "num_codes": int(n),
          "num_bytes": int(num_bytes)}
  return packed.astype(np.uint8), meta


def check_packed(packed: Any, shape: Sequence[int], *, format: str) -> None:
  """Raises ValueError unless `packed` is a valid packing of `shape` codes (host check:
  dtype, length, and no byte outside the format's alphabet)."""
  per_byte = _check_format(format)
  packed = np.asarray(jax.device_get(packed))
  _check_layout(packed, shape, format, per_byte)
  if format == "base3":
    invalid = packed > _BASE3_MAX
  else:
    fields = (packed[:, None] >> (2 * np.arange(per_byte, dtype=np.uint8))) & 3
    invalid = (fields == 3).any(axis=1)
  if invalid.any():
    i = int(np.argmax(invalid))
    raise ValueError(f"packed byte {i} = {int(packed[i])} is not a valid {format!r} "
                     "byte (corrupt or packed with another format)")


def _check_layout(packed, shape, format: str, per_byte: int) -> int:
  if packed.dtype != np.uint8 or packed.ndim != 1:
    raise ValueError(f"packed must be a 1-D uint8 array, got {packed.dtype} of shape "
                     f"{packed.shape}")
  n = math.prod(shape)
  expected = -(-n // per_byte)
  if n == 0 or packed.shape[0] != expected:
    raise ValueError(f"packed has {packed.shape[0]} bytes, but shape {tuple(shape)} "
                     f"({n} codes) in format {format!r} needs {expected}")
  return n


def unpack_ternary(packed: jax.Array, shape: Sequence[int], *,
                   format: str = "base3") -> jax.Array:
  """Inverse of `pack_ternary`: int8 codes in {−1, 0, 1} of `shape` (jnp, jittable).

  Args:
    packed: 1-D uint8 array (NumPy or JAX) as returned by `pack_ternary`.
    shape: the codes' shape (static).
    format: the format it was packed with.

  Bytes outside the format's alphabet are not detected here (use `check_packed` on the
  host); they decode to arbitrary codes.
  """
  per_byte = _check_format(format)
  shape = tuple(int(s) for s in shape)
  n = _check_layout(packed, shape, format, per_byte)
  p = jnp.asarray(packed).astype(jnp.int32)[:, None]
  if format == "base3":
    digits = (p // jnp.asarray(_BASE3_WEIGHTS, jnp.int32)) % 3
  else:
    digits = (p >> (2 * jnp.arange(per_byte, dtype=jnp.int32))) & 3
  return (digits.reshape(-1)[:n] - 1).astype(jnp.int8).reshape(shape)


__all__ = ["FORMATS", "bits_per_weight", "check_packed", "pack_ternary", "packed_size",
           "unpack_ternary"]
