"""TopK SAE math against float64 NumPy references: forward, gradients (main + AuxK),
decoder constraints, geometric median, dead-latent counter, sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.sae import model as sm
from sparsejax.sae.config import SAEOptimConfig
from sparsejax.sae.trainer import SAETrainer
from sparsejax.validation import ConfigError


def _params(rng, d, n):
  return {"W_enc": rng.normal(size=(d, n)) / np.sqrt(d), "b_lat": rng.normal(size=n) * .1,
          "W_dec": rng.normal(size=(n, d)), "b_pre": rng.normal(size=d) * .1}


def _topk_relu_mask(a, k):
  """Kept entries of ReLU(TopK_k(a)): the k largest per row, and only positive ones."""
  idx = np.argsort(-a, axis=-1, kind="stable")[:, :k]
  keep = np.zeros(a.shape, bool)
  np.put_along_axis(keep, idx, True, axis=-1)
  return keep & (a > 0)


def _np_loss_and_grads(p, x, dead, k, k_aux, coeff, c, s):
  """float64 loss and hand-derived gradients of `sparsejax.sae.model.loss_fn`."""
  xs = x * c
  n_tok, d = xs.shape
  a = (xs - p["b_pre"]) @ p["W_enc"] + p["b_lat"]
  m = _topk_relu_mask(a, k)
  z = np.where(m, a, 0)
  x_hat = z @ p["W_dec"] + p["b_pre"]
  r = x_hat - xs
  mse = np.mean(r ** 2) * s
  g_xhat = 2 * r * s / (n_tok * d)
  g = {"W_dec": z.T @ g_xhat, "b_pre": g_xhat.sum(0)}
  g_a = (g_xhat @ p["W_dec"].T) * m
  a_d = np.where(dead, a, 0)
  m_aux = _topk_relu_mask(a_d, k_aux)
  z_aux = np.where(m_aux, a_d, 0)
  e = xs - x_hat
  e_hat = z_aux @ p["W_dec"]
  aux = np.mean((e - e_hat) ** 2) / np.mean(e ** 2) if dead.any() else 0.0
  if dead.any():
    g_ehat = coeff * 2 * (e_hat - e) / (n_tok * d * np.mean(e ** 2))
    g["W_dec"] += z_aux.T @ g_ehat
    g_a += (g_ehat @ p["W_dec"].T) * m_aux
  g["W_enc"] = (xs - p["b_pre"]).T @ g_a
  g["b_lat"] = g_a.sum(0)
  g["b_pre"] -= g_a.sum(0) @ p["W_enc"].T
  return mse + coeff * aux, aux, z, x_hat / c, g


@pytest.mark.slow
@pytest.mark.parametrize("num_dead", [0, 5])
def test_loss_and_gradients_match_numpy(rng_seed, num_dead):
  rng = np.random.default_rng(rng_seed)
  d, n, k, k_aux, n_tok = 6, 24, 3, 4, 10
  p = _params(rng, d, n)
  x = rng.normal(size=(n_tok, d)) * 2 + 1
  dead = np.zeros(n, bool)
  dead[rng.choice(n, num_dead, replace=False)] = True
  c, s = 0.7, 1.3
  cfg = sm.SAEConfig(num_latents=n, k=k, k_aux=k_aux, aux_coeff=1 / 32, impl="xla")
  want_loss, want_aux, want_z, want_xhat, want_g = _np_loss_and_grads(
      p, x, dead, k, k_aux, 1 / 32, c, s)
  p32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p)
  (loss, aux), g = jax.value_and_grad(sm.loss_fn, has_aux=True)(
      p32, jnp.asarray(x, jnp.float32), jnp.asarray(dead), cfg, jnp.float32(c),
      jnp.float32(s))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4)
  np.testing.assert_allclose(aux["aux_loss"], want_aux, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(aux["l0"], (want_z > 0).sum(-1).mean(), rtol=1e-6)
  for name in p:
    np.testing.assert_allclose(g[name], want_g[name], rtol=2e-3, atol=1e-5,
                               err_msg=name)
  z = sm.encode(p32, jnp.asarray(x, jnp.float32), cfg, c)
  np.testing.assert_allclose(z, want_z, rtol=1e-4, atol=1e-5)
  assert int(jnp.max(jnp.sum(z > 0, -1))) <= k and float(jnp.min(z)) >= 0
  np.testing.assert_allclose(sm.decode(p32, z, c), want_xhat, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_auxk_gradient_reaches_only_dead_latents_and_skips_b_pre(rng_seed):
  """The AuxK term's own gradient: only dead latents' encoder columns / decoder rows,
  and b_pre only through the encoder (ê has no b_pre)."""
  rng = np.random.default_rng(rng_seed)
  d, n = 5, 16
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), _params(rng, d, n))
  x = jnp.asarray(rng.normal(size=(12, d)), jnp.float32)
  dead = np.zeros(n, bool)
  dead[[1, 4, 9, 13]] = True
  grads = {}
  for coeff in (0.0, 1.0):
    cfg = sm.SAEConfig(num_latents=n, k=2, k_aux=3, aux_coeff=coeff, impl="xla")
    grads[coeff] = jax.grad(lambda q: sm.loss_fn(q, x, jnp.asarray(dead), cfg, 1.0,
                                                 1.0)[0])(p)
  diff = jax.tree.map(lambda a, b: np.asarray(a - b), grads[1.0], grads[0.0])
  assert np.abs(diff["W_enc"][:, dead]).max() > 0
  np.testing.assert_array_equal(diff["W_enc"][:, ~dead], 0)
  np.testing.assert_array_equal(diff["b_lat"][~dead], 0)
  np.testing.assert_array_equal(diff["W_dec"][~dead], 0)
  np.testing.assert_allclose(diff["b_pre"], -diff["b_lat"] @ np.asarray(p["W_enc"]).T,
                             rtol=1e-4, atol=1e-7)


def test_remove_parallel_grad_and_unit_norm(rng_seed):
  rng = np.random.default_rng(rng_seed)
  w = rng.normal(size=(7, 4))
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  g = rng.normal(size=(7, 4))
  want = g - np.sum(g * w, 1, keepdims=True) * w
  got = np.asarray(sm.remove_parallel_grad(jnp.asarray(w), jnp.asarray(g)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(got * w, 1), 0, atol=1e-6)
  u = np.asarray(sm.unit_norm_rows(jnp.asarray(g * 3)))
  np.testing.assert_allclose(u, g / np.linalg.norm(g, axis=1, keepdims=True), rtol=1e-6)


def _np_weiszfeld(x, iters):
  y = x.mean(0)
  for _ in range(iters):
    w = 1 / np.maximum(np.linalg.norm(x - y, axis=1), 1e-8)
    y = w @ x / w.sum()
  return y


def test_geometric_median_matches_weiszfeld_and_is_robust(rng_seed):
  rng = np.random.default_rng(rng_seed)
  x = rng.normal(size=(200, 5)) + 3.0
  x[:20] += 100.0          # 10% far outliers drag the mean, not the median
  got = np.asarray(sm.geometric_median(jnp.asarray(x, jnp.float32), iters=200))
  np.testing.assert_allclose(got, _np_weiszfeld(x, 200), rtol=1e-4, atol=1e-4)
  # optimality: the unit vectors towards the points sum to ~0
  u = (x - got) / np.linalg.norm(x - got, axis=1, keepdims=True)
  assert np.linalg.norm(u.sum(0)) / len(x) < 1e-3
  assert np.linalg.norm(got - 3.0) < 1.0 < np.linalg.norm(x.mean(0) - 3.0)


def test_init_is_tied_unit_norm_with_median_pre_bias(rng_seed):
  rng = np.random.default_rng(rng_seed)
  sample = jnp.asarray(rng.normal(size=(64, 8)) * 5 + 2, jnp.float32)
  scale, mse_scale = sm.input_stats(sample, True)
  np.testing.assert_allclose(jnp.mean(jnp.sum((sample * scale) ** 2, -1)), 8, rtol=1e-5)
  xs = np.asarray(sample * scale, np.float64)
  np.testing.assert_allclose(mse_scale, 1 / np.mean((xs - xs.mean(0)) ** 2), rtol=1e-4)
  cfg = sm.SAEConfig(num_latents=32, k=4, k_aux=8)
  p = sm.init_params(jax.random.key(rng_seed), cfg, sample, scale)
  np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
  np.testing.assert_allclose(jnp.linalg.norm(p["W_dec"], axis=1), 1, rtol=1e-6)
  np.testing.assert_allclose(p["b_pre"], _np_weiszfeld(xs, 64), rtol=1e-3, atol=1e-4)
  np.testing.assert_array_equal(p["b_lat"], 0)
  untied = sm.init_params(jax.random.key(rng_seed), sm.SAEConfig(
      num_latents=32, k=4, k_aux=8, tied_init=False), sample, scale)
  assert not np.allclose(untied["W_enc"], untied["W_dec"].T)


def test_dead_counter_counts_tokens_and_saturates():
  counter = jnp.asarray([0, 5, 90, 100], jnp.int32)
  fired = jnp.asarray([False, True, False, False])
  got = sm.update_dead_counter(counter, fired, 20, 100)
  np.testing.assert_array_equal(got, [20, 0, 100, 100])


@pytest.mark.parametrize("field,overrides", [
    ("config.sae.k", dict(num_latents=16, k=16)),
    ("config.sae.k", dict(k=0)),
    ("config.sae.k_aux", dict(num_latents=16, k=4, k_aux=17)),
    ("config.sae.dead_tokens", dict(dead_tokens=0)),
    ("config.sae.aux_coeff", dict(aux_coeff=-1.0)),
])
def test_bad_config_names_the_field(field, overrides):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    sm.SAEConfig(**overrides).validate()


def test_topk_kernel_in_interpret_mode_matches_xla(rng_seed):
  rng = np.random.default_rng(rng_seed)
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), _params(rng, 8, 128))
  x = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
  get = lambda impl: sm.encode(p, x, sm.SAEConfig(num_latents=128, k=8, impl=impl))
  np.testing.assert_array_equal(get("interpret"), get("xla"))


def _train(mesh, sample, batches, cfg):
  trainer = SAETrainer(cfg, SAEOptimConfig(learning_rate=1e-2, warmup_steps=0), 8, mesh)
  state = trainer.init_state(0, sample)
  for x in batches:
    state, metrics = trainer.train_step(state, x)
  return trainer, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow
def test_train_step_sharded_over_tensor_equals_single_device(rng_seed):
  rng = np.random.default_rng(rng_seed)
  cfg = sm.SAEConfig(num_latents=64, k=4, k_aux=8, dead_tokens=48, impl="xla")
  sample = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  batches = [jnp.asarray(rng.normal(size=(32, 8)), jnp.float32) for _ in range(4)]
  one = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  eight = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=4))
  _, want, want_m = _train(one, sample, batches, cfg)
  trainer, got, got_m = _train(eight, sample, batches, cfg)
  assert trainer.param_shardings["W_enc"].spec == jax.sharding.PartitionSpec(None,
                                                                             "tensor")
  for name in want.params:
    np.testing.assert_allclose(got.params[name], want.params[name], rtol=2e-4,
                               atol=2e-6, err_msg=name)
  np.testing.assert_array_equal(got.model_state["sae"]["tokens_since_fired"],
                                want.model_state["sae"]["tokens_since_fired"])
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
  # decoder rows stay unit norm after every update; counter = tokens since last fire
  np.testing.assert_allclose(np.linalg.norm(got.params["W_dec"], axis=1), 1, rtol=1e-5)
  assert want.model_state["sae"]["tokens_since_fired"].max() <= 48


@pytest.mark.slow
def test_step_projects_decoder_gradient_before_adam(rng_seed):
  """With SGD-like Adam (b1 = b2 = 0 → update = −lr·sign-ish g/|g|), W_dec moves only
  orthogonally to its rows before the renormalization: checked against NumPy."""
  rng = np.random.default_rng(rng_seed)
  cfg = sm.SAEConfig(num_latents=16, k=2, k_aux=4, impl="xla")
  sample = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  trainer = SAETrainer(cfg, SAEOptimConfig(learning_rate=1e-2, warmup_steps=0, b1=0.0,
                                           b2=0.0, eps=1e-30), 8, mesh)
  state = trainer.init_state(0, sample)
  stats = state.model_state["sae"]
  w = np.asarray(state.params["W_dec"], np.float64)
  dead = stats["tokens_since_fired"] >= cfg.dead_tokens
  g = jax.grad(lambda p: sm.loss_fn(p, x, dead, cfg, stats["input_scale"],
                                    stats["mse_scale"])[0])(state.params)
  g = np.asarray(g["W_dec"], np.float64)
  g_perp = g - np.sum(g * w, 1, keepdims=True) * w
  step = -1e-2 * g_perp / np.maximum(np.abs(g_perp), 1e-30) * (np.abs(g_perp) > 0)
  want = (w + step) / np.linalg.norm(w + step, axis=1, keepdims=True)
  new, _ = trainer.train_step(state, x)
  np.testing.assert_allclose(new.params["W_dec"], want, rtol=1e-4, atol=1e-5)


def test_experiment_config_file_parses():
  import os
  import runpy
  from conftest import REPO
  from sparsejax.sae.config import parse_run_config
  path = os.path.join(REPO, "experiments", "configs", "sae.py")
  config = parse_run_config(runpy.run_path(path)["get_config"]())
  assert config.sae.k < config.sae.num_latents and config.source.site == "resid_1"
  assert "python experiments/sae.py --config=experiments/configs/sae.py" in \
      runpy.run_path(path)["__doc__"]
