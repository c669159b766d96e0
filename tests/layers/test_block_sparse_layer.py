"""The "block_sparse" attention entry: the model trains with the structured mask and its
cached decoding reproduces the full forward, for every pattern."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.layers.attention import BlockSparseOptions
from sparsejax.models.config import parse_model_config
from sparsejax.models.transformer import DecoderLM
from sparsejax.train import generate as gen
from sparsejax.validation import ConfigError

PATTERNS = [dict(pattern="local", window=5), dict(pattern="local_global", window=4,
                                                  num_global=3),
            dict(pattern="strided", window=3, stride=4), dict(pattern="chunked", window=8)]


def _model(options):
  return DecoderLM(parse_model_config(dict(
      d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, attention="block_sparse",
      attention_options=dict(block_q=8, block_kv=8, impl="xla", **options))))


def _dense_masked_logits(model, variables, tokens, options):
  """The same model with the op swapped for dense attention under mask.dense."""
  t = tokens.shape[1]
  dense_mask = jnp.asarray(BlockSparseOptions(**options).mask().dense(t, t))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr("sparsejax.layers.attention.block_sparse_attention",
               lambda q, k, v, mask, **kw: jax.nn.dot_product_attention(q, k, v,
                                                                       mask=dense_mask))
    return model.apply(variables, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("options", PATTERNS, ids=lambda o: o["pattern"])
def test_block_sparse_model_matches_dense_masked_attention_and_decodes(rng_seed, options):
  model = _model(options)
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 16), 0, 256)
  variables = sharding.unbox(jax.jit(model.init)(jax.random.key(rng_seed), tokens))
  logits = jax.jit(model.apply)(variables, tokens)
  want = _dense_masked_logits(model, variables, tokens, options)
  np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-5)
  causal = DecoderLM(dataclasses.replace(model.cfg, attention="mha", attention_options={}))
  assert not np.allclose(want, causal.apply(variables, tokens), atol=1e-3)  # mask matters

  # prefill 5 tokens, then decode the rest one by one: same logits as the full forward
  cache = gen.init_cache(model, 2, 16)
  step = jax.jit(lambda c, t: gen.decode_step(model, variables, c, t))
  out, cache = step(cache, tokens[:, :5])
  outs = [out]
  for i in range(5, 16):
    out, cache = step(cache, tokens[:, i:i + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), logits, rtol=2e-4, atol=2e-5)


def test_default_blocks_are_picked_by_the_op(rng_seed, monkeypatch):
  """block_q = block_kv = 0 (the default) hands None to the op, which picks the
  platform's blocks (the whole 16-token sequence here); logits equal dense attention
  under the mask."""
  assert (BlockSparseOptions().block_q, BlockSparseOptions().block_kv) == (0, 0)
  options = dict(pattern="local_global", window=4, num_global=3)
  model = DecoderLM(parse_model_config(dict(
      d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, attention="block_sparse",
      attention_options=dict(impl="xla", **options))))
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 16), 0, 256)
  variables = sharding.unbox(jax.jit(model.init)(jax.random.key(rng_seed), tokens))
  import sparsejax.ops.sparse_attention as bsa_ops
  seen = []
  xla = bsa_ops._xla_attention
  monkeypatch.setattr(bsa_ops, "_xla_attention", lambda *a, **kw: seen.append(kw) or xla(
      *a, **kw))
  logits = jax.jit(model.apply)(variables, tokens)
  assert [(kw["block_q"], kw["block_kv"]) for kw in seen] == [(16, 16)]
  want = _dense_masked_logits(model, variables, tokens, options)
  np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-5)


def test_block_sparse_options_are_validated():
  with pytest.raises(ConfigError, match=r"config\.model\.attention_options\.block_q"):
    parse_model_config(dict(attention="block_sparse",
                            attention_options=dict(block_q=-1))).validate()
  with pytest.raises(ConfigError, match=r"config\.model\.attention_options\.pattern"):
    parse_model_config(dict(attention="block_sparse",
                            attention_options=dict(pattern="diagonal"))).validate()
  with pytest.raises(ConfigError, match=r"config\.model\.attention_options\.window"):
    parse_model_config(dict(attention="block_sparse",
                            attention_options=dict(window=0))).validate()


@pytest.mark.slow
def test_block_that_does_not_tile_the_sequence_shrinks(rng_seed):
  """T = 12 with 8-blocks runs with gcd(12, 8) = 4-blocks: same logits as dense
  attention under the mask (no error for a sequence length the blocks do not tile)."""
  from sparsejax.layers.attention import fit_block
  assert (fit_block(8, 12), fit_block(8, 16), fit_block(64, 40), fit_block(8, 0)) == (
      4, 8, 40, 8)
  assert fit_block(0, 12) is None                       # 0: the op picks by platform
  options = PATTERNS[1]
  model = _model(options)
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 12), 0, 256)
  variables = sharding.unbox(jax.jit(model.init)(jax.random.key(rng_seed), tokens))
  logits = jax.jit(model.apply)(variables, tokens)
  want = _dense_masked_logits(model, variables, tokens, options)
  np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-5)
