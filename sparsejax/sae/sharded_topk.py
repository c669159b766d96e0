"""Exact top-k over a latent axis split across the mesh's "tensor" axis, without
gathering it.

For r [N, n] ≥ 0 (ReLU'd pre-activations) sharded as (batch axes, "tensor"), each device
holds r_loc [N_loc, n / T]. The global top-k of a row lies inside the union of the
shards' local top-k (an entry beaten by fewer than k entries globally is beaten by fewer
than k in its own shard), so:

  1. every shard selects its local top-k with `sparsejax.ops.topk_sparsify` (the Pallas
     kernel on TPU/GPU);
  2. the k-th largest candidate value τ of each row is found by bisection on the float
     bits (non-negative floats order like their int32 bits): 31 rounds of counting
     candidates ≥ mid, summed over "tensor" with `psum` ([N_loc] int32 per round);
  3. candidates > τ are kept, and of those equal to τ the lowest global indices, as
     many as are still needed (shard counts exchanged with `all_gather`), which is the
     tie rule of `lax.top_k`.

Communication per row: 31 + 2 int32 psums / gathers over "tensor" instead of gathering
n / T · (T − 1) floats. Returns the bool mask of kept entries (the caller takes the
gradient through `where(mask, r, 0)`, outside the `shard_map`). Entries with r = 0 are
never kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparsejax.ops.topk import _free_axes, _row_axes, topk_sparsify

AXIS = "tensor"


def applies(n: int, k: int) -> bool:
  """Whether a mesh in context splits a latent axis of size n over "tensor" (free, of
  size T > 1, T | n) with k ≤ n / T, so `topk_mask` can be used."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return False
  free = _free_axes(mesh)
  size = mesh.shape[AXIS]
  return AXIS in free and size > 1 and n % size == 0 and k <= n // size


def _local_mask(r, k: int, impl: str):
  """Per shard: the global top-k mask of r_loc [N_loc, n_loc] (see the module doc)."""
  cand = topk_sparsify(r, k, impl=impl)          # local top-k, zeros elsewhere
  bits = jax.lax.bitcast_convert_type(cand.astype(jnp.float32), jnp.int32)
  count = lambda pred: jax.lax.psum(jnp.sum(pred, axis=-1, dtype=jnp.int32), AXIS)

  def bisect(_, bounds):
    lo, hi = bounds                               # invariant: count(bits >= lo) >= k
    mid = lo + (hi - lo + 1) // 2
    ok = count(bits >= mid[:, None]) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  rows = bits.shape[0]
  lo = jnp.zeros((rows,), jnp.int32)
  hi = jnp.full((rows,), 0x7FFFFFFE, jnp.int32)   # above +inf; hi − lo + 1 fits
  tau, _ = jax.lax.fori_loop(0, 31, bisect, (lo, hi))
  tau = tau[:, None]
  greater = bits > tau
  equal = (bits == tau) & (tau > 0)
  need = k - count(greater)                                       # [N_loc]
  per_shard = jax.lax.all_gather(jnp.sum(equal, -1, dtype=jnp.int32), AXIS, axis=1)
  before = jnp.sum(jnp.where(jnp.arange(per_shard.shape[1]) < jax.lax.axis_index(AXIS),
                             per_shard, 0), axis=1)               # ties in earlier shards
  rank = before[:, None] + jnp.cumsum(equal, axis=-1, dtype=jnp.int32)
  return greater | (equal & (rank <= need[:, None]))


def topk_mask(r: jax.Array, k: int, impl: str = "auto") -> jax.Array:
  """bool [N, n]: the k largest entries of each row of r [N, n] (r ≥ 0; zeros never
  kept; ties to the lower index), computed shard by shard over the mesh in context
  (requires `applies(n, k)`)."""
  mesh = jax.sharding.get_abstract_mesh()
  free = _free_axes(mesh)
  spec = P(_row_axes(mesh, free, r.shape[0]) or None, AXIS)
  fn = lambda x: _local_mask(x, k, impl)
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec,
                       axis_names=set(free), check_vma=False)(r)


__all__ = ["applies", "topk_mask"]
