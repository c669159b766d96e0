"""DecoderLM: shapes, causality, GQA attention and RoPE vs NumPy references, registry."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.layers import registry
from sparsejax.models import DecoderLM, parse_model_config
from sparsejax.ops import attention as attention_ops
from sparsejax.sharding import unbox
from sparsejax.validation import ConfigError

SMALL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)


def _model_and_vars(seed, **overrides):
  cfg = parse_model_config({**SMALL, **overrides})
  model = DecoderLM(cfg)
  tokens = jax.random.randint(jax.random.key(seed), (2, 16), 0, cfg.vocab_size)
  variables = unbox(model.init(jax.random.key(seed + 1), tokens))
  return model, variables, tokens


def test_logits_shape_dtype_and_param_axes(rng_seed):
  model, variables, tokens = _model_and_vars(rng_seed)
  logits = model.apply(variables, tokens)
  chex.assert_shape(logits, (2, 16, 256))
  assert logits.dtype == jnp.float32
  boxed = model.init(jax.random.key(0), tokens)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


def test_causal_future_tokens_do_not_change_past_logits(rng_seed):
  model, variables, tokens = _model_and_vars(rng_seed)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 256)
  a, b = model.apply(variables, tokens), model.apply(variables, changed)
  chex.assert_trees_all_close(a[:, :10], b[:, :10], atol=1e-6)
  assert not np.allclose(a[:, 10:], b[:, 10:])


def _numpy_gqa_attention(q, k, v):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  group = hq // k.shape[2]
  out = np.zeros_like(q)
  for h in range(hq):
    s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // group]) / np.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, :, h] = np.einsum("bts,bsd->btd", p, v[:, :, h // group])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_causal_attention_matches_numpy_gqa(rng_seed, hq, hkv):
  kq, kk, kv = jax.random.split(jax.random.key(rng_seed), 3)
  q = jax.random.normal(kq, (2, 7, hq, 8))
  k = jax.random.normal(kk, (2, 7, hkv, 8))
  v = jax.random.normal(kv, (2, 7, hkv, 8))
  np.testing.assert_allclose(attention_ops.causal_attention(q, k, v),
                             _numpy_gqa_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_rotation_and_is_relative(rng_seed):
  x = jax.random.normal(jax.random.key(rng_seed), (1, 5, 2, 8))
  pos = jnp.arange(5)[None] + 3
  out = np.asarray(attention_ops.rope(x, pos, 100.0))
  xn = np.asarray(x, np.float64)
  z = xn[..., :4] + 1j * xn[..., 4:]
  angle = np.asarray(pos)[..., None, None] * 100.0 ** (-np.arange(4) * 2 / 8)
  ref = z * np.exp(1j * angle)
  np.testing.assert_allclose(out, np.concatenate([ref.real, ref.imag], -1), atol=1e-5)
  # q·k after RoPE depends only on the position difference.
  q, k = x[:, :1], x[:, 1:2]
  dot = lambda pq, pk: float(jnp.sum(attention_ops.rope(q, jnp.array([[pq]]))
                                     * attention_ops.rope(k, jnp.array([[pk]]))))
  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)


@pytest.mark.slow
def test_untied_head_and_grads_are_finite(rng_seed):
  model, variables, tokens = _model_and_vars(rng_seed, tie_embeddings=False)
  assert "lm_head" in variables["params"]
  grads = jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(
      variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["lm_head"]).sum()) > 0


@dataclasses.dataclass(frozen=True)
class _ScaleOptions:
  scale: float = 1.0


class _LinearMemory(nn.Module):
  """A test memory: scale · x W (stands in for PKM/UltraMem in placement tests)."""
  d_model: int
  scale: float

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                     ("embed", "mlp")),
                   (x.shape[-1], self.d_model))
    return self.scale * x @ w


registry.register("memory", "_test_linear", options=_ScaleOptions)(
    lambda cfg, options, i: _LinearMemory(cfg.d_model, options.scale, name=f"memory_{i}"))


def test_skip_layer_memory_reads_block_s_and_adds_after_block_t(rng_seed):
  model, variables, tokens = _model_and_vars(
      rng_seed, num_layers=3, memory="_test_linear", memory_layers="0:2",
      memory_options={"scale": 0.5})
  assert "memory_0" in variables["params"]
  # Reference: run the blocks by hand and add the memory of block 0's FFN input
  # after block 2.
  base = DecoderLM(parse_model_config({**SMALL, "num_layers": 3}))
  params = variables["params"]
  _, state = base.apply({"params": {k: v for k, v in params.items()
                                    if k != "memory_0"}}, tokens,
                        capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  ffn_in0 = inter["block_0"]["__call__"][0][1]
  out2 = inter["block_2"]["__call__"][0][0]
  h = out2 + 0.5 * ffn_in0 @ params["memory_0"]["w"]
  from sparsejax.layers.norm import RMSNorm
  h = RMSNorm().apply({"params": params["final_norm"]}, h)
  ref = h @ params["embedding"].T
  np.testing.assert_allclose(model.apply(variables, tokens), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"num_heads": 3}, "config.model.num_heads"),
    ({"num_kv_heads": 3}, "config.model.num_kv_heads"),
    ({"ffn": "nope"}, "config.model.ffn"),
    ({"ffn_options": {"x": 1}}, "config.model.ffn_options"),
    ({"memory_layers": "0:1"}, "config.model.memory_layers"),
    ({"memory": "_test_linear", "memory_layers": "1:0"}, "config.model.memory_layers"),
    ({"memory": "_test_linear", "memory_layers": "0:1",
      "memory_options": {"scale": "big"}}, "config.model.memory_options.scale"),
    ({"dtype": "float64"}, "config.model.dtype"),
    ({"d_model": "64"}, "config.model.d_model"),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    parse_model_config({**SMALL, **overrides})
