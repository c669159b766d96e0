"""PKM and UltraMem layers vs full-grid references (forward and grads), their state,
options validation and optimizer group."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.layers.memory import (ProductKeyMemory, UltraMemLayer, PKMOptions,
                                     UltraMemOptions)
from sparsejax.models.config import parse_model_config
from sparsejax.train.optim import param_path
from sparsejax.validation import ConfigError

CFG = parse_model_config(dict(d_model=16, num_layers=1, num_heads=2, num_kv_heads=2))


def _norm(kind, x, gain):
  """LayerNorm (mean and variance) or RMSNorm (root mean square) over the last axis."""
  if kind == "layernorm":
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * gain
  assert kind == "rmsnorm"
  return x / jnp.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * gain


def ultramem_reference(p, state, x, opt: UltraMemOptions):
  """UltraMem (Huang et al. 2025) §1–4 on the full n×n grid: candidates as a mask, IVE
  blocks as a one-hot over E, MCS chunks by reshaping."""
  c, e, m = opt.tucker_cores, opt.value_expand, opt.knn
  n, rows = opt.keys_per_side, opt.num_keys ** 2
  xt = x.reshape(-1, x.shape[-1])
  q = _norm(opt.qk_norm, (xt @ p["query"]).reshape(-1, 2, p["query"].shape[1] // 2),
            p["query_norm"])
  keys = _norm(opt.qk_norm, p["keys"], p["key_norm"])      # [H, 2, n, r, kdim]
  s_row = jnp.einsum("td,hnrd->thnr", q[:, 0], keys[:, 0])
  s_col = jnp.einsum("td,hnrd->thnr", q[:, 1], keys[:, 1])
  u, v = state["tucker_u"], state["tucker_v"]
  row_ok = jax.nn.one_hot(jax.lax.top_k(jnp.einsum("thnr,hr->thn", s_row, u), m)[1],
                          n).sum(-2) > 0                                  # [T, H, n]
  col_ok = jax.nn.one_hot(jax.lax.top_k(jnp.einsum("thnr,hr->thn", s_col, v), m)[1],
                          n).sum(-2) > 0
  full = jnp.einsum("thia,hcab,thjb->thijc", s_row, p["cores"], s_col)    # [T,H,n,n,C]
  allowed = row_ok[..., :, None] & col_ok[..., None, :]
  total = jnp.where(allowed, full.sum(-1), -jnp.inf).reshape(*allowed.shape[:2], n * n)
  slots = jax.lax.top_k(jax.lax.stop_gradient(total), m)[1]              # [T, H, m]
  scores = jnp.take_along_axis(full.reshape(*total.shape, c), slots[..., None], 2)
  virtual = slots if e == 1 else state["permutation"][slots]
  block, row = virtual // rows, virtual % rows
  vdim = p["values"].shape[1]
  chunks = p["values"][row].reshape(*row.shape, c, vdim // c) * scores[..., None]
  o = jnp.einsum("thme,thmv->tev", jax.nn.one_hot(block, e),
                 chunks.reshape(*row.shape, vdim))
  return (o.reshape(o.shape[0], -1) @ p["out"]).reshape(x.shape)


def pkm_reference(p, x, opt: PKMOptions):
  """Brute-force top-k over all n² slots per head, softmax, Σ over heads."""
  h, n, k = opt.heads, opt.num_keys, opt.knn
  xt = x.reshape(-1, x.shape[-1])
  q = _norm(opt.qk_norm, (xt @ p["query"]).reshape(xt.shape[0], h, 2, -1),
            p["query_norm"])
  keys = _norm(opt.qk_norm, p["keys"], p["key_norm"])
  full = (jnp.einsum("thd,hnd->thn", q[:, :, 0], keys[:, 0])[..., :, None]
          + jnp.einsum("thd,hnd->thn", q[:, :, 1], keys[:, 1])[..., None, :])
  full = full.reshape(*full.shape[:2], n * n)
  slots = jax.lax.top_k(jax.lax.stop_gradient(full), k)[1]
  w = jax.nn.softmax(jnp.take_along_axis(full, slots, -1), -1)
  return jnp.einsum("thk,thkd->td", w, p["values"][slots]).reshape(x.shape)


def _init(layer, x, seed):
  variables = sharding.unbox(jax.jit(layer.init)(jax.random.key(seed), x))
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def _check_forward_and_grads(apply, reference, params, x, seed):
  np.testing.assert_allclose(jax.jit(apply)(params, x), jax.jit(reference)(params, x),
                             rtol=2e-4, atol=1e-5)
  cot = jax.random.normal(jax.random.key(seed + 1), x.shape)
  loss = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * cot), (0, 1)))
  (gp, gx), (rp, rx) = loss(apply)(params, x), loss(reference)(params, x)
  np.testing.assert_allclose(gx, rx, rtol=2e-4, atol=1e-5)
  for name in params:
    np.testing.assert_allclose(gp[name], rp[name], rtol=2e-4, atol=1e-5, err_msg=name)
    assert np.abs(np.asarray(gp[name])).max() > 0, name     # every param gets gradient


@pytest.mark.parametrize("options", [
    dict(heads=2, knn=4, num_keys=4, tucker_rank=2, tucker_cores=2, value_expand=4),
    dict(heads=1, knn=3, num_keys=5, tucker_rank=1, tucker_cores=1, value_expand=1,
         qk_norm="layernorm"),
])
@pytest.mark.slow
def test_ultramem_layer_matches_full_grid_reference(rng_seed, options):
  opt = UltraMemOptions(impl="xla", **options)
  layer = UltraMemLayer(CFG, opt)
  x = jax.random.normal(jax.random.key(rng_seed), (2, 3, CFG.d_model))
  params, state = _init(layer, x, rng_seed)
  state = state["memory_state"]
  apply = lambda p, x: layer.apply({"params": p, "memory_state": state}, x)
  reference = lambda p, x: ultramem_reference(p, state, x, opt)
  _check_forward_and_grads(apply, reference, params, x, rng_seed)


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
def test_pkm_layer_matches_brute_force_reference(rng_seed, qk_norm):
  opt = PKMOptions(heads=2, knn=3, num_keys=5, impl="xla", qk_norm=qk_norm)
  layer = ProductKeyMemory(CFG, opt)
  x = jax.random.normal(jax.random.key(rng_seed), (2, 3, CFG.d_model))
  params, _ = _init(layer, x, rng_seed)
  _check_forward_and_grads(lambda p, x: layer.apply({"params": p}, x),
                           lambda p, x: pkm_reference(p, x, opt), params, x, rng_seed)


@pytest.mark.slow
def test_qk_norm_defaults_to_rmsnorm_and_the_two_norms_differ(rng_seed):
  """RMSNorm (the released UltraMem config's) is the default of both layers; the
  LayerNorm option really changes the forward (the query has a nonzero mean)."""
  assert UltraMemOptions().qk_norm == PKMOptions().qk_norm == "rmsnorm"
  x = jax.random.normal(jax.random.key(rng_seed), (1, 3, CFG.d_model)) + 1.0
  outs = []
  for qk_norm in ("rmsnorm", "layernorm"):
    layer = UltraMemLayer(CFG, UltraMemOptions(knn=2, num_keys=4, qk_norm=qk_norm,
                                               impl="xla"))
    params, state = _init(layer, x, rng_seed)
    outs.append(layer.apply({"params": params, **state}, x))
  assert np.abs(np.asarray(outs[0] - outs[1])).max() > 1e-4


def test_ultramem_init_follows_the_spec(rng_seed):
  opt = UltraMemOptions(heads=2, knn=4, num_keys=8, kdim=16, vdim=32)
  x = jax.random.normal(jax.random.key(rng_seed), (1, 2, CFG.d_model))
  params, state = _init(UltraMemLayer(CFG, opt), x, rng_seed)
  np.testing.assert_allclose(params["query_norm"], 16 ** -0.33, rtol=1e-6)
  np.testing.assert_allclose(params["key_norm"], 16 ** -0.33, rtol=1e-6)
  for name, std in [("query", 16 ** -0.5), ("keys", 16 ** -0.5), ("values", 0.02),
                    ("out", (4 * 32) ** -0.5)]:
    assert abs(float(np.std(params[name])) / std - 1) < 0.15, name
  cores = np.asarray(params["cores"])
  assert cores.shape == (2, 2, 2, 2) and 0 <= cores.min() and cores.max() <= 1
  assert params["values"].shape == (64, 32) and params["keys"].shape == (2, 2, 16, 2, 16)
  perm = np.asarray(state["memory_state"]["permutation"])
  np.testing.assert_array_equal(np.sort(perm), np.arange(4 * 64))
  # u, v come from the SVD of the summed core at init (never zero)
  left, _, right_t = np.linalg.svd(cores.sum(1))
  u = np.asarray(state["memory_state"]["tucker_u"])
  np.testing.assert_allclose(np.abs(u), np.abs(left[:, :, 0]), rtol=1e-4, atol=1e-6)
  # the permutation depends on permutation_seed only, not on the init rng
  _, other = _init(UltraMemLayer(CFG, opt), x, rng_seed + 1)
  np.testing.assert_array_equal(perm, other["memory_state"]["permutation"])


@pytest.mark.slow
def test_tucker_surrogate_is_refreshed_only_when_mutable_and_stays_sign_aligned(rng_seed):
  opt = UltraMemOptions(heads=2, knn=4, num_keys=4, impl="xla")
  layer = UltraMemLayer(CFG, opt)
  x = jax.random.normal(jax.random.key(rng_seed), (1, 4, CFG.d_model))
  params, state = _init(layer, x, rng_seed)
  moved = dict(params, cores=params["cores"] + 0.3 * jax.random.normal(
      jax.random.key(rng_seed + 2), params["cores"].shape))
  _, updates = layer.apply({"params": moved, **state}, x, mutable=["memory_state"])
  new = updates["memory_state"]
  left, _, right_t = np.linalg.svd(np.asarray(moved["cores"]).sum(1))
  np.testing.assert_allclose(np.abs(new["tucker_u"]), np.abs(left[:, :, 0]), rtol=1e-4,
                             atol=1e-6)
  old_u = np.asarray(state["memory_state"]["tucker_u"])
  assert (np.sum(np.asarray(new["tucker_u"]) * old_u, -1) > 0).all()   # no sign flip
  # flipping the stored sign flips the refreshed one (alignment follows the state)
  flipped = {"memory_state": dict(state["memory_state"],
                                  tucker_u=-state["memory_state"]["tucker_u"],
                                  tucker_v=-state["memory_state"]["tucker_v"])}
  _, again = layer.apply({"params": moved, **flipped}, x, mutable=["memory_state"])
  np.testing.assert_allclose(again["memory_state"]["tucker_u"], -new["tucker_u"],
                             rtol=1e-6)
  # immutable (eval / decode) applies use but never write the state
  out = layer.apply({"params": moved, **state}, x)
  assert out.shape == x.shape


@pytest.mark.slow
def test_rank_loss_is_sown_when_enabled(rng_seed):
  opt = UltraMemOptions(heads=2, knn=2, num_keys=4, rank_loss_weight=0.5,
                        rank_loss_tau=0.0)
  layer = UltraMemLayer(CFG, opt)
  x = jax.random.normal(jax.random.key(rng_seed), (1, 2, CFG.d_model))
  params, state = _init(layer, x, rng_seed)
  _, sown = layer.apply({"params": params, **state}, x, mutable=["aux_loss"])
  sigma = np.linalg.svd(np.asarray(params["cores"]).sum(1), compute_uv=False)
  np.testing.assert_allclose(sown["aux_loss"]["tucker_rank_loss"][0],
                             0.5 * np.mean(sigma[:, 1:] ** 2), rtol=1e-4)


@pytest.mark.parametrize("memory", ["pkm", "ultramem"])
def test_value_lr_group_matches_the_model_values_and_decays_4_to_1(memory):
  cfg = parse_model_config(dict(
      d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, memory=memory,
      memory_layers="0:1", memory_options=dict(knn=2, num_keys=4, heads=1,
                                               value_lr_decay_fraction=0.5)))
  groups = cfg.lr_multipliers(num_steps=200)
  (pattern, schedule), = groups.items()
  from sparsejax.models.transformer import DecoderLM
  params = jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 2), jnp.int32))["params"]
  matched = [param_path(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(sharding.unbox(params))[0]
             if re.search(pattern, param_path(path))]
  assert matched == ["memory_0/values"]
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 50, 100, 150)],
                             [4.0, 2.5, 1.0, 1.0])


@pytest.mark.parametrize("options,field", [
    (dict(value_expand=2), "value_expand"),
    (dict(knn=300, num_keys=64), "knn"),
    (dict(vdim=7, tucker_cores=2), "vdim"),
    (dict(tucker_rank=0), "tucker_rank"),
    (dict(shard_values="diagonal"), "shard_values"),
    (dict(value_lr_decay_fraction=0.0), "value_lr_decay_fraction"),
    (dict(qk_norm="batchnorm"), "qk_norm"),
])
def test_bad_ultramem_options_name_the_field(options, field):
  with pytest.raises(ConfigError, match=rf"config\.model\.memory_options\.{field}"):
    parse_model_config(dict(memory="ultramem", memory_layers="0:0",
                            memory_options=options)).validate()


def _load_config_module(name):
  import importlib.util
  import os
  from conftest import REPO
  path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,arg,memory,layers,cores,expand", [
    ("default", None, "ultramem", "0:2,1:3", 2, 4),
    ("ultramem", None, "ultramem", "0:2,1:3", 2, 4),
    ("pkm", None, "pkm", "1:1,2:2", None, None),
    ("ultramem_ablation", "pkm", "pkm", "1:1,2:2", None, None),
    ("ultramem_ablation", "pkm_skip", "pkm", "0:2,1:3", None, None),
    ("ultramem_ablation", "tdqkr", "ultramem", "0:2,1:3", 1, 1),
    ("ultramem_ablation", "ive", "ultramem", "0:2,1:3", 1, 4),
    ("ultramem_ablation", "ultramem", "ultramem", "0:2,1:3", 2, 4),
])
def test_memory_configs_parse(name, arg, memory, layers, cores, expand):
  from sparsejax.train.config import parse_config
  module = _load_config_module(name)
  assert f"--config=experiments/configs/{name}.py" in module.__doc__
  model = parse_config(module.get_config(*([arg] if arg else []))).model
  assert (model.memory, model.memory_layers) == (memory, layers)
  if cores is not None:
    opts = model.memory_options
    assert (opts["tucker_cores"], opts["value_expand"]) == (cores, expand)
  with pytest.raises(ValueError, match="ablation step"):
    _load_config_module("ultramem_ablation").get_config("nope")
