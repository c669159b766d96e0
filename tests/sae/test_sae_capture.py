"""Activation capture and splicing at named sites of a DecoderLM, checked against the
model's own intermediates (flax `capture_intermediates`) and exact consequences."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.interop.hf import load_hf, save_hf
from sparsejax.models import DecoderLM
from sparsejax.layers.norm import RMSNorm
from sparsejax.models.config import ModelConfig
from sparsejax.models.transformer import Block
from sparsejax.sae import capture
from sparsejax.validation import ConfigError

CFG = ModelConfig(vocab_size=256, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2)


def _model(cfg=CFG, seed=0):
  model = DecoderLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (2, 8)), jnp.int32)
  return model, model.init(jax.random.key(seed), tokens), tokens


@pytest.mark.slow
def test_site_names_and_unknown_site_lists_the_valid_ones():
  assert capture.site_names(CFG) == ("resid_0", "resid_1", "resid_2", "ffn_in_0",
                                     "ffn_in_1", "ffn_in_2")
  with pytest.raises(ConfigError, match=r"config\.source\.site='resid_3'.*resid_0, "
                                        r"resid_1, resid_2, ffn_in_0"):
    capture.check_site(CFG, "resid_3", "config.source.site")
  model, variables, tokens = _model()
  with pytest.raises(ConfigError, match="memory_in_0"):
    capture.run_at_site(model, variables, tokens, "memory_in_0")


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_captures_equal_the_blocks_intermediates(rng_seed, remat):
  cfg = dataclasses.replace(CFG, remat=remat)
  model, variables, tokens = _model(cfg, rng_seed % 1000)
  logits, inter = model.apply(variables, tokens, capture_intermediates=True,
                              mutable=["intermediates"])
  blocks = [inter["intermediates"][f"block_{i}"]["__call__"][0] for i in range(3)]
  for i, (out, ffn_in) in enumerate(blocks):
    got_logits, resid = capture.run_at_site(model, variables, tokens, f"resid_{i}")
    _, got_ffn = capture.run_at_site(model, variables, tokens, f"ffn_in_{i}")
    np.testing.assert_allclose(resid, out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_ffn, ffn_in, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_splicing_identity_keeps_logits_and_zeroing_the_last_residual_is_uniform():
  model, variables, tokens = _model()
  clean = model.apply(variables, tokens)
  for site in capture.site_names(CFG):
    same, _ = capture.run_at_site(model, variables, tokens, site, lambda x: x)
    np.testing.assert_allclose(same, clean, rtol=1e-6, atol=1e-6)
  # RMSNorm(0) = 0 -> all-zero logits -> CE = log(vocab)
  batch = {"inputs": tokens, "targets": tokens}
  losses = capture.spliced_losses(model, variables, batch, "resid_2", jnp.zeros_like)
  np.testing.assert_allclose(losses["ce_zero"], math.log(256), rtol=1e-6)
  np.testing.assert_allclose(losses["ce_sae"], math.log(256), rtol=1e-6)
  # splicing a perturbed residual after block 0 = running the later blocks on it
  _, resid0 = capture.run_at_site(model, variables, tokens, "resid_0")
  delta = jnp.asarray(np.random.default_rng(1).normal(size=resid0.shape), jnp.float32)
  got, _ = capture.run_at_site(model, variables, tokens, "resid_0", lambda x: x + delta)
  assert float(jnp.abs(got - clean).max()) > 1e-3
  # ... and the same as embedding-free re-entry: blocks 1, 2 and the head on resid_0+δ
  params = nn.unbox(variables)["params"]
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  h = resid0 + delta
  for i in (1, 2):
    h, _ = Block(CFG, i).apply({"params": params[f"block_{i}"]}, h, positions)
  h = RMSNorm(CFG.norm_eps).apply({"params": params["final_norm"]}, h)
  want = jnp.einsum("btd,vd->btv", h, params["embedding"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ffn_input_splice_zero_equals_removing_that_ffn():
  """Zeroing ffn_in_1 = block 1's FFN contributing 0 (SwiGLU without biases maps 0 to
  0), i.e. the model with block 1's down projection set to 0."""
  model, variables, tokens = _model()
  variables = nn.unbox(variables)
  zeroed, _ = capture.run_at_site(model, variables, tokens, "ffn_in_1", jnp.zeros_like)
  params = jax.tree.map(lambda a: a, variables["params"])
  ffn = params["block_1"]["ffn"]["down_proj"]
  ffn["kernel"] = jnp.zeros_like(ffn["kernel"])
  want = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(zeroed, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(want - model.apply(variables, tokens)).max()) > 1e-4


@pytest.mark.slow
def test_memory_input_site_is_the_source_blocks_ffn_input():
  cfg = dataclasses.replace(CFG, memory="pkm", memory_layers="1:1",
                            memory_options={"heads": 2, "knn": 4, "num_keys": 8,
                                            "kdim": 16, "impl": "xla"})
  model, variables, tokens = _model(cfg)
  assert capture.site_names(cfg)[-1] == "memory_in_0"
  _, mem_in = capture.run_at_site(model, variables, tokens, "memory_in_0")
  _, ffn_in = capture.run_at_site(model, variables, tokens, "ffn_in_1")
  np.testing.assert_array_equal(mem_in, ffn_in)
  clean = model.apply(variables, tokens)
  spliced, _ = capture.run_at_site(model, variables, tokens, "memory_in_0",
                                   lambda x: jnp.roll(x, 1, axis=-1))
  assert float(jnp.abs(spliced - clean).max()) > 1e-5


def test_activation_stream_is_lazy_one_batch_at_a_time():
  model, variables, tokens = _model()
  pulled = []

  def batches():
    for i in range(1000):
      pulled.append(i)
      yield {"inputs": np.roll(np.asarray(tokens), i, axis=1)}

  stream = capture.activation_stream(model, variables, batches(), "resid_1")
  first, second = next(stream), next(stream)
  assert pulled == [0, 1]
  assert first.shape == (16, 32) and first.dtype == jnp.float32
  _, want = capture.run_at_site(model, variables, jnp.roll(tokens, 1, axis=1), "resid_1")
  np.testing.assert_allclose(second, want.reshape(16, 32), rtol=1e-6, atol=1e-6)


def test_hugging_face_model_sites(tmp_path):
  model, variables, tokens = _model()
  save_hf(str(tmp_path / "hf"), CFG, variables["params"])
  cfg, params = load_hf(str(tmp_path / "hf"))
  hf_model = DecoderLM(cfg)
  _, got = capture.run_at_site(hf_model, {"params": params}, tokens, "ffn_in_2")
  _, want = capture.run_at_site(model, variables, tokens, "ffn_in_2")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
