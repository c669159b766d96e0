"""The d_values CSR shared by the TPU and GPU memory-lookup backward kernels (XLA).

The valid flat lookups are sorted stably by value row, so each row's (or row tile's)
lookups are one contiguous range and every dV row is written by exactly one kernel
program in a fixed order: deterministic, no atomics. Only touched rows / row tiles
get a program (`touched_tiles`); the kernels write them into an aliased zeros table.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.memory_lookup.rule import mask_lookups


def sorted_csr(indices, weights, groups, num_rows: int, num_groups: int):
  """CSR of the valid flat lookups sorted (stably) by value row.

  Returns (offsets [num_rows + 1] int32, rows [M] int32 sorted row ids,
  src [M] int32 = l·G + g (the dY row of each sorted lookup), w [M] f32). Invalid
  lookups (row outside [0, num_rows), group outside [0, num_groups)) sort after
  offsets[num_rows] with weight 0, so no row's range contains them.
  """
  k = indices.shape[1]
  idx, w, grp, valid = mask_lookups(indices, weights, groups, num_rows, num_groups)
  flat = jnp.where(valid, idx, num_rows).reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  rows = flat[order]
  src = (order // k) * num_groups + grp.reshape(-1)[order]
  w = w.reshape(-1).astype(jnp.float32)[order]
  counts = jnp.zeros((num_rows,), jnp.int32).at[flat].add(1, mode="drop")
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts,
                                                                    dtype=jnp.int32)])
  return offsets, rows, src, w


def touched_tiles(offsets, num_tiles: int, r: int, slots: int):
  """The tiles of R rows that hold ≥ 1 sorted lookup (R = 1: the touched rows).

  offsets [num_tiles·R + 1] (`sorted_csr`). Returns (tiles, starts, ends) int32
  [slots] (slots ≥ the number U of touched tiles, static) and U int32: slot i < U is
  the i-th touched tile in row order with its lookup range [starts, ends); a slot
  i ≥ U repeats slot U - 1 (tile 0 with an empty range when U = 0)."""
  bounds = offsets[::r]                                             # [num_tiles + 1]
  touched = bounds[1:] > bounds[:-1]
  num = jnp.sum(touched, dtype=jnp.int32)
  tiles = jnp.nonzero(touched, size=slots, fill_value=0)[0].astype(jnp.int32)
  tiles = jnp.where(jnp.arange(slots) < num, tiles, tiles[jnp.maximum(num - 1, 0)])
  return tiles, bounds[tiles], bounds[tiles + 1], num


__all__ = ["sorted_csr", "touched_tiles"]
