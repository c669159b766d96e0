"""Causal multi-head attention with GQA, RoPE and a KV cache: the "mha" attention entry."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry
from sparsejax.ops import attention as attention_ops


def linear_factory(cfg, layer: int):
  """The configured linear module class with the model's dtypes bound."""
  cls = registry.build("linear", cfg.linear, cfg, cfg.linear_options, layer)
  return functools.partial(cls, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def output_init_std(cfg) -> float:
  """GPT-2 style: residual-branch output projections get std / sqrt(2 · num_layers)."""
  return cfg.init_std / math.sqrt(2 * cfg.num_layers)


class Attention(nn.Module):
  """x [B, T, D] -> [B, T, D]: q/k/v projections, RoPE, causal GQA attention, output.

  With `decode=True` keys/values are written to the "cache" collection
  (`key`/`value` [B, S_max, Hkv, Dh], `index` scalar); S_max is the length of the input
  at init. Each call appends its T tokens at positions index..index+T-1 and attends to
  the filled cache, so a prompt can be prefilled in one call and then decoded 1 by 1.
  """
  cfg: object
  layer: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, decode: bool = False):
    cfg = self.cfg
    hq, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    linear = linear_factory(cfg, self.layer)
    q = linear((hq, dh), ("embed", "heads", "head_dim"), init_std=cfg.init_std,
               name="q_proj")(x)
    k = linear((hkv, dh), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std,
               name="k_proj")(x)
    v = linear((hkv, dh), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std,
               name="v_proj")(x)
    q = attention_ops.rope(q, positions, cfg.rope_theta)
    k = attention_ops.rope(k, positions, cfg.rope_theta)
    if decode and self.has_variable("cache", "index"):
      out = self._attend_cached(q, k, v, positions)
    else:
      if decode:  # init call: create the cache with this input's length
        self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      out = attention_ops.causal_attention(q, k, v)
    return linear((cfg.d_model,), ("heads", "head_dim", "embed"), contract_dims=2,
                  init_std=output_init_std(cfg), name="o_proj")(out)

  def _attend_cached(self, q, k, v, positions):
    key = self.variable("cache", "key")
    value = self.variable("cache", "value")
    index = self.variable("cache", "index")
    start = index.value
    key.value = jax.lax.dynamic_update_slice_in_dim(key.value, k, start, axis=1)
    value.value = jax.lax.dynamic_update_slice_in_dim(value.value, v, start, axis=1)
    index.value = start + q.shape[1]
    return attention_ops.causal_attention(q, key.value, value.value,
                                          q_positions=positions, kv_length=index.value)


@registry.register("attention", "mha")
def build_mha(cfg, options, layer):
  del options
  return Attention(cfg, layer, name="attention")
