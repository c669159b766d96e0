"""Export of a trained BitNet run to packed ternary weights (sparsejax.train.export) and
BitDense(weights="ternary"): the loaded model's logits equal the fake-quantized model's
bitwise; the size report matches the packed layout."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.layers.sparse_dense import BitDense
from sparsejax.models import DecoderLM, parse_model_config
from sparsejax.ops.quant import ternary_quantize
from sparsejax.sharding import unbox
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.config import config_to_dict, parse_config
from sparsejax.train.export import (export_ternary, load_ternary, read_manifest,
                                    ternary_model_config)
from sparsejax.train.trainer import Trainer, train
from sparsejax.validation import ConfigError
from conftest import tiny_config_dict

TINY_MODEL = dict(num_layers=1, d_ff=64)
PER_BYTE = {"base3": 5, "2bit": 4}


def flatten(tree, prefix=""):
  if hasattr(tree, "items"):
    return {k2: v2 for k, v in tree.items()
            for k2, v2 in flatten(v, f"{prefix}/{k}" if prefix else k).items()}
  return {prefix: tree}


def fresh_tokens(seed, vocab, shape=(2, 12)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, tokens):
  return model.apply(variables, tokens, mutable=["metrics"])


def logits_and_metrics(model, variables, tokens):
  """Jitted forward (the same way for both models) -> (logits, sown metrics)."""
  logits, sown = forward(model, variables, tokens)
  return np.asarray(logits), jax.device_get(flatten(sown.get("metrics", {})))


@pytest.fixture(scope="module")
def bitnet_run(tmp_path_factory):
  """A 2-step BitNet training run: (workdir, host params, config)."""
  workdir = str(tmp_path_factory.mktemp("bitnet_run"))
  config = parse_config(tiny_config_dict(
      model=dict(linear="bitnet", **TINY_MODEL), data=dict(seq_len=16),
      train=dict(num_steps=2, eval_every=0, eval_batches=1, checkpoint_every=0)))
  result = train(config, workdir)
  return workdir, jax.device_get(result.state.params), config


@pytest.mark.slow
@pytest.mark.parametrize("format,use_checkpoint_dir", [("base3", False), ("2bit", True)])
def test_export_load_gives_identical_logits(bitnet_run, tmp_path, rng_seed, format,
                                            use_checkpoint_dir):
  workdir, params, config = bitnet_run
  source = os.path.join(workdir, "checkpoints") if use_checkpoint_dir else workdir
  out = str(tmp_path / "export")
  report = export_ternary(source, out, format=format)
  model, variables = load_ternary(out)

  tokens = fresh_tokens(rng_seed, config.model.vocab_size)
  want, _ = logits_and_metrics(DecoderLM(config.model), {"params": params}, tokens)
  got, _ = logits_and_metrics(model, variables, tokens)
  np.testing.assert_array_equal(got, want)
  assert np.all(np.isfinite(got)) and np.std(got) > 0

  # The variables: packed kernels became codes/scale = ternary_quantize(kernel); the rest
  # is the trained params unchanged.
  latent, loaded = flatten(params), flatten(variables["params"])
  kernels = {k: v for k, v in latent.items() if k.endswith("/kernel")}
  assert len(kernels) == 7 * config.model.num_layers          # q k v o gate up down
  assert not any(k.endswith("/kernel") for k in loaded)
  for name, kernel in kernels.items():
    codes, scale = jax.jit(ternary_quantize)(kernel)
    module = name.rsplit("/", 1)[0]
    assert loaded[f"{module}/codes"].dtype == jnp.int8
    np.testing.assert_array_equal(loaded[f"{module}/codes"], codes)
    np.testing.assert_array_equal(loaded[f"{module}/scale"], scale)
  for name, value in latent.items():
    if name not in kernels:
      np.testing.assert_array_equal(loaded[name], value)

  # The size report against the packed layout, computed independently.
  k = PER_BYTE[format]
  num = sum(v.size for v in kernels.values())
  packed = sum(-(-v.size // k) + 4 for v in kernels.values())   # + one f32 scale each
  assert report["num_linear_weights"] == num
  assert report["latent_linear"] == 4 * num
  assert report["export_linear"] == packed
  assert report["latent_total"] == sum(v.nbytes for v in latent.values())
  assert report["export_total"] == report["latent_total"] - 4 * num + packed
  assert report["ratio_linear"] == pytest.approx(4 * num / packed)
  assert report["ratio_linear"] >= (10 if format == "base3" else 8)
  assert 8 / k <= report["export_bits_per_weight"] < 8 / k + 0.1
  assert report["export_file_bytes"] == os.path.getsize(os.path.join(out, "weights.npz"))

  manifest = read_manifest(out)
  assert manifest["format"] == format and manifest["step"] == 2
  assert manifest["config"]["model"]["linear_options"] == {"weights": "ternary"}
  some = next(iter(kernels)).rsplit("/", 1)[0]
  assert manifest["tensors"][f"params/{some}/codes"]["kind"] == "packed_ternary"
  assert manifest["tensors"]["params/embedding"]["dtype"] == "float32"


def test_bitnet_qsparse_bfloat16_export(tmp_path, rng_seed):
  """bitnet_qsparse with bf16 params/compute, from a checkpoint of random latent params
  (no training: the export only needs a checkpoint); sown sparsity is equal too."""
  config = parse_config(tiny_config_dict(
      model=dict(linear="bitnet_qsparse", ffn="relu2_glu", tie_embeddings=False,
                 dtype="bfloat16", param_dtype="bfloat16",
                 linear_options=dict(topk_ratio=0.5), **TINY_MODEL),
      data=dict(seq_len=16)))
  rng = np.random.default_rng(rng_seed)
  fill = lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)  # opt state too
  state = jax.tree.map(fill, Trainer(config).abstract_state)   # no init compile needed
  params = state.params
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
  ckpt.save(7, state, {}, config_to_dict(config))
  ckpt.wait()
  ckpt.close()

  out = str(tmp_path / "export")
  report = export_ternary(str(tmp_path / "run"), out, verbose=False)
  model, variables = load_ternary(out)
  assert model.cfg.linear_options["weights"] == "ternary"
  assert model.cfg.linear_options["topk_ratio"] == 0.5
  assert variables["params"]["lm_head"].dtype == jnp.bfloat16

  tokens = fresh_tokens(rng_seed, config.model.vocab_size)
  want, want_metrics = logits_and_metrics(DecoderLM(config.model),
                                          {"params": jax.device_get(params)}, tokens)
  got, got_metrics = logits_and_metrics(model, variables, tokens)
  np.testing.assert_array_equal(got, want)
  assert set(got_metrics) == set(want_metrics) and len(got_metrics) == 7
  for name in want_metrics:
    np.testing.assert_array_equal(got_metrics[name], want_metrics[name])
  # bf16 latent kernels: 16 bits -> ~1.6
  assert report["latent_bits_per_weight"] == 16 and report["ratio_linear"] > 5
  assert read_manifest(out)["tensors"]["params/embedding"]["dtype"] == "bfloat16"


def test_bit_dense_ternary_weights_equal_latent_bitwise(rng_seed):
  """A q_proj-like layer in bf16 (the models above cover f32, o_proj and qsparse)."""
  qsparse, contract_dims, param_dtype = False, 1, "bfloat16"
  features, axes = (2, 4), ("embed", "heads", "head_dim")
  rng = np.random.default_rng(rng_seed)
  x_shape = (2, 5, 4, 8) if contract_dims == 2 else (2, 5, 16)
  x = jnp.asarray(3.0 * rng.standard_normal(x_shape), jnp.float32)
  in_dims = x_shape[len(x_shape) - contract_dims:]
  kernel = jnp.asarray(0.05 * rng.standard_normal((*in_dims, *features)), param_dtype)
  kw = dict(qsparse=qsparse, topk_ratio=0.5, param_dtype=param_dtype, dtype=param_dtype)
  latent = BitDense(features, axes, contract_dims, **kw)
  ternary = BitDense(features, axes, contract_dims, weights="ternary", **kw)

  boxed = jax.eval_shape(ternary.init, jax.random.key(0), x)["params"]
  assert boxed["codes"].names == axes and boxed["scale"].names == ()
  shapes = unbox(boxed)
  assert (shapes["codes"].shape, shapes["codes"].dtype) == (kernel.shape, jnp.int8)
  assert (shapes["scale"].shape, shapes["scale"].dtype) == ((), jnp.float32)

  codes, scale = jax.jit(ternary_quantize)(kernel)
  y_latent = jax.jit(latent.apply)({"params": {"kernel": kernel}}, x)
  y_ternary = jax.jit(ternary.apply)({"params": {"codes": codes, "scale": scale}}, x)
  assert y_latent.dtype == jnp.dtype(param_dtype)
  np.testing.assert_array_equal(y_ternary, y_latent)

  init = unbox(jax.jit(ternary.init)(jax.random.key(rng_seed), x))["params"]  # usable
  assert set(np.unique(init["codes"])) == {-1, 0, 1} and float(init["scale"]) > 0


def test_errors(tmp_path):
  with pytest.raises(ValueError,
                     match=r"needs a BitNet run: config\.model\.linear='dense'"):
    ternary_model_config(parse_config(tiny_config_dict()))
  with pytest.raises(FileNotFoundError, match="neither a training workdir"):
    export_ternary(str(tmp_path / "missing"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    export_ternary(str(tmp_path / "empty"), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="format='4bit' must be one of"):
    export_ternary(str(tmp_path / "empty"), str(tmp_path / "out"), format="4bit")
  with pytest.raises(FileNotFoundError, match="not a .*ternary export"):
    load_ternary(str(tmp_path / "empty"))
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "manifest.json").write_text(json.dumps({"format_version": 0}))
  with pytest.raises(ValueError, match="format_version=0"):
    load_ternary(str(tmp_path / "old"))
  for linear in ("bitnet", "bitnet_qsparse"):
    with pytest.raises(ConfigError,
                       match=r"config\.model\.linear_options\.weights='int4'"):
      parse_model_config({"linear": linear, "linear_options": {"weights": "int4"}})
  with pytest.raises(ValueError, match=r"'proj': weights='int4' must be one of"):
    x = jnp.ones((2, 4))
    jax.eval_shape(BitDense((3,), ("embed", "mlp"), weights="int4", name="proj").init,
                   jax.random.key(0), x)
