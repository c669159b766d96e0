"""Config-driven decoder-only LM: embeddings, pre-norm blocks, skip-layer memories, head.

Each block is x + Attn(RMSNorm(x)) then h + FFN(RMSNorm(h)); the attention, FFN, linear
projections and memory are registry entries chosen by `ModelConfig`, so new techniques
need no change here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry
from sparsejax.layers.norm import RMSNorm
from sparsejax.models.config import ModelConfig

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


class Block(nn.Module):
  """One pre-norm block; returns (output [B,T,D], normalized FFN input [B,T,D])."""
  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, positions, decode=False):
    cfg = self.cfg.for_layer(self.layer)   # per-block d_ff / heads, if configured
    norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
    attention = registry.build("attention", cfg.attention, cfg, cfg.attention_options,
                               self.layer)
    h = x + attention(norm("attn_norm")(x), positions, decode=decode)
    h = nn.with_logical_constraint(h, ACTIVATION_AXES)
    ffn_in = norm("ffn_norm")(h)
    ffn = registry.build("ffn", cfg.ffn, cfg, cfg.ffn_options, self.layer)
    out = nn.with_logical_constraint(h + ffn(ffn_in), ACTIVATION_AXES)
    return out, ffn_in


class DecoderLM(nn.Module):
  """tokens int32 [B, T] -> logits float32 [B, T, vocab].

  `decode=True` uses the KV cache (collection "cache", created by an init call with
  the maximum length) and continues positions from the cache's position counter.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, decode: bool = False) -> jax.Array:
    cfg = self.cfg
    embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), cfg.param_dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(cfg.dtype)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    positions = self._positions(tokens, decode)

    block_cls = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block
    placements = cfg.memory_placements
    pending = {}  # destination block -> memory outputs to add after it
    for layer in range(cfg.num_layers):
      x, ffn_in = block_cls(cfg, layer, name=f"block_{layer}")(x, positions, decode)
      for i, (src, dst) in enumerate(placements):
        if src == layer:
          memory = registry.build("memory", cfg.memory, cfg, cfg.memory_options, i)
          pending.setdefault(dst, []).append(memory(ffn_in))
      for out in pending.pop(layer, []):
        x = x + out
    x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(cfg.dtype),
                          preferred_element_type=jnp.float32)
    else:
      head = self.param("lm_head", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
                        (cfg.d_model, cfg.vocab_size), cfg.param_dtype)
      logits = jnp.einsum("btd,dv->btv", x, head.astype(cfg.dtype),
                          preferred_element_type=jnp.float32)
    return logits

  def _positions(self, tokens: jax.Array, decode: bool) -> jax.Array:
    batch, length = tokens.shape
    offsets = jnp.arange(length, dtype=jnp.int32)
    if decode:
      initialized = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      offsets = offsets + position.value
      if initialized:
        position.value = position.value + length
    return jnp.broadcast_to(offsets, (batch, length))
