"""Training-time sparsity algorithms: when masks change and how (jaxpruner-style).

Each algorithm is a small object with `scores` (what a mask keeps the largest of) and
`update_masks` (the new masks at an update step), driven by `Sparsifier`
(`sparsejax.sparsity.sparsifier`), which owns the optimizer wrapping. All work on lists
of arrays (the masked tensors, in tree order) and keep their shardings: every selection
is a bisection with sums (`sparsejax.sparsity.masks`), never a sort or a gather.

  magnitude         |w| (Zhu & Gupta 2017 when gradual);
  random            uniform noise, seeded by fold_in(seed, step);
  snip              saliency |w·g| (Lee et al. 2019, "SNIP");
  global_magnitude  |w| with one threshold across all masked tensors (Han et al. 2015;
                    Frankle & Carbin 2019), found by bisection on the threshold with
                    cross-tensor (and cross-device) counts;
  ste               |w| of the dense weights, recomputed every step; the forward uses
                    w ⊙ m with a straight-through gradient to w (Zhou et al. 2021);
  static            a fixed random mask from the start (the static baseline of RigL);
  set               SET (Mocanu et al. 2018): drop smallest |w|, grow at random;
  rigl              RigL (Evci et al. 2020): drop smallest |w|, grow largest |grad|,
                    drop fraction α/2·(1 + cos(π t / T_end));
  l1                L1 with the proximal step (soft threshold λ·η_t after each update,
                    exact zeros; the mask records the nonzeros).

Pruning algorithms (magnitude, random, snip, global_magnitude) only remove weights: a
pruned entry scores −1, below every kept one, so masks shrink monotonically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity.dst import rigl_update, set_update
from sparsejax.sparsity.masks import (block_mask, channel_mask, keep_top_k, nm_mask,
                                      topk_mask)
from sparsejax.sparsity.param_filter import matrix_shape
from sparsejax.sparsity.schedules import cosine_drop_fraction


@dataclasses.dataclass(frozen=True)
class Granularity:
  """What a mask keeps whole: "unstructured", "nm" (n of every m along fan_in),
  "block" ((bh, bw) tiles of the [fan_in, fan_out] view) or "channel" (whole slices
  along `channel_axis` of the tensor)."""
  kind: str = "unstructured"
  n: int = 2
  m: int = 4
  block: tuple[int, int] = (4, 4)
  channel_axis: int = -1

  def mask(self, name: str, scores: jax.Array, density) -> jax.Array:
    """bool mask of `scores`' shape at `density` (ignored by "nm": n/m)."""
    if self.kind == "unstructured":
      return topk_mask(scores, density)
    if self.kind == "channel":
      return channel_mask(scores, density, axis=self.channel_axis)
    view = scores.reshape(matrix_shape(name, scores.shape))
    if self.kind == "nm":
      kept = nm_mask(view, self.n, self.m, axis=1)
    else:
      kept = block_mask(view, density, (1, *self.block))
    return kept.reshape(scores.shape)


def global_topk_mask(scores: Sequence[jax.Array], density) -> list[jax.Array]:
  """Masks keeping the k = round(density·N) largest scores over all N entries of all
  tensors — one threshold for the whole model.

  The k-th largest key t is found by bisection on the float32 order keys of
  `sparsejax.sparsity.masks` with Σ_tensors #{key ≥ t} (per tensor a local count, an
  all-reduce of one integer when sharded); ties at t keep the lower (tensor, flat
  index). N must be < 2^31.
  """
  keys = [masks_lib._order_key(jnp.asarray(s, jnp.float32)) for s in scores]  # pylint: disable=protected-access
  total = sum(int(k.size) for k in keys)
  if total >= 2**31:
    raise ValueError(f"global_topk_mask: {total} entries exceed the int32 count")
  k = masks_lib.keep_count(density, total)
  count = lambda sel: sum(jnp.sum(s, dtype=jnp.int32) for s in sel)
  t = masks_lib._largest_passing(  # pylint: disable=protected-access
      lambda c: count([key >= c for key in keys]) >= k, 32, jnp.uint32)
  above = [key > t for key in keys]
  ties = [key == t for key in keys]
  rest = k - count(above)
  out, before = [], jnp.zeros((), jnp.int32)
  for a, tie in zip(above, ties):
    n_ties = jnp.sum(tie, dtype=jnp.int32)
    take = jnp.clip(rest - before, 0, n_ties)
    out.append(a | keep_top_k(jnp.zeros(tie.shape, jnp.float32), take, valid=tie))
    before = before + n_ties
  return out


@dataclasses.dataclass(frozen=True)
class Step:
  """Everything an algorithm sees at an update: the masked tensors (names, weights
  after the inner optimizer step, current masks, dense gradients), their target
  densities at this step, the step and a PRNG key for it."""
  step: jax.Array
  names: list[str]
  weights: list[jax.Array]
  masks: list[jax.Array]
  grads: list[jax.Array]
  densities: list[Any]
  key: jax.Array
  granularity: Granularity
  drop_fraction: float
  end: int


class Pruning:
  """Prunes to the scheduled density, keeping the largest scores among the kept."""
  name = "magnitude"
  starts_sparse = False
  dense_weights = False
  every_step = False

  def scores(self, w: jax.Array, g: jax.Array, key: jax.Array) -> jax.Array:
    del g, key
    return jnp.abs(w)

  def leaf_scores(self, s: Step) -> list[jax.Array]:
    out = []
    for i, (w, m, g) in enumerate(zip(s.weights, s.masks, s.grads)):
      score = self.scores(w, g, jax.random.fold_in(s.key, i)).astype(jnp.float32)
      out.append(score if self.dense_weights else jnp.where(m, score, -1.0))
    return out

  def update_masks(self, s: Step) -> list[jax.Array]:
    return [s.granularity.mask(name, score, d)
            for name, score, d in zip(s.names, self.leaf_scores(s), s.densities)]


class RandomPruning(Pruning):
  name = "random"

  def scores(self, w, g, key):
    del g
    return jax.random.uniform(key, w.shape)


class SnipPruning(Pruning):
  name = "snip"

  def scores(self, w, g, key):
    del key
    return jnp.abs(w * g)


class GlobalMagnitude(Pruning):
  """One density for the whole model (the distribution does not apply): densities[0]
  is the overall kept fraction."""
  name = "global_magnitude"

  def update_masks(self, s: Step) -> list[jax.Array]:
    return global_topk_mask(self.leaf_scores(s), s.densities[0])


class STE(Pruning):
  """Masks of the dense weights' |w| recomputed every step (straight-through forward)."""
  name = "ste"
  dense_weights = True
  every_step = True


class Static(Pruning):
  """A fixed random mask at the target densities; never updated."""
  name = "static"
  starts_sparse = True

  def update_masks(self, s: Step) -> list[jax.Array]:
    return s.masks


class SET(Static):
  name = "set"

  def update_masks(self, s: Step) -> list[jax.Array]:
    return set_update(s.weights, s.masks, drop_fraction=s.drop_fraction, key=s.key)


class RigL(Static):
  name = "rigl"

  def update_masks(self, s: Step) -> list[jax.Array]:
    fraction = cosine_drop_fraction(s.step, end=s.end, initial=s.drop_fraction)
    return rigl_update(s.weights, s.masks, s.grads, drop_fraction=fraction)


class L1(Pruning):
  """Proximal L1: the Sparsifier soft-thresholds the weights every step; the mask is
  where they are nonzero."""
  name = "l1"
  every_step = True

  def update_masks(self, s: Step) -> list[jax.Array]:
    return [w != 0 for w in s.weights]


def soft_threshold(w: jax.Array, threshold) -> jax.Array:
  """prox of threshold·|w|₁: sign(w)·max(|w| − threshold, 0) (exact zeros)."""
  return jnp.sign(w) * jnp.maximum(jnp.abs(w) - jnp.asarray(threshold, w.dtype), 0)


ALGORITHMS = {cls.name: cls() for cls in (Pruning, RandomPruning, SnipPruning,
                                          GlobalMagnitude, STE, Static, SET, RigL, L1)}
PRUNING = ("magnitude", "random", "snip", "global_magnitude", "ste")
UNSTRUCTURED_ONLY = ("global_magnitude", "set", "rigl", "l1")
