"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding.

Frankle & Carbin (2019), "The Lottery Ticket Hypothesis"; Frankle et al. (2020),
"Linear Mode Connectivity and the Lottery Ticket Hypothesis" (rewinding to step k).
One IMP round, given the weights θ_T trained under the masks m_r:

    m_{r+1} = the K_{r+1} largest |θ_T| among the entries kept by m_r, one threshold
              over all masked tensors (global magnitude),
    K_{r+1} = round((1 − p) · K_r),  K_0 = N (all entries of the masked tensors),

so after R rounds at pruning fraction p = 0.2 the density is K_R / N ≈ 0.8^R (each
round rounds its own count). The ticket restarts from the rewound weights θ_k ⊙ m
(k = 0: the original initialization); the control restarts from a fresh random
initialization θ'_0 ⊙ m with the same masks.

Masks are {param path name: bool array} like `Sparsifier.masks` (True = kept); params
are any pytree of arrays (Flax boxes allowed). Everything is pure JAX: a sharded
tree is pruned without gathering it (`algorithms.global_topk_mask` bisects on the
threshold with per-tensor counts), and masks keep their params' shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.sparsity import param_filter
from sparsejax.sparsity.algorithms import global_topk_mask
from sparsejax.sparsity.sparsifier import _placed_like  # pylint: disable=protected-access
from sparsejax.sparsity.sparsifier import apply_masks

Masks = dict[str, jax.Array]


def initial_masks(params: Any, *, include: Sequence[str] = (),
                  exclude: Sequence[str] = ()) -> Masks:
  """All-True masks of the tensors the sparsity filter selects (kernels with ndim ≥ 2
  except embeddings, LM head and norms, with regex overrides; see `param_filter`),
  each placed with its param's sharding. `params` may be abstract
  (`jax.ShapeDtypeStruct`s, with or without shardings)."""
  chosen = param_filter.select(params, include=include, exclude=exclude)
  leaves = dict(param_filter.named_leaves(params))
  out = {}
  for name, shape in chosen.items():
    sharding = getattr(param_filter.unboxed(leaves[name]), "sharding", None)
    ones = np.ones(shape, np.bool_)
    out[name] = jax.device_put(ones, sharding) if sharding is not None else jnp.asarray(ones)
  return out


def kept_count(masks: Masks) -> int:
  """K: the number of True entries over all masks."""
  return sum(int(jnp.sum(m, dtype=jnp.int32)) for m in masks.values())


def total_count(masks: Masks) -> int:
  """N: the number of entries of all masked tensors."""
  return sum(int(m.size) for m in masks.values())


def round_counts(total: int, rounds: int, fraction: float = 0.2) -> list[int]:
  """[K_0 = total, K_1, ..., K_rounds] with K_{r+1} = round((1 − fraction) · K_r)."""
  _check_fraction(fraction)
  counts = [int(total)]
  for _ in range(rounds):
    counts.append(int(round((1.0 - fraction) * counts[-1])))
  return counts


def _check_fraction(fraction: float) -> None:
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction={fraction} must be in [0, 1) (the share of the kept "
                     "weights pruned per round)")


def prune_round(params: Any, masks: Masks, fraction: float = 0.2) -> Masks:
  """One IMP round: new masks keeping the round((1 − fraction)·K) largest |w| among the
  K currently kept entries, by one global threshold (ties keep the lower tensor, then
  the lower flat index, in the order of `masks`). The new masks are nested in the old
  ones and placed like them.

  params: the trained weights (a pytree holding every name of `masks`, same shapes).
  """
  _check_fraction(fraction)
  leaves = {name: param_filter.unboxed(leaf)
            for name, leaf in param_filter.named_leaves(params)}
  missing = [name for name in masks if name not in leaves]
  if missing:
    raise ValueError(f"prune_round: params lack the masked tensors {missing}")
  names = list(masks)
  for name in names:
    if leaves[name].shape != masks[name].shape:
      raise ValueError(f"prune_round: {name} has shape {leaves[name].shape}, its mask "
                       f"{masks[name].shape}")
  # pruned entries score −1 < every |w|, so they are never chosen again
  scores = [jnp.where(masks[n], jnp.abs(leaves[n]).astype(jnp.float32), -1.0)
            for n in names]
  keep = round_counts(kept_count(masks), 1, fraction)[1]
  new = global_topk_mask(scores, keep / total_count(masks))
  return {n: _placed_like(m, masks[n]) for n, m in zip(names, new)}


def rewind(snapshot: Any, masks: Masks) -> Any:
  """The ticket's starting weights: the snapshot θ_k (θ_0 for the original LTH) with
  the pruned entries set to 0."""
  return apply_masks(snapshot, masks)


def reinit(init_fn: Callable[[jax.Array], Any], key: jax.Array, masks: Masks) -> Any:
  """The random-reinitialization control: fresh weights init_fn(key) with the ticket's
  masks (same kept positions, new values)."""
  return apply_masks(init_fn(key), masks)


def densities(masks: Masks) -> dict[str, float]:
  """{name: kept fraction} per tensor, plus "total": K / N."""
  out = {n: float(jnp.mean(m)) for n, m in masks.items()}
  out["total"] = kept_count(masks) / total_count(masks)
  return out
