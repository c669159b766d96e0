"""Schedules of the training-time sparsity algorithms, as functions of the step.

Each returns a Python float for a concrete step and a float32 scalar for a traced one
(inside `jit`), so the same function drives Python loops and compiled train steps.

Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", Eq. 1):

    s_t = s_f + (s_i − s_f)·(1 − p)^power,   p = clip((t − t_0)/(t_1 − t_0), 0, 1),

with t quantized down to the last update step t_0 + k·Δt (`every`): s_i before t_0,
s_f from t_1 on, cubic (power 3) in between.

RigL drop fraction (Evci et al. 2020, Eq. 1 — cosine annealing):

    f(t) = α/2 · (1 + cos(π t / T_end))  for t < T_end,   0 afterwards.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsejax.sparsity.masks import check_fraction, static_int


def _result(value: jax.Array):
  return value if isinstance(value, jax.core.Tracer) else float(value)


def polynomial_sparsity(step, *, final, begin: int, end: int, initial=0.0, power=3,
                        every: int = 1):
  """Sparsity at `step` of the Zhu & Gupta polynomial schedule (module docstring).

  Args:
    step: the training step (int, or a traced integer scalar).
    final, initial: sparsity from `end` on and before `begin`, each in [0, 1].
    begin, end: first and last pruning steps, 0 <= begin < end.
    power: exponent of (1 − p), > 0 (3 in the paper).
    every: Δt, steps between mask updates (the value changes only at begin + k·every).

  Returns:
    float (float32 scalar when `step` is traced).
  """
  final = check_fraction(final, "final")
  initial = check_fraction(initial, "initial")
  begin, end = static_int(begin, "begin"), static_int(end, "end")
  every = static_int(every, "every")
  if not 0 <= begin < end:
    raise ValueError(f"begin={begin}, end={end}: need 0 <= begin < end")
  if every < 1:
    raise ValueError(f"every={every} must be >= 1")
  if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
    raise ValueError(f"power={power!r} must be a number > 0")
  t = jnp.clip(jnp.asarray(step, jnp.int32), begin, end)
  t = jnp.where(t == end, end, begin + (t - begin) // every * every)
  p = (t - begin).astype(jnp.float32) / (end - begin)
  return _result(final + (initial - final) * (1.0 - p) ** power)


def cosine_drop_fraction(step, *, end: int, initial=0.3):
  """RigL's drop fraction at `step`: α/2·(1 + cos(π·step/end)) before `end`, 0 after.

  Args:
    step: the training step (int, or a traced integer scalar).
    end: T_end, the last mask-update step (75% of training in the paper), > 0.
    initial: α, the drop fraction at step 0, in [0, 1] (0.3 in the paper).
  """
  end = static_int(end, "end")
  if end < 1:
    raise ValueError(f"end={end} must be >= 1")
  alpha = check_fraction(initial, "initial")
  t = jnp.asarray(step, jnp.float32)
  value = jnp.where(t < end, alpha / 2 * (1 + jnp.cos(math.pi * t / end)), 0.0)
  return _result(value)
