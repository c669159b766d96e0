"""Block top-k decode attention vs a NumPy loop re-derivation; exact when k covers all."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.models.config import parse_model_config
from sparsejax.models.transformer import DecoderLM
from sparsejax.ops import attention as attention_ops
from sparsejax.ops.block_topk import BlockTopK, block_topk_attention
from sparsejax.train import generate as gen
from sparsejax.validation import ConfigError


def _inputs(seed, b=2, t=1, hq=4, hkv=2, s=64, d=8):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, hq, d))
  k = jax.random.normal(keys[1], (b, s, hkv, d))
  v = jax.random.normal(keys[2], (b, s, hkv, d))
  positions = jax.random.randint(keys[3], (b, t), 20, s)
  return q, k, v, positions


def _numpy_block_topk(q, k, v, positions, kv_length, cfg: BlockTopK):
  q, k, v, positions = map(np.asarray, (q, k, v, positions))
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g, nb = hq // hkv, s // cfg.block_size
  out = np.zeros(q.shape[:3] + (v.shape[-1],), np.float32)
  for bi in range(b):
    for ti in range(t):
      p = positions[bi, ti]
      window_start = p - cfg.window + 1
      for h in range(hkv):
        scores = {}
        for j in range(nb):
          lo = j * cfg.block_size
          if lo + cfg.block_size > cfg.num_sinks and lo < window_start and lo < kv_length:
            rep = k[bi, lo:lo + cfg.block_size, h].mean(0)
            scores[j] = np.mean([q[bi, ti, h * g + i] @ rep for i in range(g)])
        chosen = sorted(scores, key=lambda j: -scores[j])[:cfg.top_k]
        tokens = set(range(min(cfg.num_sinks, p + 1)))
        tokens |= set(range(max(window_start, 0), p + 1))
        for j in chosen:
          tokens |= {i for i in range(j * cfg.block_size, (j + 1) * cfg.block_size)
                     if i <= p}
        tokens = sorted(i for i in tokens if i < kv_length)
        for i in range(g):
          logits = k[bi, tokens, h] @ q[bi, ti, h * g + i] / np.sqrt(d)
          w = np.exp(logits - logits.max())
          out[bi, ti, h * g + i] = (w / w.sum()) @ v[bi, tokens, h]
  return out


@pytest.mark.parametrize("cfg", [BlockTopK(block_size=8, num_sinks=4, window=8, top_k=2),
                                 BlockTopK(block_size=4, num_sinks=0, window=5, top_k=3)])
def test_matches_numpy_loop(rng_seed, cfg):
  q, k, v, positions = _inputs(rng_seed, t=2)
  kv_length = jnp.int32(60)
  got = jax.jit(block_topk_attention, static_argnums=5)(q, k, v, positions, kv_length, cfg)
  want = _numpy_block_topk(q, k, v, positions, 60, cfg)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_exact_when_top_k_covers_every_block(rng_seed):
  q, k, v, positions = _inputs(rng_seed, t=3)
  cfg = BlockTopK(block_size=8, num_sinks=4, window=8, top_k=8)
  got = block_topk_attention(q, k, v, positions, jnp.int32(64), cfg)
  want = attention_ops.causal_attention(q, k, v, q_positions=positions,
                                        kv_length=jnp.int32(64))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_loaded_tokens():
  cfg = BlockTopK(block_size=16, num_sinks=4, window=64, top_k=8)
  assert cfg.loaded_tokens(4096) == 4 + 8 * 16 + 64
  assert cfg.loaded_tokens(100) == 100


@pytest.mark.slow
def test_model_decode_with_block_topk(rng_seed):
  base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)
  dense = DecoderLM(parse_model_config(base))
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 40), 0, 256)
  variables = sharding.unbox(jax.jit(dense.init)(jax.random.key(rng_seed), tokens))

  def decode_all(model):
    cache = gen.init_cache(model, 2, 40)
    step = jax.jit(lambda c, t: gen.decode_step(model, variables, c, t))
    out, cache = step(cache, tokens[:, :8])                 # prefill stays dense
    outs = [out]
    for i in range(8, 40):
      out, cache = step(cache, tokens[:, i:i + 1])
      outs.append(out)
    return np.asarray(jnp.concatenate(outs, axis=1))

  full = np.asarray(jax.jit(dense.apply)(variables, tokens))
  covering = dataclasses.replace(dense.cfg, decode_block_topk=dict(
      block_size=4, num_sinks=2, window=4, top_k=10))
  np.testing.assert_allclose(decode_all(DecoderLM(covering)), full, rtol=2e-4, atol=2e-5)
  sparse = dataclasses.replace(covering, decode_block_topk=dict(
      block_size=4, num_sinks=2, window=4, top_k=1))
  logits = decode_all(DecoderLM(sparse))
  assert np.isfinite(logits).all()
  np.testing.assert_allclose(logits[:, :8], full[:, :8], rtol=2e-4, atol=2e-5)  # prefill
  assert not np.allclose(logits[:, 20:], full[:, 20:], atol=1e-4)   # really sparse


def test_bad_settings_name_the_field():
  with pytest.raises(ConfigError, match=r"config\.model\.decode_block_topk\.top_k"):
    parse_model_config(dict(decode_block_topk=dict(top_k=0))).validate()
