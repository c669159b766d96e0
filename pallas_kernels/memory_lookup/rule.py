"""The invalid-lookup rule shared by the TPU and GPU memory-lookup kernels.

A lookup (l, k) is valid when indices[l, k] is in [0, N) and groups[l, k] in [0, G).
An invalid one (negative = padding, or past the end) contributes exactly zero to the
output, gets zero d_weights and adds nothing to d_values — never clamped to a row.
"""

from __future__ import annotations

import jax.numpy as jnp


def valid_lookups(indices, groups, num_rows: int, num_groups: int):
  """bool [L, K]: reads a row in [0, num_rows) into a group in [0, num_groups)."""
  return ((indices >= 0) & (indices < num_rows) & (groups >= 0)
          & (groups < num_groups))


def mask_lookups(indices, weights, groups, num_rows: int, num_groups: int):
  """(indices, weights, groups, valid) with invalid lookups sent to row 0 / group 0 with
  weight 0 (safe to gather; their contribution is then an exact zero)."""
  valid = valid_lookups(indices, groups, num_rows, num_groups)
  return (jnp.where(valid, indices, 0).astype(jnp.int32),
          jnp.where(valid, weights, jnp.zeros_like(weights)),
          jnp.where(valid, groups, 0).astype(jnp.int32), valid)
