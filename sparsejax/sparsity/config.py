"""`config.sparsity`: the training-time sparsity section of a run's config.

A frozen dataclass validated like every other section (errors name
`config.sparsity.<field>` and the allowed values). `algorithm="none"` (the default)
turns sparsity off: the optimizer, the forward pass and the checkpoints are those of a
dense run.
"""

from __future__ import annotations

import dataclasses

from sparsejax.sparsity.algorithms import ALGORITHMS, PRUNING, UNSTRUCTURED_ONLY
from sparsejax.validation import check, check_choice

DISTRIBUTIONS = ("uniform", "erk")
GRANULARITIES = ("unstructured", "nm", "block", "channel")
SCHEDULES = ("one_shot", "polynomial")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
  algorithm: str = "none"         # none | magnitude | random | snip | global_magnitude |
                                  # ste | static | set | rigl | l1
  sparsity: float = 0.0           # target fraction of zeros of the masked tensors, [0, 1)
  distribution: str = "uniform"   # uniform | erk (per-tensor densities)
  erk_power_scale: float = 1.0    # ERK exponent (< 1: closer to uniform)
  dense: tuple[str, ...] = ()     # regexes of masked tensors kept dense (ERK budget)
  granularity: str = "unstructured"  # unstructured | nm | block | channel
  n: int = 2                      # N:M: keep n of every m along fan_in
  m: int = 4
  block: tuple[int, ...] = (4, 4)  # (bh, bw) tiles of each kernel's [fan_in, fan_out]
  channel_axis: int = -1          # channel granularity: the axis of whole slices
  schedule: str = "one_shot"      # pruning algorithms: one_shot (at begin_step) |
                                  # polynomial (Zhu & Gupta, begin_step..end_step)
  begin_step: int = 0
  end_step: int = 0               # 0: 75% of config.train.num_steps
  update_every: int = 100         # Δt between mask updates (polynomial, set, rigl)
  drop_fraction: float = 0.3      # set: ζ; rigl: α of the cosine decay
  l1_strength: float = 0.0        # l1: λ (the prox threshold is λ·learning rate)
  include: tuple[str, ...] = ()   # regexes: also mask these params
  exclude: tuple[str, ...] = ()   # regexes: leave these params dense
  seed: int = 0                   # random masks (random, static, set)

  @property
  def enabled(self) -> bool:
    return self.algorithm != "none"

  def resolved_end(self, num_steps: int) -> int:
    """end_step, or 75% of training when 0 (RigL's T_end)."""
    return self.end_step or max(1, int(0.75 * num_steps))

  def validate(self, prefix: str = "config.sparsity") -> None:
    check_choice(f"{prefix}.algorithm", self.algorithm, ["none", *ALGORITHMS])
    check_choice(f"{prefix}.distribution", self.distribution, DISTRIBUTIONS)
    check_choice(f"{prefix}.granularity", self.granularity, GRANULARITIES)
    check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
    check(0 <= self.sparsity < 1, f"{prefix}.sparsity", self.sparsity, "in [0, 1)")
    check(self.erk_power_scale >= 0, f"{prefix}.erk_power_scale", self.erk_power_scale,
          ">= 0")
    check(self.m >= 1, f"{prefix}.m", self.m, ">= 1")
    check(0 <= self.n <= self.m, f"{prefix}.n", self.n, f"in [0, m={self.m}]")
    check(len(self.block) == 2 and min(self.block) >= 1, f"{prefix}.block", self.block,
          "two positive ints (bh, bw)")
    check(self.begin_step >= 0, f"{prefix}.begin_step", self.begin_step, ">= 0")
    check(self.end_step >= 0, f"{prefix}.end_step", self.end_step, ">= 0 (0 = 75% of "
          "training)")
    check(self.end_step == 0 or self.end_step > self.begin_step, f"{prefix}.end_step",
          self.end_step, f"> begin_step={self.begin_step} (or 0)")
    check(self.update_every >= 1, f"{prefix}.update_every", self.update_every, ">= 1")
    check(0 <= self.drop_fraction <= 1, f"{prefix}.drop_fraction", self.drop_fraction,
          "in [0, 1]")
    check(self.l1_strength >= 0, f"{prefix}.l1_strength", self.l1_strength, ">= 0")
    if not self.enabled:
      return
    check(self.granularity == "unstructured" or self.algorithm not in UNSTRUCTURED_ONLY,
          f"{prefix}.granularity", self.granularity,
          f"'unstructured' for algorithm={self.algorithm!r}")
    if self.granularity == "nm":
      check(abs(self.sparsity - (1 - self.n / self.m)) < 1e-9, f"{prefix}.sparsity",
            self.sparsity, f"1 - n/m = {1 - self.n / self.m:g} with granularity='nm'")
      check(self.schedule == "one_shot" or self.algorithm not in PRUNING,
            f"{prefix}.schedule", self.schedule, "'one_shot' with granularity='nm'")
    check(not self.dense or self.algorithm not in ("global_magnitude", "l1"),
          f"{prefix}.dense", self.dense, f"empty for algorithm={self.algorithm!r} (one "
          "threshold for all tensors: leave tensors out with exclude)")
    check(self.algorithm == "l1" or self.sparsity > 0, f"{prefix}.sparsity",
          self.sparsity, f"> 0 for algorithm={self.algorithm!r}")
    check(self.algorithm != "l1" or self.l1_strength > 0, f"{prefix}.l1_strength",
          self.l1_strength, "> 0 for algorithm='l1'")
