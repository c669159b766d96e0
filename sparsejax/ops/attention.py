"""Rotary position embedding and dense (XLA) causal attention with GQA.

Shapes follow `jax.nn.dot_product_attention`: q [B, T, Hq, D], k/v [B, S, Hkv, D] with
Hq a multiple of Hkv (grouped-query attention: query head h reads kv head h // (Hq/Hkv)).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sparsejax.validation import check, check_choice

ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling for long context (`config.model.rope_scaling`).

  "linear" (position interpolation, Chen et al. 2023): every frequency / `factor`.
  "llama3" (Llama 3.1): with wavelength λ = 2π / f and L = original context length,
  λ < L / high_freq_factor keeps f, λ > L / low_freq_factor uses f / factor, and the
  band between interpolates: f' = (1 − s) f / factor + s f with
  s = (L / λ − low_freq_factor) / (high_freq_factor − low_freq_factor).
  """
  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def validate(self, prefix: str = "config.model.rope_scaling") -> None:
    check_choice(f"{prefix}.rope_type", self.rope_type, ROPE_SCALING_TYPES)
    check(self.factor >= 1, f"{prefix}.factor", self.factor, ">= 1")
    check(0 < self.low_freq_factor < self.high_freq_factor, f"{prefix}.low_freq_factor",
          self.low_freq_factor, f"in (0, high_freq_factor={self.high_freq_factor})")
    check(self.original_max_position_embeddings >= 1,
          f"{prefix}.original_max_position_embeddings",
          self.original_max_position_embeddings, ">= 1")


def rope_frequencies(d: int, theta: float, scaling: RopeScaling | None = None
                     ) -> jax.Array:
  """The D/2 rotation frequencies f_i = theta^(-2i/D) (float32), scaled by `scaling`."""
  freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  if scaling is None:
    return freq
  if scaling.rope_type == "linear":
    return freq / scaling.factor
  context = scaling.original_max_position_embeddings
  wavelen = 2 * math.pi / freq
  smooth = (context / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * freq / scaling.factor + smooth * freq
  scaled = jnp.where(wavelen > context / scaling.low_freq_factor, freq / scaling.factor,
                     freq)
  return jnp.where((wavelen >= context / scaling.high_freq_factor)
                   & (wavelen <= context / scaling.low_freq_factor), smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0,
         scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary embedding (Su et al. 2021), half-split convention.

  x: [B, T, H, D] (D even); positions: int [B, T]. For pair i = (x[..., i], x[..., i+D/2])
  rotates by angle pos · f_i with f_i = theta^(-2i/D) (`rope_frequencies`, optionally
  scaled). This is the "rotate-half" layout of Hugging Face Llama-family checkpoints.
  Computed in float32, returned in x.dtype.
  """
  d = x.shape[-1]
  freq = rope_frequencies(d, theta, scaling)
  angle = positions.astype(jnp.float32)[..., None, None] * freq           # [B,T,1,D/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     q_positions: jax.Array | None = None,
                     kv_length: jax.Array | None = None) -> jax.Array:
  """softmax(q kᵀ / √D + causal mask) v with GQA; returns [B, T, Hq, D] in q.dtype.

  Training (q_positions None): query t sees keys 0..t (T == S).
  Decoding with a KV cache: q_positions int [B, T] are the queries' absolute positions
  and key s is visible iff s <= q_position and s < kv_length (the filled cache length).
  """
  if q_positions is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)
  key_pos = jnp.arange(k.shape[1])
  mask = key_pos[None, None, :] <= q_positions[:, :, None]                 # [B,T,S]
  if kv_length is not None:
    mask &= key_pos[None, None, :] < kv_length
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
