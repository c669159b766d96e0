"""KV-cache decoding: prefill the prompt in one call, then one token per step.

Sampling: greedy (temperature 0), temperature, and nucleus/top-p (Holtzman et al. 2019:
keep the smallest set of tokens whose probability mass reaches p).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.models import DecoderLM
from sparsejax.train import tokenizer as tokenizer_lib


def init_cache(model: DecoderLM, batch_size: int, max_len: int) -> Any:
  """Zero KV cache for `max_len` positions (shapes from an abstract init, no compute)."""
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(functools.partial(model.init, decode=True),
                          jax.random.key(0), tokens)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_step(model: DecoderLM, variables: dict, cache: Any,
                tokens: jax.Array) -> tuple[jax.Array, Any]:
  """Feeds tokens int32 [B, T] at the cache's next positions -> (logits [B, T, V], cache)."""
  logits, updates = model.apply({**variables, "cache": cache}, tokens, decode=True,
                                mutable=["cache"])
  return logits, updates["cache"]


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0,
                  top_p: float = 1.0) -> jax.Array:
  """Samples token ids int32 [B] from logits [B, V] (temperature 0 = argmax)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs       # mass of strictly better ones
    kept = mass_before < top_p                             # always keeps the best token
    cutoff = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "top_p"))
def generate(model: DecoderLM, variables: dict, prompt: jax.Array, rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0) -> jax.Array:
  """Continues prompt int32 [B, P] (same length per row) by `max_new_tokens` tokens.

  `variables` holds "params" and any non-parameter state collections (no "cache").
  Returns int32 [B, P + max_new_tokens]; P >= 1 (the first token is sampled from the
  logits after the last prompt token).
  """
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
  batch, prompt_len = prompt.shape
  if prompt_len == 0:
    raise ValueError(f"prompt has shape {prompt.shape}: needs at least one token per "
                     "row (e.g. the EOS token to start a new document)")
  if max_new_tokens == 0:
    return prompt.astype(jnp.int32)
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  logits, cache = decode_step(model, variables, cache, prompt)
  rngs = jax.random.split(rng, max_new_tokens)
  first = sample_logits(logits[:, -1], rngs[0], temperature=temperature, top_p=top_p)

  def step(carry, key):
    token, cache = carry
    logits, cache = decode_step(model, variables, cache, token[:, None])
    nxt = sample_logits(logits[:, -1], key, temperature=temperature, top_p=top_p)
    return (nxt, cache), token

  (last, _), tokens = jax.lax.scan(step, (first, cache), rngs[1:])
  new = jnp.concatenate([tokens.T, last[:, None]], axis=1)
  return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


def generate_text(model: DecoderLM, variables: dict, prompt: str, *,
                  max_new_tokens: int, seed: int = 0, temperature: float = 0.8,
                  top_p: float = 0.95, tokenizer: Any = None) -> str:
  """str prompt -> generated continuation (str, without the prompt).

  `tokenizer` (default: UTF-8 bytes, `sparsejax.train.tokenizer.ByteTokenizer`) encodes
  the prompt and decodes the new tokens. An empty prompt starts a new document: the
  context is the tokenizer's EOS token (ValueError naming `prompt` if it has none).
  `max_new_tokens=0` returns "".
  """
  tokenizer = tokenizer or tokenizer_lib.ByteTokenizer()
  if max_new_tokens == 0:
    return ""
  ids = [int(t) for t in tokenizer.encode_batch([prompt])[0]]
  if not ids and tokenizer.eos_id is None:
    raise ValueError("prompt='' is empty and the tokenizer has no EOS token to start "
                     "a document from: give a non-empty prompt")
  tokens = jnp.asarray([ids or [tokenizer.eos_id]], jnp.int32)
  out = generate(model, variables, tokens, jax.random.key(seed),
                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
  return tokenizer.decode(out[0, tokens.shape[1]:].tolist())
