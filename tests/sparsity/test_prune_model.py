"""Sequential model pruning (sparsejax.sparsity.prune_model) against float64 NumPy
references built from the full model's own intermediates, on 8 devices vs 1, for MoE
experts, memory tables and the bad-input errors; calibration windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.models import DecoderLM
from sparsejax.models.config import parse_model_config
from sparsejax.ops import moe as moe_ops
from sparsejax.sparsity.calibration import calibration_windows, score_tokens
from sparsejax.sparsity.posttrain import magnitude_mask, sparsegpt_prune
from sparsejax.sparsity.prune_model import PruneSettings, prune_model, rel_error, summary
from sparsejax.validation import ConfigError

BASE = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)


def _model(seed, **overrides):
  cfg = parse_model_config({**BASE, **overrides})
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (8, 16)).astype(np.int32)
  variables = DecoderLM(cfg).init(jax.random.key(seed), tokens)
  boxed = variables["params"]
  state = {k: sharding.unbox(v) for k, v in variables.items() if k != "params"}
  return cfg, boxed, state, tokens


def _placed(boxed, mesh):
  return jax.device_put(sharding.unbox(boxed), sharding.tree_shardings(boxed, mesh))


def _one_device():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _np(x):
  return np.asarray(jax.device_get(x), np.float64)


def _intermediates(cfg, params, state, tokens):
  """Per block: the (dense-path) inputs of its linears from the full model's
  capture_intermediates: norms' outputs and silu(gate)·up."""
  _, inter = DecoderLM(cfg).apply({"params": params, **state}, tokens,
                                  capture_intermediates=True, mutable=["intermediates"])
  out = []
  for i in range(cfg.num_layers):
    b = inter["intermediates"][f"block_{i}"]
    x_attn = _np(b["attn_norm"]["__call__"][0])
    x_ffn = _np(b["ffn_norm"]["__call__"][0])
    item = {"q_proj": x_attn, "k_proj": x_attn, "v_proj": x_attn,
            "gate_proj": x_ffn, "up_proj": x_ffn}
    if "gate_proj" in b["ffn"]:
      g = _np(b["ffn"]["gate_proj"]["__call__"][0])
      u = _np(b["ffn"]["up_proj"]["__call__"][0])
      item["down_proj"] = g / (1 + np.exp(-g)) * u
    out.append({k: v.reshape(-1, v.shape[-1]) for k, v in item.items()})
  return out


def _wanda_ref(w, x, sparsity):
  """NumPy Wanda: per output column prune floor(s·in) smallest |W|·‖X_j‖ (stable)."""
  score = np.abs(w) * np.sqrt(np.sum(x * x, axis=0))[:, None]
  k = int(sparsity * w.shape[0])
  keep = np.ones_like(w, bool)
  order = np.argsort(score, axis=0, kind="stable")[:k]
  np.put_along_axis(keep, order, False, axis=0)
  return keep


def _group(name):
  return "attention" if name in ("q_proj", "k_proj", "v_proj") else "ffn"


def _kernel2d(params, i, name):
  k = _np(params[f"block_{i}"][_group(name)][name]["kernel"])
  return k.reshape(k.shape[0], -1)


@pytest.mark.parametrize("method", ["wanda",
                                    pytest.param("sparsegpt", marks=pytest.mark.slow)])
def test_sequential_blocks_match_reference(method):
  """Block i is pruned from the inputs that the already-pruned blocks 0..i-1 feed it."""
  cfg, boxed, state, tokens = _model(1)
  mesh = _one_device()
  params = _placed(boxed, mesh)
  result = prune_model(cfg, params, state, tokens, PruneSettings(method=method,
                       sparsity=0.5, block_size=16, batch_size=4), mesh=mesh)
  rows = {r["name"]: r for r in result.layers}
  for i in range(cfg.num_layers):
    # the reference's inputs: the full model with blocks < i pruned, >= i dense
    mixed = {**params, **{f"block_{j}": result.params[f"block_{j}"] for j in range(i)}}
    inputs = _intermediates(cfg, mixed, state, tokens)[i]
    for name, x in inputs.items():
      w = _kernel2d(params, i, name)
      new = _kernel2d(result.params, i, name)
      if method == "wanda":
        keep = _wanda_ref(w, x, 0.5)
        assert np.mean(keep == (new != 0)) > 0.995, name
        np.testing.assert_array_equal(new[keep & (new != 0)], w[keep & (new != 0)])
        want = np.where(keep, w, 0)
      else:
        h = 2 / len(x) * x.T @ x
        want, _ = sparsegpt_prune(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                                  0.5, block_size=16)
        want = _np(want)
        assert np.mean((want != 0) == (new != 0)) > 0.99, name
      rel = np.sum((x @ (w - new)) ** 2) / np.sum((x @ w) ** 2)
      got = rows[f"block_{i}/{_group(name)}/{name}"]
      assert got["rel_error"] == pytest.approx(rel, rel=1e-3, abs=1e-7), name
      assert got["tokens"] == tokens.size
  assert summary(result)["sparsity"] == pytest.approx(0.5)
  # every linear, o_proj included, is pruned; norms and embeddings stay dense
  assert len(result.layers) == 7 * cfg.num_layers
  np.testing.assert_array_equal(_np(result.params["embedding"]), _np(params["embedding"]))


def test_rel_error_is_the_output_reconstruction_error():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
  w = rng.normal(size=(12, 5))
  w_new = np.where(rng.random(w.shape) < 0.5, 0, w)
  h = jnp.asarray(2 / 200 * x.T @ x, jnp.float32)
  want = np.sum((x @ (w - w_new)) ** 2) / np.sum((x @ w) ** 2)
  assert rel_error(jnp.asarray(w, jnp.float32), jnp.asarray(w_new, jnp.float32), h) == \
      pytest.approx(want, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method,nm", [("sparsegpt", None), ("wanda", (2, 4))])
def test_eight_devices_equal_one_device(method, nm):
  cfg, boxed, state, tokens = _model(3)
  settings = PruneSettings(method=method, sparsity=0.5, nm=nm, block_size=16,
                           batch_size=8)
  one = prune_model(cfg, _placed(boxed, _one_device()), state, tokens, settings,
                    mesh=_one_device())
  mesh8 = sharding.make_mesh(sharding.MeshConfig(data=4, tensor=2))
  params8 = _placed(boxed, mesh8)
  eight = prune_model(cfg, params8, state, tokens, settings, mesh=mesh8)
  q = eight.params["block_0"]["attention"]["q_proj"]["kernel"]
  assert q.sharding == params8["block_0"]["attention"]["q_proj"]["kernel"].sharding
  assert len(q.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    a, b = _np(a), _np(b)
    assert np.mean((a != 0) == (b != 0)) > 0.999
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_moe_experts_use_their_routed_tokens_and_unrouted_fall_back_to_magnitude():
  cfg, boxed, state, tokens = _model(4, ffn="moe", ffn_options=dict(
      num_experts=4, top_k=1, scoring="sigmoid"))
  bias = state["moe_state"]["block_0"]["ffn"]["bias"]
  state["moe_state"]["block_0"]["ffn"]["bias"] = bias.at[3].set(-1e3)  # 3: never routed
  mesh = _one_device()
  params = _placed(boxed, mesh)
  result = prune_model(cfg, params, state, tokens,
                       PruneSettings(method="wanda", sparsity=0.5, batch_size=8),
                       mesh=mesh)
  assert result.unrouted == ["block_0/ffn[3]"]
  x = _intermediates(cfg, params, state, tokens)[0]["gate_proj"]
  _, experts, _ = moe_ops.route(
      jnp.asarray(x @ _np(params["block_0"]["ffn"]["router"]), jnp.float32), 1,
      scoring="sigmoid", bias=state["moe_state"]["block_0"]["ffn"]["bias"])
  experts = np.asarray(experts)[:, 0]
  rows = {r["name"]: r for r in result.layers}
  for e in range(3):
    routed = x[experts == e]
    assert rows[f"block_0/ffn/w_gate[{e}]"]["tokens"] == len(routed) > 0
    w = _np(params["block_0"]["ffn"]["w_gate"][e])
    keep = _wanda_ref(w, routed, 0.5)
    new = _np(result.params["block_0"]["ffn"]["w_gate"][e])
    assert np.mean(keep == (new != 0)) > 0.995
  w3 = params["block_0"]["ffn"]["w_gate"][3]
  assert rows["block_0/ffn/w_gate[3]"]["method"] == "magnitude"
  np.testing.assert_array_equal(
      np.asarray(result.params["block_0"]["ffn"]["w_gate"][3] != 0),
      np.asarray(magnitude_mask(w3, 0.5, scope="layer")))


@pytest.mark.slow
def test_memory_values_and_embeddings_dense_unless_asked():
  cfg, boxed, state, tokens = _model(5, memory="pkm", memory_layers="0:1",
                                     memory_options=dict(num_keys=8, knn=4, heads=2))
  mesh = _one_device()
  params = _placed(boxed, mesh)
  base = PruneSettings(method="magnitude", sparsity=0.5, batch_size=8)
  plain = prune_model(cfg, params, state, tokens, base, mesh=mesh)
  np.testing.assert_array_equal(_np(plain.params["memory_0"]["values"]),
                                _np(params["memory_0"]["values"]))
  asked = prune_model(cfg, params, state, tokens, PruneSettings(
      method="magnitude", sparsity=0.5, batch_size=8, prune_memory_values=True,
      prune_embeddings=True), mesh=mesh)
  for key in (("memory_0", "values"), ("embedding",)):
    leaf = asked.params
    for k in key:
      leaf = leaf[k]
    assert float(jnp.mean(leaf == 0)) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("settings,match", [
    (dict(sparsity=1.0), "--sparsity"),
    (dict(sparsity=-0.1), "--sparsity"),
    (dict(sparsity=0.5, nm=(3, 2)), "--nm"),
    (dict(sparsity=0.5, nm=(2, 4), method="x"), "--method"),
])
def test_bad_settings(settings, match):
  with pytest.raises(ConfigError, match=match):
    PruneSettings(**settings).validate()


@pytest.mark.slow
def test_m_not_dividing_inputs_and_singular_hessian_name_the_field_and_layer():
  cfg, boxed, state, tokens = _model(6, d_model=36, num_heads=2, num_kv_heads=2, d_ff=48)
  mesh = _one_device()
  params = _placed(boxed, mesh)
  with pytest.raises(ConfigError, match=r"--nm.*block_0/attention/q_proj has 36"):
    prune_model(cfg, params, state, tokens,
                PruneSettings(method="wanda", sparsity=0.5, nm=(4, 8)), mesh=mesh)
  emb = params["embedding"].at[tokens[0, 0]].set(jnp.nan)
  with pytest.raises(ConfigError, match="block_0/attention/q_proj.*positive definite|"
                     "block_0/attention/q_proj.*NaN"):
    prune_model(cfg, {**params, "embedding": emb}, state, tokens,
                PruneSettings(method="sparsegpt"), mesh=mesh)
  assert not np.isnan(_np(params["embedding"])).any()   # the input is untouched


def test_calibration_windows_are_seeded_slices_and_short_text_fails():
  tokens = np.arange(1000)
  a = calibration_windows(tokens, 5, 64, seed=3)
  assert a.shape == (5, 64) and a.dtype == np.int32
  np.testing.assert_array_equal(a, calibration_windows(tokens, 5, 64, seed=3))
  assert not np.array_equal(a, calibration_windows(tokens, 5, 64, seed=4))
  for row in a:   # contiguous slices inside the text
    np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 64))
    assert row[-1] < 1000
  assert len(calibration_windows(tokens[:64], 3, 64, seed=0)) == 3   # exactly one fits
  with pytest.raises(ConfigError, match="at least one sequence"):
    calibration_windows(tokens[:63], 1, 64, seed=0)


def test_score_tokens_matches_a_numpy_loop():
  rng = np.random.default_rng(7)
  table = rng.normal(size=(256, 256)).astype(np.float32)
  tokens = rng.integers(0, 256, 100)
  apply_fn = lambda v, x: v[x]            # logits of the next token: a bigram table
  got = score_tokens(apply_fn, jnp.asarray(table), tokens, seq_len=16, batch_size=3)
  logp = table - np.log(np.sum(np.exp(table.astype(np.float64)), -1, keepdims=True))
  want = -np.mean([logp[tokens[t], tokens[t + 1]] for t in range(99)])
  assert got["tokens"] == 99 and got["nll"] == pytest.approx(want, rel=1e-5)
