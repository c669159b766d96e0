"""Calibration windows and held-out scoring for post-training pruning.

Calibration follows the Wanda and SparseGPT reference scripts: `num_samples` windows of
`seq_len` tokens drawn at seeded uniformly random offsets of the calibration text (for
LLMs: 128 windows of 2048 tokens from C4). Evaluation scores every token but the first
of a held-out text in non-overlapping windows (each window starts a fresh context), so
the numbers before and after pruning come from the same tokens.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.validation import check


def calibration_windows(tokens: np.ndarray, num_samples: int, seq_len: int,
                        seed: int, *, field: str = "--calib") -> np.ndarray:
  """int32 [num_samples, seq_len]: windows of `tokens` at seeded random offsets.

  Raises ConfigError (naming `field`) when the text is shorter than one window, and for
  num_samples or seq_len < 1.
  """
  check(num_samples >= 1, "--calib_samples", num_samples, ">= 1")
  check(seq_len >= 1, "--calib_seq_len", seq_len, ">= 1")
  check(len(tokens) >= seq_len, field, f"<{len(tokens)} tokens>",
        f"a calibration text of at least one sequence (--calib_seq_len={seq_len} "
        "tokens)")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - seq_len + 1, size=num_samples)
  return np.stack([np.asarray(tokens[s:s + seq_len], np.int32) for s in starts])


@functools.lru_cache(maxsize=16)
def _batch_nll(apply_fn):
  """Jitted summed NLL of one masked batch (cached per apply_fn: reuse one function
  object across calls to compile once)."""
  def batch_nll(variables, inputs, targets, mask):
    logits = apply_fn(variables, inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                          targets)
    return jnp.sum(jnp.where(mask, nll, 0.0))
  return jax.jit(batch_nll)


def score_tokens(apply_fn, variables, tokens: np.ndarray, *, seq_len: int,
                 batch_size: int, max_tokens: int = 0) -> dict[str, float]:
  """Held-out NLL of tokens[1:] given the earlier tokens of its window.

  apply_fn(variables, inputs int32 [B, T]) -> logits [B, T, V]. Windows of `seq_len`
  predictions, `batch_size` per forward (the last batch padded and masked out).
  `max_tokens` > 0 scores only the first max_tokens predictions.
  Returns {"nll": mean nats per token, "ppl": exp(nll), "tokens": count}.
  """
  n = len(tokens) - 1
  if max_tokens:
    n = min(n, max_tokens)
  check(n >= 1, "evaluation text", f"<{len(tokens)} tokens>", "at least 2 tokens")
  rows = -(-n // seq_len)
  rows += -rows % batch_size
  inputs, targets = np.zeros((2, rows * seq_len), np.int32)
  mask = np.zeros(rows * seq_len, bool)
  inputs[:n], targets[:n], mask[:n] = tokens[:n], tokens[1:n + 1], True

  batch_nll = _batch_nll(apply_fn)
  shape = (rows // batch_size, batch_size, seq_len)
  total = sum(float(batch_nll(variables, *batch)) for batch in zip(
      inputs.reshape(shape), targets.reshape(shape), mask.reshape(shape)))
  nll = total / n
  return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": n}
