"""Block top-k attention over a KV cache for decoding (Quest / Kinetics style).

Each query at absolute position p attends to
    sinks    tokens [0, num_sinks),
    window   the last `window` tokens (p − window, p],
    top-k    the `top_k` middle blocks (block_size tokens each, between the sinks and
             the window) whose representative key scores highest,
all causal and inside the filled cache. A block's representative key is the mean of its
keys; its score is the query·representative logit averaged over the G query heads of a
GQA group, so the whole group shares one block set (one gather per KV head).

Only the selected tokens are gathered: per query and KV head L = num_sinks +
top_k·block_size + window keys/values are read instead of the whole cache (plus the
representative keys, [S / block_size] per KV head), and attention runs over those L.
Every token is counted once (the three parts are disjoint: block tokens outside the
middle range are masked). When top_k covers every middle block the result equals full
causal attention over the cache (tested).

    q [B, T, Hq, D], k_cache [B, S, Hkv, D], v_cache [B, S, Hkv, Dv],
    q_positions int [B, T] (absolute positions), kv_length int scalar (filled length)
    -> out [B, T, Hq, Dv] in q.dtype
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class BlockTopK:
  """Decode-time sparsity settings (`config.model.decode_block_topk`)."""
  block_size: int = 16
  num_sinks: int = 4
  window: int = 64
  top_k: int = 8

  def validate(self, prefix: str = "config.model.decode_block_topk") -> None:
    from sparsejax.validation import check
    for name in ("block_size", "window", "top_k"):
      check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), ">= 1")
    check(self.num_sinks >= 0, f"{prefix}.num_sinks", self.num_sinks, ">= 0")

  def loaded_tokens(self, context: int) -> int:
    """Keys read per query and KV head at `context` filled positions (≤ context)."""
    return min(context, self.num_sinks + self.top_k * self.block_size + self.window)


def _select_blocks(q, k_cache, positions, kv_length, cfg: BlockTopK):
  """Top-k middle block ids [B, T, Hkv, k] by group-averaged representative logits."""
  b, s, hkv, d = k_cache.shape
  nb = s // cfg.block_size
  group = q.shape[2] // hkv
  reps = k_cache[:, :nb * cfg.block_size].reshape(b, nb, cfg.block_size, hkv, d)
  reps = reps.astype(jnp.float32).mean(axis=2)                        # [B, nb, Hkv, D]
  qg = q.astype(jnp.float32).reshape(*q.shape[:2], hkv, group, d)
  scores = jnp.einsum("bthgd,bnhd->bthn", qg, reps) / group           # [B, T, Hkv, nb]
  start = jnp.arange(nb) * cfg.block_size
  window_start = positions - cfg.window + 1                            # [B, T]
  middle = ((start + cfg.block_size > cfg.num_sinks)[None, None, :]
            & (start[None, None, :] < window_start[..., None])
            & (start < kv_length)[None, None, :])                      # [B, T, nb]
  scores = jnp.where(middle[:, :, None, :], scores, NEG)
  k = min(cfg.top_k, nb)
  return jax.lax.top_k(jax.lax.stop_gradient(scores), k)[1]


def _check_args(q, k_cache, v_cache, q_positions, cfg: BlockTopK) -> None:
  """ValueError naming the argument for shapes the op cannot take; validates `cfg`."""
  cfg.validate("cfg")
  for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [B, T, H, D], got shape {x.shape}")
  b, t, hq, d = q.shape
  if k_cache.shape[0] != b or k_cache.shape[3] != d:
    raise ValueError(f"k_cache {k_cache.shape} must be [B={b}, S, Hkv, D={d}]")
  if v_cache.shape[:3] != k_cache.shape[:3]:
    raise ValueError(f"v_cache {v_cache.shape} must match k_cache {k_cache.shape} in "
                     "[B, S, Hkv]")
  if hq % k_cache.shape[2]:
    raise ValueError(f"the query heads Hq={hq} must be a multiple of k_cache's "
                     f"Hkv={k_cache.shape[2]}")
  if q_positions.shape != (b, t):
    raise ValueError(f"q_positions {q_positions.shape} must be [B={b}, T={t}]")


def block_topk_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                         q_positions: jax.Array, kv_length: jax.Array, cfg: BlockTopK,
                         extra_mask: Callable | None = None) -> jax.Array:
  """Sparse decode attention (module docstring). `extra_mask(q_pos, k_pos) -> bool`
  (broadcasting) further restricts the keys, e.g. a structured mask's predicate."""
  _check_args(q, k_cache, v_cache, q_positions, cfg)
  b, t, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  group = hq // hkv
  blocks = _select_blocks(q, k_cache, q_positions, kv_length, cfg)     # [B, T, Hkv, k]
  within = jnp.arange(cfg.block_size)
  block_tok = (blocks[..., None] * cfg.block_size + within).reshape(*blocks.shape[:3], -1)
  pos = q_positions[:, :, None, None]                                   # [B, T, 1, 1]
  sinks = jnp.broadcast_to(jnp.arange(cfg.num_sinks), (b, t, hkv, cfg.num_sinks))
  window = jnp.broadcast_to(pos - cfg.window + 1 + jnp.arange(cfg.window),
                            (b, t, hkv, cfg.window))
  idx = jnp.concatenate([sinks, block_tok, window], axis=-1)           # [B, T, Hkv, L]
  window_start = pos - cfg.window + 1
  valid = jnp.concatenate([
      jnp.broadcast_to(sinks < window_start, sinks.shape),
      (block_tok >= cfg.num_sinks) & (block_tok < window_start),
      window >= 0], axis=-1)
  valid &= (idx <= pos) & (idx < kv_length) & (idx >= 0) & (idx < s)
  if extra_mask is not None:
    valid &= extra_mask(pos, idx)
  safe = jnp.clip(idx, 0, s - 1)
  # [B, T, Hkv, L, D]: keys/values of the selected tokens, per query and KV head
  b_idx = jnp.arange(b)[:, None, None, None]
  h_idx = jnp.arange(hkv)[None, None, :, None]
  keys = k_cache[b_idx, safe, h_idx].astype(jnp.float32)
  values = v_cache[b_idx, safe, h_idx].astype(jnp.float32)
  qg = q.astype(jnp.float32).reshape(b, t, hkv, group, d)
  logits = jnp.einsum("bthgd,bthld->bthgl", qg, keys) / jnp.sqrt(jnp.float32(d))
  logits = jnp.where(valid[:, :, :, None, :], logits, NEG)
  probs = jax.nn.softmax(logits, axis=-1) * valid[:, :, :, None, :]
  out = jnp.einsum("bthgl,bthlv->bthgv", probs, values)
  return out.reshape(b, t, hq, -1).astype(q.dtype)
