"""The "nsa" attention entry: the model trains (forward + backward), its options are
validated, and cached decoding reproduces the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import sharding
from sparsejax.layers import registry
from sparsejax.models.config import parse_model_config
from sparsejax.models.transformer import DecoderLM
from sparsejax.train import generate as gen
from sparsejax.validation import ConfigError

# T = 32: 4 selection blocks of 8, n = 3 of them, window 6: every branch is sparse.
OPTIONS = dict(block_len=8, stride=4, select_block=8, num_selected=3, window=6,
               window_impl="xla")


def _model(**options):
  return DecoderLM(parse_model_config(dict(
      d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, attention="nsa",
      attention_options={**OPTIONS, **options})))


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(), dict(shared_kv=True, compress="mean")],
                         ids=["mlp", "shared_mean"])
def test_nsa_model_trains_and_cached_decode_matches_forward(rng_seed, options):
  model = _model(**options)
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 32), 0, 256)
  variables = sharding.unbox(jax.jit(model.init)(jax.random.key(rng_seed), tokens))
  params = variables["params"]["block_0"]["attention"]
  assert ("k_cmp_proj" in params) != options.get("shared_kv", False)
  assert ("phi_k" in params) == (options.get("compress", "mlp") == "mlp")

  def loss_fn(p):
    logits = model.apply({**variables, "params": p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                           tokens[:, 1:]).mean()
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  assert np.isfinite(loss)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  attn_grads = grads["block_1"]["attention"]
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(attn_grads))

  logits = jax.jit(model.apply)(variables, tokens)
  cache = gen.init_cache(model, 2, 32)
  step = jax.jit(lambda c, t: gen.decode_step(model, variables, c, t))
  out, cache = step(cache, tokens[:, :13])           # prefill, then 1 by 1
  outs = [out]
  for i in range(13, 32):
    out, cache = step(cache, tokens[:, i:i + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), logits, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("field,value", [("block_len", 0), ("stride", 9),
                                         ("num_selected", 0), ("window", 0),
                                         ("compress", "max"), ("num_local", -1),
                                         ("window_impl", "triton"),
                                         ("window_impl", "reference"),
                                         ("selection_impl", "triton")])
def test_nsa_options_are_validated(field, value):
  with pytest.raises(ConfigError, match=rf"config\.model\.attention_options\.{field}"):
    parse_model_config(dict(attention="nsa", attention_options={
        **OPTIONS, field: value})).validate()


@pytest.mark.slow
def test_sequences_shorter_than_a_compression_block_train_and_decode(rng_seed):
  """T = 6 < block_len = 8 (no compressed block): the model trains, and a 2-token
  prefill then 1-token steps (each shorter than a block) reproduce the forward."""
  model = _model()
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 6), 0, 256)
  variables = sharding.unbox(jax.jit(model.init)(jax.random.key(rng_seed), tokens))
  loss = lambda p: model.apply({**variables, "params": p}, tokens).astype(jnp.float32).std()
  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  logits = jax.jit(model.apply)(variables, tokens)
  cache = gen.init_cache(model, 2, 6)
  step = jax.jit(lambda c, t: gen.decode_step(model, variables, c, t))
  out, cache = step(cache, tokens[:, :2])
  outs = [out]
  for i in range(2, 6):
    out, cache = step(cache, tokens[:, i:i + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), logits, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_nsa_layer_applies_the_models_rope_scaling(rng_seed):
  """With linear RoPE scaling factor f (Hugging Face Llama checkpoints) the layer
  rotates q and the selection / window keys at positions / f: it equals the unscaled
  layer at float positions p / f (and differs from it at p). cmp_rope=False keeps
  the compressed keys' rotation (tested in tests/ops/test_nsa.py) out of it."""
  def layer(**model):
    cfg = parse_model_config(dict(d_model=32, num_heads=4, num_kv_heads=2,
                                  attention="nsa", init_std=0.5, **model))  # peaked
    return registry.build("attention", "nsa", cfg, {**OPTIONS, "cmp_rope": False}, 0)

  scaled = layer(rope_scaling=dict(rope_type="linear", factor=4.0))
  plain = layer()
  x = jax.random.normal(jax.random.key(rng_seed), (2, 32, 32))
  positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
  params = plain.init(jax.random.key(rng_seed), x, positions)
  got = scaled.apply(params, x, positions)
  np.testing.assert_allclose(got, plain.apply(params, x, positions / 4.0), rtol=1e-5,
                             atol=1e-5)
  unscaled = plain.apply(params, x, positions)
  assert np.abs(got - unscaled).max() > 0.05 * np.abs(got).max()
