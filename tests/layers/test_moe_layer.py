"""The "moe" FFN entry: equals the ops on its params, sows aux losses and load metrics,
keeps the balancing bias in model_state, trains, validates options, shards experts."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO, tiny_config_dict
from sparsejax.layers import registry
from sparsejax.layers.moe import MoEOptions, resolve_dispatch
from sparsejax.models import parse_model_config
from sparsejax.ops import moe as moe_ops
from sparsejax.sharding import unbox
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import restore_run, train
from sparsejax.validation import ConfigError

D, D_FF = 16, 32


def build(**options):
  cfg = parse_model_config(dict(d_model=D, d_ff=D_FF, num_heads=2, num_kv_heads=2,
                                num_layers=2, ffn="moe", ffn_options=options))
  return registry.build("ffn", "moe", cfg, options, 0)


def random_params(boxed, rng):
  return jax.tree.map(lambda s: jnp.asarray((0.3 * rng.standard_normal(s.shape))
                                            .astype(np.float32)), unbox(boxed))


def np_silu(x):
  return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("options", [
    dict(num_experts=4, top_k=2, dispatch="dropless"),
    dict(num_experts=6, top_k=3, num_shared=1, scoring="sigmoid", dispatch="capacity",
         capacity_factor=8.0),
])
@pytest.mark.slow
def test_layer_equals_ops_on_its_params(rng_seed, options):
  rng = np.random.default_rng(rng_seed)
  x = jnp.asarray(rng.standard_normal((2, 5, D)).astype(np.float32))
  ffn = build(**options)
  opt = MoEOptions(**options)
  e, f = opt.num_experts, opt.resolved_d_expert(D_FF)
  assert f == D_FF // (opt.top_k + opt.num_shared)
  variables = jax.eval_shape(ffn.init, jax.random.key(0), x)
  boxed = variables["params"]
  axes = {"router": ("embed", None), "w_gate": ("expert", "embed", "mlp"),
          "w_up": ("expert", "embed", "mlp"), "w_down": ("expert", "mlp", "embed")}
  shapes = {"router": (D, e), "w_gate": (e, D, f), "w_up": (e, D, f),
            "w_down": (e, f, D)}
  for name, names in axes.items():
    assert isinstance(boxed[name], nn.LogicallyPartitioned)
    assert boxed[name].names == names and boxed[name].value.shape == shapes[name]
  # The routing bias exists only when routing uses it (sigmoid scoring): softmax
  # routing applies with its params alone.
  assert ("moe_state" in variables) == (opt.scoring == "sigmoid")
  assert ("shared" in boxed) == bool(opt.num_shared)
  params = random_params(boxed, rng)
  bias = jnp.asarray(0.1 * rng.standard_normal(e).astype(np.float32))
  state = {"moe_state": {"bias": bias}} if "moe_state" in variables else {}
  y, sown = jax.jit(lambda p: ffn.apply({"params": p, **state}, x,
                                        mutable=["aux_loss", "metrics"]))(params)
  # The same computation from the ops (loop reference), plus the shared expert in NumPy.
  xt = x.reshape(-1, D)
  logits = xt @ params["router"]
  w, idx, scores = moe_ops.route(logits, opt.top_k, scoring=opt.scoring,
                                 bias=bias if opt.scoring == "sigmoid" else None)
  ref, _ = moe_ops.moe_ffn(xt, w, idx, params["w_gate"], params["w_up"],
                           params["w_down"], activation="silu", dispatch="loop")
  ref = np.asarray(ref, np.float64)
  if opt.num_shared:
    sp = {k: np.asarray(v["kernel"], np.float64) for k, v in params["shared"].items()}
    x64 = np.asarray(xt, np.float64)
    ref = ref + (np_silu(x64 @ sp["gate_proj"]) * (x64 @ sp["up_proj"])) @ sp["down_proj"]
  np.testing.assert_allclose(y, ref.reshape(x.shape), rtol=1e-4, atol=1e-5)
  probs = scores if opt.scoring == "softmax" else scores / scores.sum(-1, keepdims=True)
  np.testing.assert_allclose(sown["aux_loss"]["switch_loss"][0],
                             0.01 * moe_ops.switch_aux_loss(probs, idx, e), rtol=1e-5)
  np.testing.assert_allclose(sown["aux_loss"]["z_loss"][0],
                             1e-3 * moe_ops.router_z_loss(logits), rtol=1e-5)
  load = moe_ops.expert_load(idx, e)
  metrics = sown["metrics"]
  np.testing.assert_allclose(metrics["load_max_over_mean"][0], e * load.max(), rtol=1e-6)
  np.testing.assert_allclose([metrics[f"load_{i}"][0] for i in range(e)], load,
                             rtol=1e-6)
  assert float(metrics["dropped_fraction"][0]) == 0.0


def test_bias_updates_only_when_moe_state_is_mutable(rng_seed):
  rng = np.random.default_rng(rng_seed)
  x = jnp.asarray(rng.standard_normal((2, 6, D)).astype(np.float32))
  ffn = build(num_experts=4, top_k=2, scoring="sigmoid", bias_update_rate=1e-2,
              aux_loss_weight=0.0)
  variables = jax.jit(ffn.init)(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["moe_state"]["bias"], np.zeros(4))  # no update
  params = random_params(variables["params"], rng)
  state = {"bias": jnp.zeros(4)}
  apply = jax.jit(ffn.apply, static_argnames="mutable")
  y_eval = apply({"params": params, "moe_state": state}, x)  # immutable: no update
  y, new = apply({"params": params, "moe_state": state}, x,
                 mutable=("moe_state", "aux_loss"))
  np.testing.assert_allclose(y, y_eval, rtol=1e-6)              # bias applies next call
  assert set(new["aux_loss"]) == {"z_loss"}                    # α = 0: no switch loss
  logits = x.reshape(-1, D) @ params["router"]
  _, idx, _ = moe_ops.route(logits, 2, scoring="sigmoid", bias=state["bias"])
  expected = moe_ops.update_bias(state["bias"], moe_ops.expert_load(idx, 4), 1e-2)
  np.testing.assert_allclose(new["moe_state"]["bias"], expected, rtol=1e-6)
  assert np.abs(np.asarray(expected)).max() > 0


@pytest.mark.parametrize("options, uses_bias", [
    (dict(), False), (dict(scoring="sigmoid"), True), (dict(bias_update_rate=1e-3), True),
])
def test_moe_state_exists_only_when_routing_uses_it(options, uses_bias):
  x = jnp.ones((1, 2, D))
  variables = jax.eval_shape(build(**options).init, jax.random.key(0), x)
  assert MoEOptions(**options).uses_bias == uses_bias
  assert ("moe_state" in variables) == uses_bias


def test_auto_dispatch_uses_decode_for_small_batches(rng_seed):
  assert resolve_dispatch("auto", 1, 2, 8) == "decode"
  assert resolve_dispatch("auto", 4, 2, 8) == "dropless"
  assert resolve_dispatch("capacity", 1, 2, 8) == "capacity"
  rng = np.random.default_rng(rng_seed)
  x = jnp.asarray(rng.standard_normal((1, 1, D)).astype(np.float32))
  auto, dropless = build(num_experts=8, dispatch="auto"), build(num_experts=8,
                                                                dispatch="dropless")
  params = random_params(jax.eval_shape(auto.init, jax.random.key(0), x)["params"], rng)
  variables = {"params": params}
  np.testing.assert_allclose(jax.jit(auto.apply)(variables, x),
                             jax.jit(dropless.apply)(variables, x),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["auto", "dropless", "capacity"])
def test_no_tokens_give_empty_output_and_finite_losses(rng_seed, dispatch):
  ffn = build(num_experts=4, top_k=2, num_shared=1, dispatch=dispatch)
  rng = np.random.default_rng(rng_seed)
  x1 = jnp.zeros((1, 1, D))
  params = random_params(jax.eval_shape(ffn.init, jax.random.key(0), x1)["params"], rng)
  x = jnp.zeros((2, 0, D))

  def loss(params, x):
    y, sown = ffn.apply({"params": params}, x,
                        mutable=["aux_loss", "metrics"])
    aux = sum(v[0] for v in sown["aux_loss"].values())
    return jnp.sum(y) + aux, (y, sown["metrics"])

  (value, (y, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, x)
  assert y.shape == (2, 0, D) and float(value) == 0.0
  assert all(np.isfinite(float(v[0])) for v in metrics.values())
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, np.zeros(g.shape))


@pytest.mark.parametrize("options, field", [
    (dict(top_k=9), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(scoring="tanh"), "scoring"),
    (dict(dispatch="megablox"), "dispatch"),
    (dict(impl="dropless"), "impl"),             # the old name of `dispatch`
    (dict(activation="gelu"), "activation"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(bias_update_rate=-1e-3), "bias_update_rate"),
    (dict(d_expert=-1), "d_expert"),
    (dict(num_experts="8"), "num_experts"),
])
def test_config_errors_name_the_field(options, field):
  with pytest.raises(ConfigError, match=rf"config\.model\.ffn_options\.{field}\b"):
    parse_config(tiny_config_dict(model=dict(ffn="moe", ffn_options=options)))


def test_config_files_parse_and_match_dense_activated_params():
  import importlib.util
  for name, e, k, shared in (("moe", 8, 2, 0), ("moe_shared", 16, 4, 1)):
    path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = parse_config(module.get_config())
    opt = MoEOptions(**config.model.ffn_options)
    assert (opt.num_experts, opt.top_k, opt.num_shared) == (e, k, shared)
    d_ff = config.model.resolved_d_ff
    activated = (opt.top_k + opt.num_shared) * opt.resolved_d_expert(d_ff)
    assert 0.9 * d_ff <= activated <= d_ff


@pytest.mark.slow
def test_train_on_expert_mesh_collects_aux_loss_load_metrics_and_bias(tmp_path):
  """A 2-step run with experts sharded over mesh axis expert=2 and DeepSeek-V3 bias."""
  config = parse_config(tiny_config_dict(
      model=dict(num_layers=1, ffn="moe",
                 ffn_options=dict(num_experts=4, top_k=2, bias_update_rate=1e-3)),
      mesh=dict(data=-1, expert=2),
      train=dict(num_steps=2, log_every=1, eval_every=2, eval_batches=1,
                 checkpoint_every=2)))
  result = train(config, str(tmp_path))
  trainer, state = result.trainer, result.state
  assert trainer.mesh.shape["expert"] == 2
  ffn_params = state.params["block_0"]["ffn"]
  for name in ("w_gate", "w_up", "w_down"):
    assert trainer.state_shardings.params["block_0"]["ffn"][name].spec == \
        P("expert", None, None)
    assert ffn_params[name].sharding.spec == P("expert", None, None)
  assert trainer.state_shardings.params["block_0"]["ffn"]["router"].spec == P(None, None)
  # The bias is non-parameter state: in model_state (checkpointed), moved by ±γ per
  # training step (2 steps), not a param.
  bias = np.asarray(state.model_state["moe_state"]["block_0"]["ffn"]["bias"])
  assert np.abs(bias).max() > 0 and np.all(np.abs(bias) <= 2e-3 + 1e-9)
  assert "bias" not in ffn_params
  _, restored, step = restore_run(str(tmp_path))   # the checkpoint holds the bias
  assert step == 2
  np.testing.assert_array_equal(
      restored.model_state["moe_state"]["block_0"]["ffn"]["bias"], bias)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_records = [r for r in records if r["split"] == "train"]
  assert len(train_records) == 2
  for r in train_records:
    assert r["aux_loss"] > 0
    assert r["block_0/ffn/load_max_over_mean"] >= 1.0
    assert r["block_0/ffn/dropped_fraction"] == 0.0
    assert sum(r[f"block_0/ffn/load_{i}"] for i in range(4)) == pytest.approx(1.0)
  val = [r for r in records if r["split"] == "val"][-1]
  assert "block_0/ffn/load_max_over_mean" in val and "aux_loss" not in val
