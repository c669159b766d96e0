"""load_hf / save_hf against checkpoints and logits written by transformers itself
(tests/fixtures/hf, made by make_fixtures.py; torch is not needed here)."""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from sparsejax import sharding
from sparsejax.interop import HFCheckpointError, HFConfigError, load_hf, save_hf
from sparsejax.models import DecoderLM
from sparsejax.ops import attention as attention_ops
from sparsejax.train import generate

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")
FAMILIES = ("llama", "mistral_sharded", "qwen2_bf16", "mixtral", "mixtral_fused")
TOL = 1e-4


def fixture(name):
  return os.path.join(FIXTURES, name)


def reference(name):
  ref = np.load(os.path.join(fixture(name), "logits.npz"))
  return ref["tokens"], ref["logits"]


def logits_of(cfg, params, tokens):
  """Params alone are the model's variables: Mixtral's softmax routing without bias
  updates has no "moe_state"."""
  return np.asarray(DecoderLM(cfg).apply({"params": params}, tokens))


def tensors_of(path):
  """{name: array} of every safetensors file in a checkpoint directory."""
  out = {}
  for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
    with safe_open(os.path.join(path, file), "np") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name):
  cfg, params = load_hf(fixture(name))
  tokens, want = reference(name)
  got = logits_of(cfg, params, tokens)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  assert np.abs(want).max() > 1.0   # the fixtures' logits are far from trivial


def test_fixtures_cover_the_formats():
  assert os.path.exists(os.path.join(fixture("mistral_sharded"),
                                     "model.safetensors.index.json"))
  qwen = tensors_of(fixture("qwen2_bf16"))
  assert "lm_head.weight" not in qwen and "model.layers.0.self_attn.q_proj.bias" in qwen
  assert {t.dtype.name for t in qwen.values()} == {"bfloat16"}
  assert "model.layers.0.mlp.experts.gate_up_proj" in tensors_of(fixture("mixtral_fused"))
  assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in tensors_of(
      fixture("mixtral"))
  with open(os.path.join(fixture("llama"), "config.json")) as f:
    assert json.load(f)["rope_parameters"]["rope_type"] == "llama3"


def test_wrong_rope_permutation_fails_the_logits_test():
  """Interleaved RoPE pairs (a q/k column permutation) give plausible, wrong logits."""
  cfg, params = load_hf(fixture("llama"))
  tokens, want = reference("llama")
  dh = cfg.resolved_head_dim
  interleave = np.stack([np.arange(dh // 2), np.arange(dh // 2) + dh // 2], 1).ravel()
  attn = params["block_0"]["attention"]
  for proj in ("q_proj", "k_proj"):
    attn[proj]["kernel"] = attn[proj]["kernel"][..., interleave]
  assert np.abs(logits_of(cfg, params, tokens) - want).max() > 100 * TOL


@pytest.mark.parametrize("name,dtype", [("qwen2_bf16", jnp.bfloat16),
                                        ("mixtral_fused", jnp.bfloat16),
                                        ("mistral_sharded", jnp.float32)])
def test_save_load_round_trip_is_bitwise(tmp_path, name, dtype):
  cfg, params = load_hf(fixture(name), dtype=dtype)
  flat = traverse_util.flatten_dict(params, sep="/")
  kernel = "block_1/attention/o_proj/kernel"       # prune: exact zeros must survive
  flat[kernel] = jnp.where(jnp.abs(flat[kernel]) < jnp.median(jnp.abs(flat[kernel])),
                           0, flat[kernel]).astype(dtype)
  params = traverse_util.unflatten_dict(flat, sep="/")
  out = str(tmp_path / "out")
  save_hf(out, cfg, params, like=fixture(name), max_shard_size=40_000)
  cfg2, params2 = load_hf(out, dtype=dtype)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # The files hold the original tensors bitwise (same names and layout), the pruned
  # one aside; the tokenizer came along.
  original, written = tensors_of(fixture(name)), tensors_of(out)
  assert sorted(written) == sorted(original)
  for key, value in original.items():
    if "layers.1.self_attn.o_proj" not in key:
      np.testing.assert_array_equal(written[key], value.astype(dtype), err_msg=key)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_save_without_like_picks_the_architecture(tmp_path):
  cfg, params = load_hf(fixture("qwen2_bf16"))
  save_hf(str(tmp_path / "q"), cfg, params)
  with open(tmp_path / "q" / "config.json") as f:
    written = json.load(f)
  assert written["architectures"] == ["Qwen2ForCausalLM"]
  assert written["rope_theta"] == cfg.rope_theta and written["torch_dtype"] == "float32"
  cfg2, params2 = load_hf(str(tmp_path / "q"))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(FileExistsError):
    save_hf(str(tmp_path / "q"), cfg, params)


@pytest.mark.slow
def test_cached_decoding_matches_transformers():
  cfg, params = load_hf(fixture("mixtral"))
  tokens, want = reference("mixtral")
  model = DecoderLM(cfg)
  variables = {"params": params}
  cache = generate.init_cache(model, tokens.shape[0], tokens.shape[1])
  prefill = 4
  logits, cache = generate.decode_step(model, variables, cache, tokens[:, :prefill])
  steps = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = generate.decode_step(model, variables, cache, tokens[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), want, rtol=0, atol=TOL)


@pytest.mark.slow
def test_mesh_loading_shards_params_and_keeps_logits():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
  cfg, params = load_hf(fixture("mixtral"), mesh=mesh)
  w_gate = params["block_0"]["ffn"]["w_gate"]
  assert w_gate.sharding.spec == P("expert", "fsdp", "tensor")
  assert w_gate.addressable_shards[0].data.shape == (2, 16, 8)
  assert params["block_0"]["attention"]["q_proj"]["kernel"].sharding.spec == P(
      "fsdp", "tensor", None)
  tokens, want = reference("mixtral")
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    got = jax.jit(DecoderLM(cfg).apply)({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=TOL)


def copy_fixture(tmp_path, name, edit_config=None):
  out = tmp_path / name
  shutil.copytree(fixture(name), out)
  if edit_config is not None:
    with open(out / "config.json") as f:
      config = json.load(f)
    edit_config(config)
    with open(out / "config.json", "w") as f:
      json.dump(config, f)
  return str(out)


def test_transformers4_config_style_loads_the_same(tmp_path):
  def v4(config):
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config["torch_dtype"] = config.pop("dtype")
  cfg, _ = load_hf(copy_fixture(tmp_path, "llama", v4))
  assert cfg == load_hf(fixture("llama"))[0]


@pytest.mark.parametrize("edit,field", [
    (lambda c: c.update(architectures=["GemmaForCausalLM"]), "architectures"),
    (lambda c: c.update(sliding_window=16), "sliding_window"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn"), "rope_parameters.rope_type"),
    (lambda c: c.update(some_new_feature=3), "some_new_feature"),
])
def test_unsupported_configs_name_the_field(tmp_path, edit, field):
  with pytest.raises(HFConfigError, match=f"{field}="):
    load_hf(copy_fixture(tmp_path, "llama", edit))


def test_bad_tensors_name_the_tensor(tmp_path):
  path = copy_fixture(tmp_path, "llama", lambda c: c.update(intermediate_size=48))
  with pytest.raises(HFCheckpointError, match=r"model.layers.0.mlp.gate_proj.weight.*"
                                              r"\(64, 32\).*\(48, 32\)"):
    load_hf(path)
  path = copy_fixture(tmp_path, "mixtral")
  file = os.path.join(path, "model.safetensors")
  tensors = tensors_of(path)
  del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
  tensors["model.layers.0.extra.weight"] = np.zeros(2, np.float32)
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(HFCheckpointError, match="missing tensor 'model.layers.1.block_"
                                              "sparse_moe.experts.2.w3.weight'"):
    load_hf(path)
  tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"] = np.zeros((16, 32))
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(HFCheckpointError, match="unexpected tensor 'model.layers.0.extra"):
    load_hf(path)


def test_export_refuses_what_hf_cannot_represent(tmp_path):
  cfg, params = load_hf(fixture("llama"))
  bad = cfg.__class__(**{**cfg.__dict__, "attention": "block_sparse"})
  with pytest.raises(HFConfigError, match="config.model: attention='block_sparse'"):
    save_hf(str(tmp_path / "x"), bad, params)
  with pytest.raises(HFConfigError, match="qkv_bias"):
    save_hf(str(tmp_path / "x"), cfg, params, like=fixture("qwen2_bf16"))
  shrunk = cfg.__class__(**{**cfg.__dict__,
                            "d_ff_per_layer": (cfg.resolved_d_ff,) * cfg.num_layers})
  with pytest.raises(HFConfigError, match="d_ff_per_layer=.*must be empty"):
    save_hf(str(tmp_path / "x"), shrunk, params)
  assert not os.path.exists(tmp_path / "x")


def test_linear_rope_scaling(tmp_path, rng_seed):
  """Position interpolation: scaling frequencies by 1/f = rotating at positions p / f."""
  x = jax.random.normal(jax.random.key(rng_seed), (2, 6, 3, 8))
  positions = jnp.broadcast_to(jnp.arange(6) * 4, (2, 6))
  scaled = attention_ops.rope(x, positions, 1e4, attention_ops.RopeScaling("linear", 4.0))
  np.testing.assert_allclose(scaled, attention_ops.rope(x, positions // 4, 1e4),
                             atol=1e-5)
  linear = dict(rope_type="linear", factor=2.0, rope_theta=500.0)
  cfg, _ = load_hf(copy_fixture(tmp_path, "llama",
                                lambda c: c.update(rope_parameters=linear)))
  assert (cfg.rope_theta, dict(cfg.rope_scaling)) == (
      500.0, {"rope_type": "linear", "factor": 2.0})
