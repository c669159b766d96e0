"""Post-training pruning ops: magnitude / Wanda masks, SparseGPT against a NumPy float64
re-implementation of the reference algorithm, and streamed Hessian accumulation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sparsejax.sparsity.hessian import accumulate_act_sqnorm, accumulate_hessian, psum_hessian
from sparsejax.sparsity.posttrain import magnitude_mask, sparsegpt_prune, wanda_mask


def _reference_sparsegpt(kernel, hessian, sparsity, nm, block_size, damp):
  """SparseGPT (Frantar & Alistarh 2023, Alg. 1) in float64 NumPy on W [out, in]; prunes
  exactly int(sparsity·numel) per block / the m − n smallest per N:M group (stable)."""
  w = np.array(kernel, np.float64).T.copy()
  h = np.array(hessian, np.float64).copy()
  cols = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h += damp * np.mean(np.diag(h)) * np.eye(cols)
  hinv = np.linalg.cholesky(np.linalg.inv(h)).T           # upper, hinvᵀ hinv = H⁻¹
  pruned = np.zeros(w.shape, bool)
  for i1 in range(0, cols, block_size):
    i2 = min(i1 + block_size, cols)
    w1, hinv1 = w[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
    q1, err1 = np.zeros_like(w1), np.zeros_like(w1)
    mask1 = np.zeros(w1.shape, bool)
    if nm is None:
      score = w1 ** 2 / np.diag(hinv1)[None, :] ** 2
      order = np.argsort(score.ravel(), kind="stable")
      mask1.ravel()[order[:int(score.size * sparsity)]] = True
    for i in range(i2 - i1):
      if nm is not None and i % nm[1] == 0:
        n, m = nm
        score = w1[:, i:i + m] ** 2 / np.diag(hinv1)[i:i + m][None, :] ** 2
        smallest = np.argsort(score, axis=1, kind="stable")[:, :m - n]
        np.put_along_axis(mask1[:, i:i + m], smallest, True, axis=1)
      q = np.where(mask1[:, i], 0.0, w1[:, i])
      q1[:, i] = q
      err = (w1[:, i] - q) / hinv1[i, i]
      w1[:, i:] -= np.outer(err, hinv1[i, i:])
      err1[:, i] = err
    w[:, i1:i2] = q1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    pruned[:, i1:i2] = mask1
  return w.T, ~pruned.T


def _calibration(rng, tokens, d, *, correlated=True):
  """Inputs [tokens, d] with correlated features (a random mixing plus noise)."""
  z = rng.normal(size=(tokens, d))
  if correlated:
    z = z @ rng.normal(size=(d, d)) + 0.1 * rng.normal(size=(tokens, d))
  return z


def _hessian(x):
  return 2.0 / x.shape[0] * x.T @ x


def _wanda_reference(kernel, act_norm, sparsity, nm):
  score = np.abs(np.asarray(kernel, np.float64)) * np.asarray(act_norm)[:, None]
  d, out = score.shape
  keep = np.ones(score.shape, bool)
  if nm is None:
    order = np.argsort(score, axis=0, kind="stable")[:int(sparsity * d)]
    np.put_along_axis(keep, order, False, axis=0)
    return keep
  n, m = nm
  g = score.reshape(d // m, m, out)
  order = np.argsort(g, axis=1, kind="stable")[:, :m - n]
  keep = keep.reshape(g.shape)
  np.put_along_axis(keep, order, False, axis=1)
  return keep.reshape(d, out)


@pytest.mark.parametrize("d,out,nm,block_size,sparsity", [
    (48, 24, None, 16, 0.5),       # in divisible by the block
    (50, 20, None, 16, 0.6),       # tail block of 2 columns
    (40, 12, None, 128, 0.3),      # one block (block_size > in)
    (48, 16, (2, 4), 8, 0.5),
    (44, 12, (2, 4), 12, 0.5),     # tail block of 8
    (40, 16, (4, 8), 16, 0.5),     # tail block of 8
    (36, 10, (1, 4), 36, 0.75),
])
@pytest.mark.slow
def test_sparsegpt_matches_reference(rng_seed, d, out, nm, block_size, sparsity):
  rng = np.random.default_rng(rng_seed)
  x = _calibration(rng, 4 * d, d)
  x[:, [3, d - 5]] = 0                                  # two dead inputs
  kernel = rng.normal(size=(d, out))
  h = _hessian(x)
  want_w, want_mask = _reference_sparsegpt(kernel, h, sparsity, nm, block_size, 0.01)
  with jax.enable_x64(True):
    new_kernel, mask = sparsegpt_prune(jnp.asarray(kernel), jnp.asarray(h), sparsity, nm=nm,
                                       block_size=block_size)
    assert new_kernel.dtype == jnp.float64 and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(mask), want_mask)
  np.testing.assert_allclose(np.asarray(new_kernel), want_w, rtol=1e-5,
                             atol=1e-5 * np.abs(want_w).max())
  assert np.all(np.asarray(new_kernel)[~want_mask] == 0)
  assert np.all(np.asarray(new_kernel)[[3, d - 5]] == 0)
  if nm is not None:
    n, m = nm
    assert np.all(want_mask.reshape(d // m, m, out).sum(1) == n)


def test_sparsegpt_float32_bfloat16(rng_seed):
  """Default precision: close to the float64 reference; bf16 kernels come back in bf16
  with exact zeros off the mask."""
  rng = np.random.default_rng(rng_seed)
  x = _calibration(rng, 256, 32)
  kernel = rng.normal(size=(32, 8)).astype(np.float32)
  h = _hessian(x)
  want_w, want_mask = _reference_sparsegpt(kernel, h, 0.5, (2, 4), 16, 0.01)
  new_kernel, mask = sparsegpt_prune(kernel, h.astype(np.float32), 0.5, nm=(2, 4),
                                     block_size=16)
  assert new_kernel.dtype == jnp.float32
  agree = np.asarray(mask) == want_mask
  assert agree.mean() > 0.95
  if agree.all():
    np.testing.assert_allclose(np.asarray(new_kernel), want_w, rtol=2e-3,
                               atol=2e-3 * np.abs(want_w).max())
  new_bf16, mask_bf16 = sparsegpt_prune(jnp.asarray(kernel, jnp.bfloat16), h, 0.5)
  assert new_bf16.dtype == jnp.bfloat16
  assert np.all(np.asarray(new_bf16.astype(jnp.float32))[~np.asarray(mask_bf16)] == 0)
  assert np.asarray(mask_bf16).sum() == kernel.size // 2


def test_sparsity_zero_leaves_kernel_unchanged(rng_seed):
  rng = np.random.default_rng(rng_seed)
  kernel = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32)
  h = _hessian(_calibration(rng, 96, 24))
  new_kernel, mask = sparsegpt_prune(kernel, h, 0.0, block_size=8)
  assert np.asarray(mask).all()
  np.testing.assert_array_equal(np.asarray(new_kernel), np.asarray(kernel))
  assert np.asarray(wanda_mask(kernel, jnp.ones(24), 0.0)).all()
  assert np.asarray(magnitude_mask(kernel, 0.0, scope="layer")).all()


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), (None, 0.7), ((2, 4), 0.5),
                                         ((4, 8), 0.5)])
def test_wanda_and_magnitude_counts(rng_seed, nm, sparsity):
  rng = np.random.default_rng(rng_seed)
  d, out = 40, 12
  kernel = rng.normal(size=(d, out)).astype(np.float32)
  act_norm = np.sqrt(rng.gamma(1.0, size=d)).astype(np.float32)
  mask = np.asarray(wanda_mask(kernel, act_norm, sparsity, nm=nm))
  np.testing.assert_array_equal(mask, _wanda_reference(kernel, act_norm, sparsity, nm))
  if nm is None:
    assert np.all(mask.sum(0) == d - int(sparsity * d))
  else:
    assert np.all(mask.reshape(d // nm[1], nm[1], out).sum(1) == nm[0])
  mag = np.asarray(magnitude_mask(kernel, sparsity, nm=nm))
  np.testing.assert_array_equal(mag, np.asarray(wanda_mask(kernel, np.ones(d), sparsity,
                                                           nm=nm)))
  np.testing.assert_array_equal(mag, _wanda_reference(kernel, np.ones(d), sparsity, nm))
  assert not np.array_equal(mask, mag)      # the activation norms change the choice


def test_magnitude_layer_scope(rng_seed):
  rng = np.random.default_rng(rng_seed)
  kernel = rng.normal(size=(30, 7)).astype(np.float32)
  mask = np.asarray(magnitude_mask(kernel, 0.4, scope="layer"))
  assert mask.sum() == kernel.size - int(0.4 * kernel.size)
  assert np.abs(kernel[mask]).min() > np.abs(kernel[~mask]).max()
  assert len(set(mask.sum(0))) > 1            # not per output unit


def test_masks_jit_and_ties():
  kernel = jnp.zeros((8, 2)).at[5, 0].set(1.0)
  mask = jax.jit(functools.partial(magnitude_mask, sparsity=0.5))(kernel)
  # ties prune the lower input index first: kept are indices 4..7 of each column
  np.testing.assert_array_equal(np.asarray(mask)[:, 1], [False] * 4 + [True] * 4)
  assert bool(mask[5, 0])


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), ((2, 4), 0.5)])
def test_sparsegpt_reconstructs_better(rng_seed, nm, sparsity):
  """SparseGPT's weight update beats mask-only pruning on the calibration inputs."""
  rng = np.random.default_rng(rng_seed)
  d, out = 64, 32
  x = _calibration(rng, 512, d)
  kernel = rng.normal(size=(d, out)).astype(np.float32)
  h = _hessian(x).astype(np.float32)
  act_norm = np.linalg.norm(x, axis=0)
  new_kernel, _ = sparsegpt_prune(kernel, h, sparsity, nm=nm, block_size=32)

  def error(w):
    return np.linalg.norm(x @ kernel - x @ np.asarray(w, np.float64))

  wanda = kernel * np.asarray(wanda_mask(kernel, act_norm, sparsity, nm=nm))
  magnitude = kernel * np.asarray(magnitude_mask(kernel, sparsity, nm=nm))
  assert error(new_kernel) < 0.9 * error(wanda)      # measured ~0.8
  assert error(new_kernel) < 0.9 * error(magnitude)


def test_damping_retry_and_errors(rng_seed):
  rng = np.random.default_rng(rng_seed)
  d = 16
  kernel = rng.normal(size=(d, 4)).astype(np.float32)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  eig = np.ones(d)
  eig[0] = -0.03                            # PD only with λ ≥ ~0.03·mean(diag H)
  h = (q * eig) @ q.T
  with pytest.warns(RuntimeWarning, match="damp=0.1"):
    new_kernel, _ = sparsegpt_prune(kernel, h, 0.5, block_size=8)
  assert np.all(np.isfinite(np.asarray(new_kernel)))
  with pytest.raises(ValueError, match="not positive definite"):
    sparsegpt_prune(kernel, -np.eye(d), 0.5)
  with pytest.raises(ValueError, match="NaN"):
    sparsegpt_prune(kernel, np.full((d, d), np.nan), 0.5)


@pytest.mark.parametrize("call,match", [
    (lambda k, h: sparsegpt_prune(k, h, 1.0), "sparsity=1.0"),
    (lambda k, h: wanda_mask(k, np.ones(16), -0.1), "sparsity=-0.1"),
    (lambda k, h: magnitude_mask(k, 0.5, nm=(5, 4)), "n must be"),
    (lambda k, h: wanda_mask(k, np.ones(16), 0.5, nm=(3, 6)), "m=6 must divide"),
    (lambda k, h: magnitude_mask(k, 0.6, nm=(2, 4)), "contradicts nm"),
    (lambda k, h: sparsegpt_prune(k, h[:8, :8], 0.5), "hessian of shape"),
    (lambda k, h: sparsegpt_prune(k, h, 0.5, block_size=0), "block_size=0"),
    (lambda k, h: sparsegpt_prune(k, h, 0.5, nm=(2, 4), block_size=6), "block_size=6"),
    (lambda k, h: sparsegpt_prune(k, h, 0.5, damp=0.0), "damp=0.0"),
    (lambda k, h: wanda_mask(k, np.ones(15), 0.5), "act_norm of shape"),
    (lambda k, h: magnitude_mask(k[0], 0.5), "kernel must be"),
    (lambda k, h: magnitude_mask(k, 0.5, scope="row"), "scope='row'"),
    (lambda k, h: jax.jit(lambda a: sparsegpt_prune(a, h, 0.5))(k), "outside jax.jit"),
])
def test_bad_arguments(call, match):
  kernel = jnp.ones((16, 4))
  with pytest.raises((ValueError, TypeError), match=match):
    call(kernel, jnp.eye(16))


def test_accumulate_hessian_and_act_norm(rng_seed):
  rng = np.random.default_rng(rng_seed)
  d = 12
  batches = [rng.normal(size=(3, 5, d)).astype(np.float32) for _ in range(4)]
  keep = [rng.random(size=(3, 5)) < 0.6 for _ in range(4)]
  step = jax.jit(accumulate_hessian)
  step_where = jax.jit(lambda h, x, c, w: accumulate_hessian(h, x, c, where=w))
  h, c = jnp.zeros((d, d)), 0
  hw, cw, sq = jnp.zeros((d, d)), 0, jnp.zeros(d)
  for x, w in zip(batches, keep):
    h, c = step(h, x, c)
    hw, cw = step_where(hw, x, cw, w)
    sq = accumulate_act_sqnorm(sq, x, where=w)
  all_x = np.concatenate([x.reshape(-1, d) for x in batches]).astype(np.float64)
  sel = all_x[np.concatenate([w.reshape(-1) for w in keep])]
  assert int(c) == all_x.shape[0] and int(cw) == sel.shape[0]
  np.testing.assert_allclose(np.asarray(h), _hessian(all_x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(hw), _hessian(sel), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sqrt(np.asarray(sq)), np.linalg.norm(sel, axis=0),
                             rtol=1e-5)
  # Wanda's ‖X_i‖² is N·H_ii/2
  np.testing.assert_allclose(np.asarray(sq), int(cw) * np.diag(np.asarray(hw)) / 2,
                             rtol=1e-5)


def test_hessian_psum_over_devices(rng_seed):
  """Tokens split unevenly (via `where`) over 8 devices; psum_hessian / psum of the
  squared norms give the single-device statistics."""
  rng = np.random.default_rng(rng_seed)
  d, per = 6, 10
  x = rng.normal(size=(8 * per, d)).astype(np.float32)
  keep = rng.random(size=8 * per) < 0.5
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def local(x, w):
    h, c = accumulate_hessian(jnp.zeros((d, d)), x, 0, where=w)
    h, c = psum_hessian(h, c, "data")
    return h, c, jax.lax.psum(accumulate_act_sqnorm(jnp.zeros(d), x, where=w), "data")

  h, c, sq = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                                   out_specs=(P(), P(), P())))(x, keep)
  sel = x[keep].astype(np.float64)
  assert int(c) == sel.shape[0]
  np.testing.assert_allclose(np.asarray(h), _hessian(sel), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sq), (sel ** 2).sum(0), rtol=1e-5)


def test_accumulate_errors():
  with pytest.raises(ValueError, match="must end in the input size 4"):
    accumulate_hessian(jnp.zeros((4, 4)), jnp.ones((2, 5)), 0)
  with pytest.raises(ValueError, match="where of shape"):
    accumulate_act_sqnorm(jnp.zeros(4), jnp.ones((2, 3, 4)), where=jnp.ones(2, bool))
  with pytest.raises(ValueError, match="square floating"):
    accumulate_hessian(jnp.zeros((4, 3)), jnp.ones((2, 4)), 0)
