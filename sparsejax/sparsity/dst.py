"""Dynamic sparse training mask updates: SET and RigL.

Both keep the number of active weights of every tensor exactly: with A active entries
and drop fraction f, k = ⌊A·f⌋ (computed in float32, as the RigL reference) are dropped
and k grown.

  drop (both): the k active entries of smallest |w| become inactive (ties: the higher
    flat index is dropped, i.e. the lower one kept);
  grow, SET (Mocanu et al. 2018): k entries chosen uniformly at random among those
    inactive after the drop;
  grow, RigL (Evci et al. 2020, Alg. 1): the k entries inactive after the drop with the
    largest |∂L/∂w| (ties: lower flat index). The gradient must be the dense gradient of
    the loss w.r.t. the effective (masked) weights, as when the model is run on w ⊙ m.

Entries inactive after the drop include the ones just dropped, so a dropped weight can
be grown back in the same update (the reference behaviour). The caller sets grown
weights (new ∧ ¬old) to 0 and resets their optimizer moments; the drop fraction over
time comes from `sparsejax.sparsity.schedules.cosine_drop_fraction`.

Selections use `sparsejax.sparsity.masks.keep_top_k` (bisection, no sort or gather), so
new masks keep their tensors' shardings and equal the single-device result.
`weights`, `mask` and `grads` are arrays or pytrees of the same structure; a None mask
leaf marks a dense (unmasked) tensor and stays None.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsejax.sparsity.masks import check_fraction, keep_top_k


def _drop_fraction(drop_fraction):
  """Python float checked in [0, 1], or a traced scalar clipped to it."""
  if isinstance(drop_fraction, jax.core.Tracer):
    return jnp.clip(jnp.asarray(drop_fraction, jnp.float32), 0.0, 1.0)
  return check_fraction(drop_fraction, "drop_fraction")


def _check_leaf(name: str, value, mask: jax.Array, fn: str) -> jax.Array:
  value = jnp.asarray(value)
  if value.shape != mask.shape:
    raise ValueError(f"{fn}: {name} shape {value.shape} differs from its mask's "
                     f"{mask.shape}")
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{fn}: {name} must be floating, got dtype {value.dtype}")
  return value


def _drop_then_grow(weights: jax.Array, mask: jax.Array, grow_score: jax.Array,
                    fraction) -> jax.Array:
  """Keeps the A − k largest |w| among the active, then grows the k largest
  `grow_score` among the rest (k = ⌊A·fraction⌋)."""
  active = jnp.sum(mask, dtype=jnp.int32)
  k = jnp.floor(active.astype(jnp.float32) * fraction).astype(jnp.int32)
  kept = keep_top_k(jnp.abs(weights), active - k, valid=mask)
  return kept | keep_top_k(grow_score, k, valid=~kept)


def _map_masked(fn: Callable[..., jax.Array], mask, *trees) -> Any:
  """fn(i, mask_leaf, *leaves) over the non-None leaves of `mask` (i: leaf number)."""
  leaves, treedef = jax.tree.flatten(mask, is_leaf=lambda x: x is None)
  others = [treedef.flatten_up_to(tree) for tree in trees]
  out, i = [], 0
  for j, m in enumerate(leaves):
    if m is None:
      out.append(None)
      continue
    out.append(fn(i, jnp.asarray(m) != 0, *(o[j] for o in others)))
    i += 1
  return jax.tree.unflatten(treedef, out)


def rigl_update(weights, mask, grads, *, drop_fraction) -> Any:
  """RigL mask update: drop the k active entries of smallest |w|, grow the k inactive
  (after the drop) of largest |grad|; k = ⌊A·drop_fraction⌋ (module docstring).

  Args:
    weights: array or pytree of floating arrays (the dense weights; only the active
      entries' magnitudes are used).
    mask: bool (or 0/1) masks of the same structure and shapes; None leaves skipped.
    grads: dense gradients w.r.t. the effective weights, same structure and shapes.
    drop_fraction: f in [0, 1] (Python float, or a traced scalar, clipped).

  Returns:
    bool masks of the same structure, shardings and active counts.
  """
  fraction = _drop_fraction(drop_fraction)

  def one(_, m, w, g):
    w = _check_leaf("weights", w, m, "rigl_update")
    g = _check_leaf("grads", g, m, "rigl_update")
    return _drop_then_grow(w, m, jnp.abs(g), fraction)
  return _map_masked(one, mask, weights, grads)


def set_update(weights, mask, *, drop_fraction, key: jax.Array) -> Any:
  """SET mask update: drop the k active entries of smallest |w|, grow k entries chosen
  uniformly at random among the inactive (after the drop); k = ⌊A·drop_fraction⌋.

  Args:
    weights: array or pytree of floating arrays.
    mask: bool (or 0/1) masks of the same structure and shapes; None leaves skipped.
    drop_fraction: ζ in [0, 1] (0.3 in the paper; Python float or traced scalar).
    key: a PRNG key; the i-th masked tensor (in tree order) uses `fold_in(key, i)`.

  Returns:
    bool masks of the same structure, shardings and active counts.
  """
  fraction = _drop_fraction(drop_fraction)

  def one(i, m, w):
    w = _check_leaf("weights", w, m, "set_update")
    noise = jax.random.uniform(jax.random.fold_in(key, i), m.shape)
    return _drop_then_grow(w, m, noise, fraction)
  return _map_masked(one, mask, weights)
