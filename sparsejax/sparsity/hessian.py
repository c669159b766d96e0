"""Streamed calibration statistics for post-training pruning (SparseGPT, Wanda).

For a linear layer y = x W with W of shape [in, out], calibration inputs x [..., in]
arrive in batches. Two statistics over all N calibration tokens are accumulated:

  * the layer-wise Hessian of the reconstruction loss ‖XW − XŴ‖² (SparseGPT, Frantar &
    Alistarh 2023, Sec. 3):      H = (2/N) Σ_t x_t x_tᵀ        [in, in]
    kept as a running average, H ← H·N/(N+b) + (2/(N+b)) Σ_{t in batch} x_t x_tᵀ,
    with N the number of tokens seen so far and b the batch's token count;
  * the squared per-input activation norm (Wanda, Sun et al. 2024, Eq. 1):
                                 s_i = ‖X_i‖₂² = Σ_t x_{t,i}²   [in]
    Wanda's score uses ‖X_i‖₂ = sqrt(s_i). (Equivalently s_i = N·H_ii/2.)

N counts tokens (rows of x flattened to [-1, in]); the reference SparseGPT code counts
sequences instead, which scales H by a constant: SparseGPT's masks and updates do not
change under H → cH (the damping is relative to mean(diag H)).

Both accumulators are pure and jit-able; the token selection `where` (e.g. the tokens
routed to one expert, or non-padding tokens) keeps shapes static. Accumulation is in the
dtype of the running statistic (float32; float64 when x64 is enabled), with the outer
product at `Precision.HIGHEST` (TPUs otherwise multiply float32 in bfloat16 passes).

Across devices (calibration tokens split over a data axis, inside `jax.shard_map`):
`s` is a plain sum, so s_total = psum(s); H is an average, so H_total = psum(N_d·H_d) /
psum(N_d) — `psum_hessian` does exactly this.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp


def _tokens(x, in_features: int, where, fn: str):
  """x [..., in] → (x2d [T, in], weights [T] or None)."""
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != in_features:
    raise ValueError(f"{fn}: x of shape {x.shape} must end in the input size "
                     f"{in_features}")
  x2d = x.reshape(-1, in_features)
  if where is None:
    return x2d, None
  where = jnp.asarray(where)
  if where.shape != x.shape[:-1]:
    raise ValueError(f"{fn}: where of shape {where.shape} must be x's shape without its "
                     f"last axis, {x.shape[:-1]}")
  return x2d, where.reshape(-1)


def accumulate_hessian(h: jax.Array, x: jax.Array, count: jax.Array, *,
                       where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Adds one calibration batch to the running Hessian H = (2/N) Σ x xᵀ.

  Args:
    h: [in, in] floating running Hessian (start from zeros, float32 or float64).
    x: [..., in] calibration inputs of the layer (any float dtype; upcast to h's dtype).
    count: int32 scalar, the number of tokens N already in h (start from 0).
    where: optional bool [...] (x's shape without the last axis): only these tokens
      count (e.g. the tokens routed to an expert); None = all.

  Returns:
    (h, count): the updated running Hessian and token count.
  """
  h = jnp.asarray(h)
  if h.ndim != 2 or h.shape[0] != h.shape[1] or not jnp.issubdtype(h.dtype, jnp.floating):
    raise ValueError(f"accumulate_hessian: h must be a square floating [in, in] array, got "
                     f"{h.dtype}{list(h.shape)}")
  x2d, w = _tokens(x, h.shape[0], where, "accumulate_hessian")
  x2d = x2d.astype(h.dtype)
  count = jnp.asarray(count, jnp.int32)
  if w is None:
    batch = jnp.int32(x2d.shape[0])
  else:
    x2d = jnp.where(w[:, None], x2d, 0)
    batch = jnp.sum(w, dtype=jnp.int32)
  total = count + batch
  denom = jnp.maximum(total, 1).astype(h.dtype)
  xtx = jnp.matmul(x2d.T, x2d, precision=lax.Precision.HIGHEST)
  return h * (count.astype(h.dtype) / denom) + (2 / denom) * xtx, total


def psum_hessian(h: jax.Array, count: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
  """Combines per-device running Hessians over `axis_name` (inside `jax.shard_map`):
  H = Σ_d N_d·H_d / Σ_d N_d, N = Σ_d N_d — the Hessian of all devices' tokens."""
  count = jnp.asarray(count, jnp.int32)
  total = lax.psum(count, axis_name)
  weighted = lax.psum(h * count.astype(h.dtype), axis_name)
  return weighted / jnp.maximum(total, 1).astype(h.dtype), total


def accumulate_act_sqnorm(sqnorm: jax.Array, x: jax.Array, *,
                          where: jax.Array | None = None) -> jax.Array:
  """Adds one calibration batch to s_i = ‖X_i‖₂² = Σ_t x_{t,i}² (Wanda's statistic).

  Args:
    sqnorm: [in] floating running sum of squares (start from zeros, float32).
    x: [..., in] calibration inputs (upcast to sqnorm's dtype).
    where: optional bool [...]: only these tokens count; None = all.

  Returns:
    the updated [in] sum of squares; Wanda's act_norm is `jnp.sqrt(sqnorm)`. Across
    devices: `lax.psum(sqnorm, axis_name)`.
  """
  sqnorm = jnp.asarray(sqnorm)
  if sqnorm.ndim != 1 or not jnp.issubdtype(sqnorm.dtype, jnp.floating):
    raise ValueError(f"accumulate_act_sqnorm: sqnorm must be a floating [in] array, got "
                     f"{sqnorm.dtype}{list(sqnorm.shape)}")
  x2d, w = _tokens(x, sqnorm.shape[0], where, "accumulate_act_sqnorm")
  x2d = x2d.astype(sqnorm.dtype)
  if w is not None:
    x2d = jnp.where(w[:, None], x2d, 0)
  return sqnorm + jnp.sum(jnp.square(x2d), axis=0)
