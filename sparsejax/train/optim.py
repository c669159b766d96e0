"""The optimizer: AdamW (or SGD with momentum) with warmup + cosine decay, global-norm
clipping, and per-parameter-group learning-rate multipliers.

`name="sgd"` is momentum SGD (momentum = `b1`, 0 for none; `b2`/`eps` unused) with
coupled L2 weight decay (`weight_decay · w` added to the gradient of the matrices), the
optimizer of the DGC paper's experiments (Lin et al. 2018).

Groups are regexes on the "/"-joined parameter path (e.g. "block_\\d+/memory/values");
the first matching group's multiplier scales that parameter's whole update (Adam step
and decoupled weight decay alike, as a per-group LR does). A multiplier may be a float or
a schedule `step -> float` (UltraMem's value-LR 4 → 1 decay uses one).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.core
import jax
import jax.numpy as jnp
import optax

from sparsejax.validation import check

Multiplier = float | Callable[[jax.Array], jax.Array]
OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"                # "adamw" | "sgd" (momentum SGD, momentum = b1)
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1          # final LR of the cosine decay / peak LR
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1          # decoupled; not applied to vectors (norms, biases)
  grad_clip_norm: float = 1.0        # 0 disables clipping
  lr_multipliers: Mapping[str, float] = flax.core.FrozenDict()  # path regex -> factor

  def validate(self, prefix: str = "config.optim") -> None:
    check(self.name in OPTIMIZERS, f"{prefix}.name", self.name, f"one of {OPTIMIZERS}")
    check(self.learning_rate > 0, f"{prefix}.learning_rate", self.learning_rate, "> 0")
    check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, ">= 0")
    check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", self.min_lr_ratio,
          "in [0, 1]")
    for name in ("b1", "b2"):
      value = getattr(self, name)
      check(0 <= value < 1, f"{prefix}.{name}", value, "in [0, 1)")
    check(self.eps > 0, f"{prefix}.eps", self.eps, "> 0")
    check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, ">= 0")
    check(self.grad_clip_norm >= 0, f"{prefix}.grad_clip_norm", self.grad_clip_norm,
          ">= 0 (0 = off)")
    for pattern, factor in self.lr_multipliers.items():
      field = f"{prefix}.lr_multipliers[{pattern!r}]"
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"{field}: invalid regex ({e})") from None
      check(isinstance(factor, (int, float)) and factor >= 0, field, factor,
            "a number >= 0")


def lr_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to min_lr_ratio · peak."""
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


class ScaleByGroupState(NamedTuple):
  count: jax.Array


def scale_by_group(multipliers: Mapping[str, Multiplier]) -> optax.GradientTransformation:
  """Multiplies each update by the multiplier of the first regex matching its path."""
  compiled = [(re.compile(p), m) for p, m in multipliers.items()]

  def factor_for(path: str) -> Multiplier | None:
    return next((m for pattern, m in compiled if pattern.search(path)), None)

  def init(params):
    del params
    return ScaleByGroupState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params

    def scale(path, u):
      factor = factor_for(param_path(path))
      if factor is None:
        return u
      value = factor(state.count) if callable(factor) else factor
      return u * jnp.asarray(value, u.dtype)

    return (jax.tree_util.tree_map_with_path(scale, updates),
            ScaleByGroupState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformation(init, update)


def decay_mask(params: Any) -> Any:
  """True for matrices (weight decay), False for vectors and scalars (norm gains)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, num_steps: int,
                   extra_multipliers: Mapping[str, Multiplier] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (transformation, lr schedule). `extra_multipliers` add schedule groups."""
  schedule = lr_schedule(cfg, num_steps)
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.name == "sgd":
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=cfg.b1 or None))
  else:
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
  multipliers = {**cfg.lr_multipliers, **(extra_multipliers or {})}
  if multipliers:
    parts.append(scale_by_group(multipliers))
  return optax.chain(*parts), schedule
