"""KV-cache decoding equals the full forward; sampling rules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models import DecoderLM, parse_model_config
from sparsejax.sharding import unbox
from sparsejax.train import generate as gen


_MODEL = DecoderLM(parse_model_config(dict(d_model=32, num_layers=2, num_heads=4,
                                            num_kv_heads=2)))
# Jitted: one XLA program per shape instead of op-by-op dispatch, which compiles every
# primitive of the model separately for each new sequence length.
_init = jax.jit(_MODEL.init)
_forward = jax.jit(_MODEL.apply)


@pytest.fixture
def model_vars(rng_seed):
  tokens = jax.random.randint(jax.random.key(rng_seed), (3, 14), 0, 256)
  return _MODEL, unbox(_init(jax.random.key(rng_seed + 1), tokens)), tokens


@pytest.mark.slow
def test_prefill_then_stepwise_decode_equals_full_forward(model_vars):
  model, variables, tokens = model_vars
  full = _forward(variables, tokens)
  cache = gen.init_cache(model, 3, 20)            # longer than used: tail stays masked
  decode = jax.jit(gen.decode_step, static_argnums=0)
  logits, cache = decode(model, variables, cache, tokens[:, :6])
  outs = [logits]
  for t in range(6, 14):
    logits, cache = decode(model, variables, cache, tokens[:, t:t + 1])
    outs.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_greedy_generate_equals_argmax_of_repeated_full_forward(model_vars):
  model, variables, tokens = model_vars
  prompt = tokens[:, :5]
  out = gen.generate(model, variables, prompt, jax.random.key(0), max_new_tokens=6)
  ref = np.asarray(prompt)
  for _ in range(6):       # reference without any cache: full forward each time
    nxt = np.argmax(np.asarray(_forward(variables, jnp.asarray(ref)))[:, -1], -1)
    ref = np.concatenate([ref, nxt[:, None]], 1)
  np.testing.assert_array_equal(out, ref)


def test_top_p_keeps_smallest_nucleus(rng_seed):
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(rng_seed), 2000)
  draw = jax.vmap(lambda k: gen.sample_logits(logits, k, temperature=1.0, top_p=0.7))
  counts = np.bincount(np.asarray(draw(keys))[:, 0], minlength=4) / 2000
  # Nucleus {0, 1} (0.5 + 0.3 >= 0.7) renormalized: 0.625 / 0.375.
  np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.04)
  tiny = gen.sample_logits(logits, keys[0], temperature=1.0, top_p=1e-6)
  assert int(tiny[0]) == 0


def test_temperature_sampling_follows_softmax(rng_seed):
  logits = jax.random.normal(jax.random.key(rng_seed), (1, 5))
  keys = jax.random.split(jax.random.key(rng_seed + 1), 4000)
  draw = jax.vmap(lambda k: gen.sample_logits(logits, k, temperature=2.0))
  counts = np.bincount(np.asarray(draw(keys))[:, 0], minlength=5) / 4000
  np.testing.assert_allclose(counts, jax.nn.softmax(logits[0] / 2.0), atol=0.03)


def test_bad_sampling_arguments(model_vars):
  model, variables, tokens = model_vars
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(model, variables, tokens[:, :2], jax.random.key(0), max_new_tokens=2,
                 temperature=1.0, top_p=0.0)


@pytest.mark.slow
def test_generate_text_empty_prompt_starts_a_document_and_zero_tokens_is_empty(
    model_vars):
  model, variables, _ = model_vars
  text = gen.generate_text(model, variables, "", max_new_tokens=5, temperature=0.0)
  ref = np.zeros((1, 1), np.int32)              # the EOS token (byte 0) as the context
  for _ in range(5):
    nxt = np.argmax(np.asarray(_forward(variables, jnp.asarray(ref)))[:, -1], -1)
    ref = np.concatenate([ref, nxt[:, None]], 1)
  assert text == bytes(ref[0, 1:].tolist()).decode("utf-8", errors="replace")
  assert gen.generate_text(model, variables, "def ", max_new_tokens=0) == ""
  assert gen.generate_text(model, variables, "", max_new_tokens=0) == ""

  class NoEos:
    eos_id = None
    encode_batch = staticmethod(lambda texts: [np.zeros((0,), np.int32) for _ in texts])

  with pytest.raises(ValueError, match="prompt='' is empty"):
    gen.generate_text(model, variables, "", max_new_tokens=3, tokenizer=NoEos())


def test_generate_edge_lengths(model_vars):
  model, variables, tokens = model_vars
  out = gen.generate(model, variables, tokens[:, :4], jax.random.key(0), max_new_tokens=0)
  np.testing.assert_array_equal(out, tokens[:, :4])
  with pytest.raises(ValueError, match=r"prompt has shape \(3, 0\)"):
    gen.generate(model, variables, tokens[:, :0], jax.random.key(0), max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens=-1"):
    gen.generate(model, variables, tokens[:, :2], jax.random.key(0), max_new_tokens=-1)
