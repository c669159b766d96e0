"""Optimizer: warmup+cosine schedule, decay mask, per-group LR multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.train.optim import OptimConfig, lr_schedule, make_optimizer, scale_by_group


def test_schedule_warmup_peak_and_cosine_end():
  cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
  sched = lr_schedule(cfg, 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(sched(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5, rtol=1e-5)   # cosine midpoint
  np.testing.assert_allclose(sched(110), 0.1, rtol=1e-5)


def _params(seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"block": {"values": jax.random.normal(k1, (4, 3)),
                    "proj": jax.random.normal(k2, (3, 3))},
          "norm": jax.random.normal(k3, (3,))}


def test_group_multiplier_scales_exactly_that_groups_update(rng_seed):
  params = _params(rng_seed)
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.1, params)
  cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0)
  base_tx, _ = make_optimizer(cfg, 10)
  group_tx, _ = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0,
                                           lr_multipliers={"values$": 4.0}), 10)
  base, _ = base_tx.update(grads, base_tx.init(params), params)
  group, _ = group_tx.update(grads, group_tx.init(params), params)
  np.testing.assert_allclose(group["block"]["values"], 4 * base["block"]["values"],
                             rtol=1e-6)
  np.testing.assert_allclose(group["block"]["proj"], base["block"]["proj"], rtol=1e-6)


def test_schedule_multiplier_follows_the_step_count(rng_seed):
  params = _params(rng_seed)
  tx = scale_by_group({"values": lambda step: 4.0 - step})
  state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  for expected in (4.0, 3.0, 2.0):
    out, state = tx.update(ones, state)
    np.testing.assert_allclose(out["block"]["values"], expected)
    np.testing.assert_allclose(out["norm"], 1.0)


def test_weight_decay_skips_vectors(rng_seed):
  params = _params(rng_seed)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx, _ = make_optimizer(OptimConfig(learning_rate=1.0, warmup_steps=0,
                                     weight_decay=0.5, grad_clip_norm=0.0), 10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["norm"], 0.0)
  np.testing.assert_allclose(updates["block"]["proj"], -0.5 * params["block"]["proj"],
                             rtol=1e-5)


def test_clipping_bounds_the_global_norm(rng_seed):
  params = _params(rng_seed)
  huge = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params)
  clip = optax.clip_by_global_norm(1.0)
  out, _ = clip.update(huge, clip.init(params))
  assert float(optax.tree.norm(out)) == pytest.approx(1.0, rel=1e-5)


def test_sgd_is_momentum_sgd_with_l2_on_matrices(rng_seed):
  """name="sgd": v ← b1·v + g + λ·w (λ on matrices only), update = −lr·v."""
  params = _params(rng_seed)
  lr, b1, wd = 0.1, 0.9, 0.01
  tx, _ = make_optimizer(OptimConfig(name="sgd", learning_rate=lr, warmup_steps=0,
                                     min_lr_ratio=1.0, b1=b1, weight_decay=wd,
                                     grad_clip_norm=0.0), 10)
  state = tx.init(params)
  velocity = jax.tree.map(jnp.zeros_like, params)
  for step in range(3):
    grads = jax.tree.map(lambda p: jnp.sin(p * (step + 1)), params)
    updates, state = tx.update(grads, state, params)
    velocity = jax.tree.map(
        lambda v, g, p: b1 * v + g + (wd * p if p.ndim >= 2 else 0.0),
        velocity, grads, params)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, -lr * v, rtol=1e-5,
                                                         atol=1e-7), updates, velocity)
    params = optax.apply_updates(params, updates)


def test_unknown_optimizer_name_is_refused_by_field():
  with pytest.raises(ValueError, match=r"config\.optim\.name"):
    OptimConfig(name="adam").validate()
