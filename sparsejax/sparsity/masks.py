"""Sparsity masks from scores: unstructured top-k, N:M, block and channel.

Every function returns a bool mask of the scores' shape, True where a weight is kept,
and keeps the *largest* scores (pass |w| for magnitude pruning, |w·g| for SNIP, ...).

Counting rule: a tensor of n entries at density d keeps exactly k = round(d·n) entries
(Python's round, half to even); block and channel masks apply the same rule at their
granularity (round(d·#blocks) blocks, round(d·#channels) channels). Ties in a score keep
the lower flat (row-major) index. Scores are ranked in IEEE total order with -0.0 = +0.0
and every NaN ranked above +inf.

Sharding: no sort and no gather. The k-th largest score is found by bisection on the
bits of its order-preserving unsigned-integer key (one bit per step, each step a
`sum(key >= candidate)` — an elementwise compare and an all-reduce of one integer under
a sharded input), then the ties at that score are cut by a second bisection on the flat
index. A mask therefore has the sharding of its scores, and its values do not depend on
the sharding. Cost: (bits of the dtype + log2 n) passes over the scores, once per mask
update.

`density` may be a traced scalar (e.g. from a schedule inside `jit`): k is then
round(clip(d, 0, 1)·n) computed in float32. The mask functions also accept a pytree of
score arrays, with one density for all or a pytree of densities of the same structure
(e.g. the dict of `erk_densities` for a dict of scores).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sparsejax.ops.topk import static_int

POOLS = ("mean", "max")


def check_fraction(value, name: str) -> float:
  """A concrete number in [0, 1] as a Python float; ValueError naming `name` if not."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                       np.floating, np.ndarray, jax.Array)):
    raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name}={value} must be in [0, 1]")
  return value


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def keep_count(density, n: int, name: str = "density"):
  """k = round(density·n): a Python int for a concrete density, int32 when traced."""
  if _is_traced(density):
    d = jnp.clip(jnp.asarray(density, jnp.float32), 0.0, 1.0)
    return jnp.round(d * n).astype(jnp.int32)
  return int(round(check_fraction(density, name) * n))


def _check_scores(scores, fn: str) -> jax.Array:
  scores = jnp.asarray(scores)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise TypeError(f"{fn}: scores must be a floating-point array, got dtype {scores.dtype}")
  if scores.size >= 2**31:
    raise ValueError(f"{fn}: scores of {scores.size} entries exceed the int32 flat index")
  return scores


def _order_key(scores: jax.Array) -> jax.Array:
  """Unsigned keys with the total order of the scores (-0.0 = +0.0, NaN above +inf);
  key 0 is never produced (it would be a negative NaN), so it can mark excluded entries.
  Half-precision scores are upcast to float32 (exact)."""
  if jnp.finfo(scores.dtype).bits < 32:
    scores = scores.astype(jnp.float32)
  bits = jnp.finfo(scores.dtype).bits
  utype = jnp.uint32 if bits == 32 else jnp.uint64
  s = jnp.where(scores == 0, jnp.zeros((), scores.dtype), scores)
  s = jnp.where(jnp.isnan(s), jnp.array(jnp.nan, scores.dtype), s)
  b = lax.bitcast_convert_type(s, utype)
  sign = jnp.array(1 << (bits - 1), utype)
  return jnp.where((b & sign) != 0, ~b, b | sign)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """int32 row-major flat index of every entry (built from iotas: partitions like the
  array it indexes)."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def _largest_passing(pred: Callable[[jax.Array], jax.Array], bits: int, dtype) -> jax.Array:
  """The largest t in [0, 2^bits) with pred(t), for pred true at 0 and monotone
  (true up to some t, false after): decided one bit at a time from the top."""
  one = jnp.array(1, dtype)

  def step(i, t):
    cand = t | (one << (bits - 1 - i).astype(dtype))
    return jnp.where(pred(cand), cand, t)

  return lax.fori_loop(0, bits, step, jnp.zeros((), dtype))


@jax.jit
def _keep_largest_keys(key: jax.Array, k: jax.Array) -> jax.Array:
  """True at the k largest keys (ties: lower flat index). Entries with key 0 are never
  kept provided k ≤ the number of nonzero keys."""
  k = k.astype(jnp.int32)
  count = lambda sel: jnp.sum(sel, dtype=jnp.int32)
  bits = jnp.iinfo(key.dtype).bits
  # t = the k-th largest key: the largest t with #(key >= t) >= k (all-ones when k = 0).
  t = _largest_passing(lambda c: count(key >= c) >= k, bits, key.dtype)
  above = key > t
  ties = key == t
  rest = k - count(above)
  # j = the flat index of the (rest+1)-th tie (or the top of the range): ties below it.
  index = _flat_index(key.shape)
  j = _largest_passing(lambda c: count(ties & (index < c)) <= rest,
                       max(1, key.size.bit_length()), jnp.int32)
  return above | (ties & (index < j))


def keep_top_k(scores: jax.Array, k, valid: jax.Array | None = None) -> jax.Array:
  """bool mask of the k largest scores among the `valid` entries (all when None); ties
  keep the lower flat index. k: Python int or traced int, at most the number of valid
  entries (more is the caller's error: excluded entries would then be kept)."""
  key = _order_key(scores)
  if valid is not None:
    key = jnp.where(valid, key, jnp.zeros((), key.dtype))
  return _keep_largest_keys(key, jnp.asarray(k, jnp.int32))


def _spread(kept: jax.Array, scores: jax.Array) -> jax.Array:
  """`kept` (broadcastable to the scores) at the scores' shape and sharding. The scores'
  keys are never 0, so the `&` changes no value; being elementwise on the scores, it
  makes XLA give the mask their sharding (a plain broadcast of a per-block or
  per-channel mask would be sharded only along the axes that mask had)."""
  return (_order_key(scores) != 0) & kept


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _map_scores(fn: Callable[[Any, Any], jax.Array], scores, density):
  """fn(scores, density) on an array, or leafwise on a pytree of scores with one density
  (number or traced scalar) or a pytree of densities of the same structure."""
  if _is_array(scores):
    return fn(scores, density)
  if (density is None or isinstance(density, (int, float, np.number))
      or _is_array(density) and jnp.ndim(density) == 0):
    return jax.tree.map(lambda s: fn(s, density), scores)
  return jax.tree.map(fn, scores, density)


def topk_mask(scores, density) -> jax.Array:
  """Unstructured mask keeping the k = round(density·n) largest of the n scores.

  Args:
    scores: floating array of any shape (or a pytree of them).
    density: fraction kept, in [0, 1] (Python float, or traced scalar).

  Returns:
    bool array of the scores' shape and sharding, exactly k True; ties keep the lower
    flat index.
  """
  def one(s, d):
    s = _check_scores(s, "topk_mask")
    return keep_top_k(s, keep_count(d, s.size))
  return _map_scores(one, scores, density)


def _check_axis(axis, ndim: int, fn: str) -> int:
  axis = static_int(axis, "axis")
  if not -ndim <= axis < ndim:
    raise ValueError(f"{fn}: axis={axis} is out of range for scores of rank {ndim}")
  return axis % ndim


def _group_rank(groups: jax.Array, axis: int) -> jax.Array:
  """Rank of every entry within its group along `axis` (0 = largest; ties: lower
  index first), by m elementwise comparisons — no sort, shardable on the other axes."""
  key = _order_key(groups)
  m = groups.shape[axis]
  position = lax.broadcasted_iota(jnp.int32, groups.shape, axis)
  rank = jnp.zeros(groups.shape, jnp.int32)
  for j in range(m):
    other = lax.slice_in_dim(key, j, j + 1, axis=axis)
    beats = (other > key) | ((other == key) & (j < position))
    rank = rank + beats.astype(jnp.int32)
  return rank


def nm_mask(scores, n: int, m: int, *, axis: int = 0) -> jax.Array:
  """N:M mask: of every m consecutive entries along `axis`, keep the n largest scores.

  Flax kernels are [in, out], so the default axis=0 groups the input features of each
  output (the layout of 2:4 sparse tensor cores, Mishra et al. 2021). Density n/m.

  Args:
    scores: floating array (or a pytree of them); m must divide its size along `axis`.
    n, m: Python ints, 0 <= n <= m.

  Returns:
    bool mask of the scores' shape and sharding; ties keep the lower index.
  """
  def one(s, _):
    s = _check_scores(s, "nm_mask")
    if s.ndim == 0:
      raise ValueError("nm_mask: scores must have at least one axis")
    ax = _check_axis(axis, s.ndim, "nm_mask")
    nn, mm = static_int(n, "n"), static_int(m, "m")
    if mm < 1 or s.shape[ax] % mm:
      raise ValueError(f"nm_mask: m={mm} must be a positive divisor of the size "
                       f"{s.shape[ax]} of axis {ax}")
    if not 0 <= nn <= mm:
      raise ValueError(f"nm_mask: n={nn} must be in [0, m={mm}]")
    groups = s.reshape(*s.shape[:ax], s.shape[ax] // mm, mm, *s.shape[ax + 1:])
    return (_group_rank(groups, ax + 1) < nn).reshape(s.shape)
  return _map_scores(one, scores, None)


def _pool(x: jax.Array, axes: tuple[int, ...], pool: str) -> jax.Array:
  if pool == "mean":
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=axes)
  if pool == "max":
    return jnp.max(x, axis=axes)
  raise ValueError(f"pool={pool!r} must be one of {POOLS}")


def block_mask(scores, density, block: tuple[int, ...], *,
               pool: str = "mean") -> jax.Array:
  """Block mask: tile the scores into blocks, pool each block's scores, keep whole blocks.

  The counting rule applies at block granularity: of the B blocks, exactly
  round(density·B) with the largest pooled scores are kept (ties: lower row-major block
  index), so the kept fraction of entries is round(density·B)/B.

  Args:
    scores: floating array (or a pytree of them).
    density: fraction of blocks kept, in [0, 1] (Python float or traced scalar).
    block: block shape, one positive int per axis of `scores` (e.g. (bh, bw) for an
      [in, out] kernel); each must divide the scores' size along its axis.
    pool: "mean" (average score, e.g. the mean |w| of the block) or "max".

  Returns:
    bool mask of the scores' shape and sharding, constant on every block.
  """
  def one(s, d):
    s = _check_scores(s, "block_mask")
    try:
      bs = tuple(static_int(b, "block") for b in block)
    except (TypeError, ValueError):
      raise ValueError(f"block={block!r} must be a tuple of ints") from None
    if len(bs) != s.ndim or any(b < 1 or dim % b for b, dim in zip(bs, s.shape)):
      raise ValueError(f"block={block!r} must have one positive divisor of each axis of "
                       f"the scores' shape {s.shape}")
    if pool not in POOLS:
      raise ValueError(f"pool={pool!r} must be one of {POOLS}")
    tiled = s.reshape([v for dim, b in zip(s.shape, bs) for v in (dim // b, b)])
    pooled = _pool(tiled, tuple(range(1, 2 * s.ndim, 2)), pool)
    kept = keep_top_k(pooled, keep_count(d, pooled.size))
    kept = jnp.expand_dims(kept, tuple(range(1, 2 * s.ndim, 2)))
    return _spread(jnp.broadcast_to(kept, tiled.shape).reshape(s.shape), s)
  return _map_scores(one, scores, density)


def channel_mask(scores, density, *, axis: int, pool: str = "mean") -> jax.Array:
  """Structured mask keeping whole slices (channels) along `axis`.

  Each of the C channels (index along `axis`: a row of an [in, out] kernel at axis=0, a
  column at axis=1, a head of a [embed, heads, head_dim] kernel at axis=1) is scored by
  pooling its scores over the other axes; round(density·C) channels with the largest
  pooled scores are kept (ties: lower channel index).

  Args:
    scores: floating array with at least one axis (or a pytree of them).
    density: fraction of channels kept, in [0, 1] (Python float or traced scalar).
    axis: the channel axis.
    pool: "mean" (e.g. the channel's mean |w|, its L1 norm over its size) or "max".

  Returns:
    bool mask of the scores' shape and sharding, constant along the other axes.
  """
  def one(s, d):
    s = _check_scores(s, "channel_mask")
    if s.ndim == 0:
      raise ValueError("channel_mask: scores must have at least one axis")
    ax = _check_axis(axis, s.ndim, "channel_mask")
    others = tuple(a for a in range(s.ndim) if a != ax)
    pooled = _pool(s, others, pool) if others else s
    kept = keep_top_k(pooled, keep_count(d, s.shape[ax]))
    return _spread(jnp.expand_dims(kept, others), s)
  return _map_scores(one, scores, density)


__all__ = ["topk_mask", "nm_mask", "block_mask", "channel_mask", "keep_top_k",
           "keep_count", "check_fraction"]
