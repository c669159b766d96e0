"""Rotary position embedding and dense (XLA) causal attention with GQA.

Shapes follow `jax.nn.dot_product_attention`: q [B, T, Hq, D], k/v [B, S, Hkv, D] with
Hq a multiple of Hkv (grouped-query attention: query head h reads kv head h // (Hq/Hkv)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotary embedding (Su et al. 2021), half-split convention.

  x: [B, T, H, D] (D even); positions: int [B, T]. For pair i = (x[..., i], x[..., i+D/2])
  rotates by angle pos · theta^(-2i/D). Computed in float32, returned in x.dtype.
  """
  d = x.shape[-1]
  freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
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
