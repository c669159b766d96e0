"""Properties of block top-k decode attention (sparsejax.ops.block_topk), random inputs.

Reference (float64 NumPy, from the module docstring): a query at position p attends to
the sinks [0, num_sinks), the window (p − window, p] and the tokens of the top_k middle
blocks (block ranked by the group-mean of q · mean(block keys)), all ≤ p and < kv_length.
"""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import jax
import jax.numpy as jnp

from prop_helpers import assert_close, f64, float_dtypes, rng_for
from sparsejax.ops.block_topk import BlockTopK, block_topk_attention
from sparsejax.validation import ConfigError


@st.composite
def decode_case(draw):
  cfg = BlockTopK(block_size=draw(st.integers(1, 4)), num_sinks=draw(st.integers(0, 3)),
                  window=draw(st.integers(1, 6)), top_k=draw(st.integers(1, 4)))
  b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
  s, t, d = draw(st.integers(1, 24)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
  rng, dtype = rng_for(draw), draw(float_dtypes)
  arr = lambda *shape: np.asarray(jnp.asarray(rng.standard_normal(shape), dtype))
  kv_length = draw(st.integers(1, s))
  pos = rng.integers(0, kv_length, size=(b, t)).astype(np.int32)
  return (arr(b, t, hkv * g, d), arr(b, s, hkv, d), arr(b, s, hkv, d), pos,
          np.int32(kv_length), cfg)


def ref_decode(q, k, v, pos, kv_length, cfg):
  """(out float64 [B, T, Hq, D], min gap between the k-th and next block score)."""
  q, k, v = f64(q), f64(k), f64(v)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g, bs = hq // hkv, cfg.block_size
  out, gap = np.zeros((b, t, hq, d)), np.inf
  for bb, tt, h in np.ndindex(b, t, hkv):
    p = pos[bb, tt]
    ws = p - cfg.window + 1
    qs = q[bb, tt, h * g:(h + 1) * g]                                # [G, D]
    middle = [j for j in range(s // bs) if j * bs + bs > cfg.num_sinks and j * bs < ws
              and j * bs < kv_length]
    score = {j: (qs @ k[bb, j * bs:(j + 1) * bs, h].mean(0)).mean() for j in middle}
    ranked = sorted(middle, key=lambda j: (-score[j], j))
    if len(ranked) > cfg.top_k:
      gap = min(gap, score[ranked[cfg.top_k - 1]] - score[ranked[cfg.top_k]])
    keys = {i for i in range(cfg.num_sinks) if i < ws}
    keys |= {i for j in ranked[:cfg.top_k] for i in range(j * bs, (j + 1) * bs)
             if cfg.num_sinks <= i < ws}
    keys |= set(range(max(ws, 0), p + 1))
    keys = sorted(i for i in keys if i <= p and i < kv_length and i < s)
    logits = qs @ k[bb, keys, h].T / np.sqrt(d)                      # [G, L]
    w = np.exp(logits - logits.max(-1, keepdims=True))
    out[bb, tt, h * g:(h + 1) * g] = (w / w.sum(-1, keepdims=True)) @ v[bb, keys, h]
  return out, gap


@pytest.mark.slow
@settings(max_examples=12)
@given(decode_case())
def test_block_topk_matches_reference(case):
  q, k, v, pos, kv_length, cfg = case
  want, gap = ref_decode(q, k, v, pos, kv_length, cfg)
  assume(gap > 1e-3)                   # a near-tie at the top-k boundary may flip in f32
  out = jax.jit(block_topk_attention, static_argnames="cfg")(q, k, v, pos, kv_length,
                                                              cfg=cfg)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert_close(out, want)


@given(st.sampled_from(("block_size", "window", "top_k", "num_sinks")),
       st.integers(-3, 0))
def test_bad_config_raises(field, value):
  if field == "num_sinks" and value == 0:
    value = -1
  with pytest.raises(ConfigError, match=f"decode_block_topk.{field}"):
    BlockTopK(**{field: value}).validate()


def test_bad_shapes_name_the_argument():
  q = np.ones((1, 1, 3, 4), np.float32)
  k = np.ones((1, 8, 2, 4), np.float32)
  with pytest.raises(ValueError, match="Hkv|k_cache"):
    block_topk_attention(q, k, k, np.zeros((1, 1), np.int32), np.int32(8), BlockTopK())
