"""`Sparsifier`: training-time sparsity as an optax wrapper (the API of jaxpruner,
rebuilt for sharded params).

    sparsifier = Sparsifier(SparsityConfig(algorithm="rigl", sparsity=0.9,
                                           distribution="erk"), num_steps=10_000)
    tx = sparsifier.wrap_optax(optax.adamw(1e-3))
    opt_state = tx.init(params)
    params = apply_masks(params, sparsifier.masks(opt_state))    # start sparse (needed)
    ...
    def loss_fn(params):                      # forward on the masked weights
      return loss(sparsifier.pre_forward(params, opt_state), batch)
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

State (`SparsifierState`): the step, one bool mask per selected parameter (a dict keyed
by the parameter's path name, each mask sharded like its parameter — under
`nn.LogicallyPartitioned` params the masks are boxed with the same logical names), the
inner optimizer's state, and the number of mask entries flipped at the last update.

One `update(grads, state, params)`:
  1. the gradients of masked params are multiplied by their masks (dense for "ste"), so
     the inner optimizer's moments stay 0 at pruned entries;
  2. the inner transformation runs; w' = w + u (for "l1", the proximal step
     w' = sign(w')·max(|w'| − λ·η_t, 0));
  3. at a mask-update step of the algorithm (one `lax.cond`, so steps between updates
     skip it), the new masks are computed from w', the dense gradients (RigL, SNIP)
     and the step; entries grown by the update (new ∧ ¬old) get their params-shaped
     inner state (Adam's μ and ν) reset to 0, and the flipped entries are counted;
  4. the returned updates make every entry outside the new mask exactly 0 (u = −w),
     grown entries included (they start at 0); "ste" keeps its dense weights.

So for every algorithm but STE the params hold exact zeros at pruned entries at every
step (provided they start masked: `apply_masks` above), and the forward pass runs on
them directly: `pre_forward(params, state)` returns `params` unchanged, whose gradient
is the dense gradient w.r.t. the effective weights that RigL grows by. For STE it is
w + stop_gradient(w ⊙ m − w), the masked weights with a straight-through gradient to
the dense ones. Per step, a non-STE run thus adds to the dense step one select on the
gradients (step 1) and one on the updates (step 4), both elementwise and fused by XLA
into the optimizer's own elementwise work, plus the mask update every Δt steps.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from sparsejax.sparsity import algorithms as alg
from sparsejax.sparsity.config import SparsityConfig
from sparsejax.sparsity.distributions import erk_densities, uniform_densities
from sparsejax.sparsity.param_filter import (is_box, matrix_shape, named_leaves,
                                             select, unboxed)
from sparsejax.sparsity.schedules import polynomial_sparsity
from sparsejax.validation import ConfigError, check


class SparsifierState(NamedTuple):
  step: jax.Array                  # int32: updates taken
  masks: dict[str, jax.Array]      # path name -> bool mask (True = kept)
  inner_state: Any
  changes: jax.Array               # int32: entries flipped at the last mask update


def _map_named(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """fn(name, leaf) on every leaf (boxes are leaves), same structure."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_box)
  names = [name for name, _ in named_leaves(tree)]
  return jax.tree.unflatten(treedef, [fn(n, x) for n, x in zip(names, leaves)])


def _on_value(fn: Callable[[jax.Array], jax.Array], leaf: Any) -> Any:
  """fn on a leaf's array, re-boxed with the same metadata when the leaf is a box."""
  return leaf.replace_boxed(fn(leaf.unbox())) if is_box(leaf) else fn(leaf)


def _placed_like(x: jax.Array, like: Any) -> jax.Array:
  """x with the sharding of `like` when that is a concrete array (eager use; inside
  jit the caller's out_shardings place the state)."""
  if isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer):
    return jax.device_put(x, like.sharding)
  return x


def apply_masks(params: Any, masks: dict[str, jax.Array]) -> Any:
  """params with every masked entry set to exactly 0 (names absent from `masks` are
  kept as they are; boxed params stay boxed)."""
  def one(name, leaf):
    if name not in masks:
      return leaf
    m = unboxed(masks[name])
    return _on_value(lambda w: jnp.where(m, w, jnp.zeros((), w.dtype)), leaf)
  return _map_named(one, params)


def find_state(opt_state: Any) -> SparsifierState:
  """The `SparsifierState` in an optimizer state (itself, or nested in a chain)."""
  if isinstance(opt_state, SparsifierState):
    return opt_state
  found = [x for x in jax.tree.leaves(opt_state,
                                      is_leaf=lambda x: isinstance(x, SparsifierState))
           if isinstance(x, SparsifierState)]
  if len(found) != 1:
    raise ValueError(f"expected one SparsifierState in the optimizer state, found "
                     f"{len(found)}")
  return found[0]


@dataclasses.dataclass(frozen=True)
class Sparsifier:
  """Training-time sparsity for a run of `num_steps` updates (module docstring).

  Attributes:
    config: the algorithm and its settings (`SparsityConfig`, validated on creation).
    num_steps: training length (RigL's T_end defaults to 75% of it).
    learning_rate: η_t for the L1 proximal threshold λ·η_t, a float or an optax
      schedule of the step.
  """
  config: SparsityConfig
  num_steps: int
  learning_rate: float | Callable[[jax.Array], jax.Array] = 1.0

  def __post_init__(self):
    self.config.validate()
    check(self.num_steps >= 1, "num_steps", self.num_steps, ">= 1")
    check(self.config.enabled, "config.sparsity.algorithm", self.config.algorithm,
          "an algorithm, not 'none', to build a Sparsifier")

  @property
  def algorithm(self) -> alg.Pruning:
    return alg.ALGORITHMS[self.config.algorithm]

  @property
  def granularity(self) -> alg.Granularity:
    c = self.config
    return alg.Granularity(c.granularity, c.n, c.m, tuple(c.block), c.channel_axis)

  @property
  def end(self) -> int:
    return self.config.resolved_end(self.num_steps)

  # --- what is masked, at which density ------------------------------------------

  def select(self, params: Any) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the masked parameters (`param_filter.select`), with the
    granularity checked against every shape."""
    shapes = select(params, include=self.config.include, exclude=self.config.exclude)
    for name, shape in shapes.items():
      self._check_granularity(name, shape)
    return shapes

  def _check_granularity(self, name: str, shape: tuple[int, ...]) -> None:
    c = self.config
    _, fan_in, fan_out = matrix_shape(name, shape)
    if c.granularity == "nm":
      check(fan_in % c.m == 0, "config.sparsity.m", c.m,
            f"a divisor of fan_in={fan_in} of {name} {shape}")
    elif c.granularity == "block":
      check(fan_in % c.block[0] == 0 and fan_out % c.block[1] == 0,
            "config.sparsity.block", tuple(c.block),
            f"(bh, bw) dividing [fan_in, fan_out]=[{fan_in}, {fan_out}] of {name} "
            f"{shape} (exclude it with config.sparsity.exclude)")
    elif c.granularity == "channel":
      check(-len(shape) <= c.channel_axis < len(shape), "config.sparsity.channel_axis",
            c.channel_axis, f"an axis of {name} {shape}")

  def densities(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Final density of each masked tensor: n/m for N:M, else by the distribution
    (uniform or ERK; `dense` regexes kept dense within the budget)."""
    c = self.config
    if c.granularity == "nm":
      return {name: c.n / c.m for name in shapes}
    if c.distribution == "uniform" or c.algorithm in ("global_magnitude", "l1"):
      out = uniform_densities(shapes, c.sparsity)
      dense = [n for n in shapes if self._is_dense(n)]
      return {n: 1.0 if n in dense else d for n, d in out.items()}
    try:
      return erk_densities(shapes, c.sparsity, power_scale=c.erk_power_scale,
                           dense=[n for n in shapes if self._is_dense(n)])
    except ValueError as e:
      raise ConfigError(f"config.sparsity.dense={c.dense!r} is invalid: {e}") from None

  def _is_dense(self, name: str) -> bool:
    return any(re.search(p, name) for p in self.config.dense)

  def _prune_progress(self, step):
    """Fraction of the final sparsity reached at `step` (pruning algorithms)."""
    c = self.config
    if c.schedule == "one_shot":
      return (jnp.asarray(step) >= c.begin_step).astype(jnp.float32)
    return polynomial_sparsity(step, final=1.0, begin=c.begin_step, end=self.end,
                               every=c.update_every)

  def _step_densities(self, step, final: list[float]) -> list[Any]:
    if self.algorithm.starts_sparse:
      return final
    progress = self._prune_progress(step)
    if self.config.algorithm == "global_magnitude":
      return [1.0 - self.config.sparsity * progress]
    return [1.0 - (1.0 - d) * progress for d in final]

  def _is_update_step(self, step: jax.Array) -> jax.Array:
    c, a = self.config, self.algorithm
    if a.every_step:
      return jnp.asarray(True)
    if a.name == "static":
      return jnp.asarray(False)
    since = step - c.begin_step
    if a.starts_sparse:   # set, rigl
      return (step > 0) & (since >= 0) & (step < self.end) & (since % c.update_every == 0)
    if c.schedule == "one_shot":
      return step == c.begin_step
    return (since >= 0) & (step <= self.end) & (
        (since % c.update_every == 0) | (step == self.end))

  # --- the optax transformation ---------------------------------------------------

  def init_masks(self, params: Any) -> dict[str, Any]:
    """Initial masks: all True for pruning algorithms and L1; the step-0 masks of the
    dense weights' |w| for STE; random masks at the target densities (the
    granularity's) for static, SET and RigL."""
    shapes = self.select(params)
    final = self.densities(shapes)
    start = dict(zip(shapes, self._step_densities(0, list(final.values()))))
    key = jax.random.fold_in(jax.random.key(self.config.seed), 0)
    masks = {}
    for i, (name, leaf) in enumerate((n, x) for n, x in named_leaves(params)
                                     if n in shapes):
      def make(w, i=i, name=name):
        if self.algorithm.dense_weights:
          return self.granularity.mask(name, jnp.abs(w).astype(jnp.float32), start[name])
        if not self.algorithm.starts_sparse:
          return jnp.ones(w.shape, jnp.bool_)
        noise = jax.random.uniform(jax.random.fold_in(key, i), w.shape)
        return self.granularity.mask(name, noise, final[name])
      masks[name] = _on_value(lambda w, make=make: _placed_like(make(w), w), leaf)
    return masks

  def wrap_optax(self, inner: optax.GradientTransformation
                 ) -> optax.GradientTransformationExtraArgs:
    """`inner` with the masks, schedule and algorithm of this Sparsifier (module
    docstring); the state is a `SparsifierState`. `update` needs `params`."""
    inner = optax.with_extra_args_support(inner)

    def init(params):
      return SparsifierState(step=jnp.zeros((), jnp.int32), masks=self.init_masks(params),
                             inner_state=inner.init(params),
                             changes=jnp.zeros((), jnp.int32))

    def update(grads, state, params=None, **extra_args):
      if params is None:
        raise ValueError("Sparsifier.wrap_optax: update() needs params")
      return self._update(inner, grads, state, params, extra_args)

    return optax.GradientTransformationExtraArgs(init, update)

  def _update(self, inner, grads, state: SparsifierState, params, extra_args):
    a, step = self.algorithm, state.step
    names = [n for n, _ in named_leaves(params) if n in state.masks]
    old = [state.masks[n] for n in names]
    mask_of = dict(zip(names, old))
    g = dict((n, x) for n, x in named_leaves(grads) if n in mask_of)   # dense
    if not a.dense_weights:
      grads = _map_named(lambda n, x: jnp.where(mask_of[n], x, jnp.zeros((), x.dtype))
                         if n in mask_of else x, grads)
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    w = dict((n, x) for n, x in named_leaves(params) if n in mask_of)
    u = dict((n, x) for n, x in named_leaves(updates) if n in mask_of)
    new_w = [w[n] + u[n].astype(w[n].dtype) for n in names]
    if a.name == "l1":
      lr = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
      new_w = [alg.soft_threshold(x, self.config.l1_strength * lr) for x in new_w]
    final = self.densities({n: tuple(w[n].shape) for n in names})
    s = alg.Step(step=step, names=names, weights=new_w, masks=old,
                 grads=[g[n] for n in names],
                 densities=self._step_densities(step, [final[n] for n in names]),
                 key=jax.random.fold_in(jax.random.key(self.config.seed), step + 1),
                 granularity=self.granularity, drop_fraction=self.config.drop_fraction,
                 end=self.end)

    def mask_update(inner_state):   # the masks, the inner state and the flips count
      new = [jnp.asarray(m, jnp.bool_) for m in a.update_masks(s)]
      if a.starts_sparse:
        grown = {n: n_ & ~o for n, n_, o in zip(names, new, old)}
        inner_state = _reset_grown(inner, inner_state, params, grown)
      return new, inner_state, sum((jnp.sum(n_ != o, dtype=jnp.int32)
                                    for n_, o in zip(new, old)), jnp.zeros((), jnp.int32))
    new, inner_state, changes = lax.cond(
        self._is_update_step(step), mask_update,
        lambda inner_state: (list(old), inner_state, state.changes), inner_state)
    out = {}
    for n, x, nm, om in zip(names, new_w, new, old):
      if a.dense_weights:
        out[n] = u[n]
      else:
        keep = nm if a.name == "l1" else nm & om
        out[n] = jnp.where(keep, (x - w[n]).astype(u[n].dtype), -w[n].astype(u[n].dtype))
    updates = _map_named(lambda n, x: out.get(n, x), updates)
    return updates, SparsifierState(step=optax.safe_increment(step),
                                    masks=dict(zip(names, new)), inner_state=inner_state,
                                    changes=changes)

  # --- helpers for the training loop ----------------------------------------------

  def masks(self, opt_state: Any) -> dict[str, jax.Array]:
    """{param path name: bool mask} held in an optimizer (or TrainState.opt_state)."""
    return find_state(opt_state).masks

  def with_masks(self, opt_state: Any, masks: dict[str, jax.Array]) -> Any:
    """`opt_state` with its masks replaced by `masks` (same names and shapes), e.g. a
    lottery ticket's masks for a `static` run. Apply them to the params too
    (`apply_masks`): the forward pass of every algorithm but STE uses the params as
    they are (`pre_forward`). Works on a SparsifierState or an optimizer state holding
    one."""
    old = self.masks(opt_state)
    if set(masks) != set(old) or any(jnp.shape(masks[n]) != jnp.shape(old[n]) for n in old):
      raise ValueError(f"with_masks: masks must have the names and shapes of the "
                       f"current ones ({sorted(old)})")
    new = {n: jnp.asarray(masks[n], jnp.bool_) for n in old}
    return jax.tree.map(lambda x: find_state(x)._replace(masks=new)
                        if isinstance(x, SparsifierState) else x, opt_state,
                        is_leaf=lambda x: isinstance(x, SparsifierState))

  def pre_forward(self, params: Any, opt_state: Any) -> Any:
    """The weights the forward pass uses, w ⊙ m, with the dense gradient w.r.t. them.

    STE keeps dense weights: w + stop_gradient(w ⊙ m − w), exactly w at kept and 0 at
    pruned entries, with a straight-through (identity) gradient to w. Every other
    algorithm holds exact zeros at its pruned entries (the params start masked with
    `apply_masks`, and each update sets dropped entries to 0 and starts grown ones at
    0), so w ⊙ m == w and `params` is returned as it is: no per-step masking, and the
    gradient w.r.t. w is the dense one at the effective weights that RigL grows by."""
    if not self.algorithm.dense_weights:
      return params
    masks = self.masks(opt_state)

    def one(name, w):
      if name not in masks:
        return w
      return w + lax.stop_gradient(jnp.where(masks[name], w, jnp.zeros((), w.dtype)) - w)
    return _map_named(one, params)

  def metrics(self, opt_state: Any) -> dict[str, jax.Array]:
    """Scalars for metrics.jsonl: "sparsity/density" (kept / size over all masked
    tensors), "sparsity/density/<name>" per tensor, "sparsity/pruned" (entries), and
    "sparsity/mask_changes" (entries flipped at the last mask update)."""
    state = find_state(opt_state)
    out, kept, size = {}, 0.0, 0
    for name, m in state.masks.items():
      k = jnp.sum(m, dtype=jnp.float32)
      out[f"sparsity/density/{name}"] = k / m.size
      kept, size = kept + k, size + m.size
    out["sparsity/density"] = kept / size
    out["sparsity/pruned"] = size - kept
    out["sparsity/mask_changes"] = state.changes.astype(jnp.float32)
    return out


def _reset_grown(inner, inner_state: Any, params: Any, grown: dict[str, jax.Array]):
  """Zeroes the params-shaped leaves of the inner state (Adam's μ, ν) at grown
  entries."""
  flags = _map_named(lambda n, _: grown.get(n, jnp.zeros((), jnp.bool_)), params)
  reset = lambda s, f: jnp.where(f, jnp.zeros((), s.dtype), s) if hasattr(s, "dtype") \
      else s
  return optax.tree_utils.tree_map_params(inner, reset, inner_state, flags)
