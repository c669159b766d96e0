"""Properties of NSA block selection and selected-block attention (random inputs).

select_blocks: invariants of the paper's selection (forced current/local/initial blocks
in priority order, then the highest scores, lowest index on ties, never a future block).
selected_attention: a float64 dense reference over the union of the selected blocks'
tokens (s ≤ t, s < S); slots that are not valid, or whose id is negative or ≥ ⌈S/l'⌉,
contribute nothing; gradients against a dense jnp reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify

from prop_helpers import assert_close, assert_equal, f64, float_dtypes, int_dtypes, rng_for
from sparsejax.ops.nsa import select_blocks, selected_attention


@st.composite
def selection_case(draw):
  b, t, h = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 2))
  ns, sb = draw(st.integers(1, 8)), draw(st.integers(1, 4))
  rng = rng_for(draw)
  scores = np.abs(rng.integers(0, 3, size=(b, t, h, ns)) * 0.5 if draw(st.booleans())
                  else rng.random((b, t, h, ns))).astype(np.float32)
  pos = rng.integers(0, ns * sb, size=(b, t)).astype(np.int32)
  return (scores, pos, draw(st.integers(1, ns + 2)), sb, draw(st.integers(0, 3)),
          draw(st.integers(0, 3)))


@pytest.mark.slow
@given(selection_case())
def test_select_blocks_invariants(case):
  scores, pos, n, sb, num_initial, num_local = case
  ns = scores.shape[-1]
  idx, valid = jax.jit(functools.partial(
      select_blocks, num_selected=n, select_block=sb, num_initial=num_initial,
      num_local=num_local))(scores, pos)
  assert idx.shape == valid.shape == (*scores.shape[:3], min(n, ns))
  for bb, tt, hh in np.ndindex(scores.shape[:3]):
    c = pos[bb, tt] // sb                                    # the current block
    chosen = list(np.asarray(idx[bb, tt, hh])[np.asarray(valid[bb, tt, hh])])
    assert len(chosen) == min(n, ns, c + 1) and len(set(chosen)) == len(chosen)
    assert all(0 <= j <= c for j in chosen)
    forced = [c - r for r in range(num_local) if c - r >= 0]
    forced += [j for j in range(min(num_initial, c + 1)) if j not in forced]
    assert set(forced[:len(chosen)]) <= set(chosen)            # priority order
    s = scores[bb, tt, hh]
    free = [j for j in chosen if j not in forced]
    rest = [j for j in range(c + 1) if j not in chosen]
    for j in free:                   # every free pick beats every unpicked candidate
      for r in rest:
        assert s[j] > s[r] or (s[j] == s[r] and j < r), (j, r, s)


@st.composite
def attention_case(draw, dtypes=float_dtypes, lengths=st.integers(1, 16),
                   block_sizes=st.integers(1, 6)):
  b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
  s, sb = draw(lengths), draw(block_sizes)
  d, dv = draw(st.integers(1, 6)), draw(st.integers(1, 6))
  ns = -(-s // sb)
  n = draw(st.integers(1, 4))
  rng, dtype = rng_for(draw), draw(dtypes)
  training = draw(st.booleans())
  t = s if training else draw(st.integers(1, 4))
  pos = None if training else rng.integers(0, s + 2, size=(b, t)).astype(np.int32)
  # distinct ids per (token, head) out of ns + 4 >= n, including negative and >= ns ones
  pool = np.arange(-2, ns + 2)
  idx = np.stack([rng.permutation(pool)[:n] for _ in range(b * t * hkv)]).reshape(
      b, t, hkv, n)
  valid = rng.random(idx.shape) < 0.8
  arr = lambda *shape: np.asarray(jnp.asarray(rng.standard_normal(shape), dtype))
  q, k, v = arr(b, t, hkv * g, d), arr(b, s, hkv, d), arr(b, s, hkv, dv)
  scale = draw(st.one_of(st.none(), st.floats(0.1, 2.0)))
  return q, k, v, idx.astype(np.int32), valid, sb, pos, scale


def allowed_keys(idx, valid, sb, s, pos, t):
  """bool [B, T, Hkv, S]: key s is in a valid, in-range selected block, s <= pos."""
  b, _, hkv, n = idx.shape
  pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else pos
  ns = -(-s // sb)
  out = np.zeros((b, t, hkv, s), bool)
  for bb, tt, hh, j in np.ndindex(b, t, hkv, n):
    block = idx[bb, tt, hh, j]
    if valid[bb, tt, hh, j] and 0 <= block < ns:
      lo, hi = block * sb, min((block + 1) * sb, s, pos[bb, tt] + 1)
      out[bb, tt, hh, lo:hi] = True
  return out


def ref_attention(q, k, v, allowed, scale):
  """float64; allowed [B, T, Hkv, S]; rows with no allowed key give 0."""
  q, k, v = f64(q), f64(k), f64(v)
  g = q.shape[2] // k.shape[2]
  allowed = np.repeat(allowed, g, axis=2)                      # [B, T, Hq, S]
  logits = np.einsum("bthd,bshd->bths", q, np.repeat(k, g, axis=2)) * scale
  logits = np.where(allowed, logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  p = np.exp(logits - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bths,bshv->bthv", p, np.repeat(v, g, axis=2))


def jnp_attention(q, k, v, allowed, scale):
  g = q.shape[2] // k.shape[2]
  allowed = jnp.repeat(allowed, g, axis=2)
  logits = jnp.einsum("bthd,bshd->bths", q, jnp.repeat(k, g, axis=2)) * scale
  p = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, logits, -1e30), -1), 0.0)
  return jnp.einsum("bths,bshv->bthv", p, jnp.repeat(v, g, axis=2))



@functools.partial(jax.jit, static_argnames="scale")
def ref_grads(q, k, v, allowed, do, scale):
  """Gradients of the dense f32 reference (q, k, v upcast) for cotangent `do`."""
  args = [a.astype(jnp.float32) for a in (q, k, v)]
  _, vjp = jax.vjp(lambda *a: jnp_attention(*a, allowed, scale), *args)
  return vjp(do.astype(jnp.float32))

@functools.partial(jax.jit, static_argnames=("sb", "scale", "impl"))
def selected_and_grads(q, k, v, idx, valid, pos, do, sb, scale, impl="xla"):
  f = lambda q, k, v: selected_attention(q, k, v, idx, valid, sb, scale=scale,
                                         q_positions=pos, impl=impl)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(do))


def cotangent(q, v, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (*q.shape[:3], v.shape[-1])).astype(np.float32)


@pytest.mark.slow
@settings(max_examples=8)
@given(attention_case(), st.integers(0, 2**31))
def test_selected_attention_matches_dense_reference(case, seed):
  q, k, v, idx, valid, sb, pos, scale = case
  do = cotangent(q, v, seed)
  out, dq, dk, dv = selected_and_grads(q, k, v, idx, valid, pos, do, sb, scale)
  sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  allowed = allowed_keys(idx, valid, sb, k.shape[1], pos, q.shape[1])
  assert out.dtype == jnp.float32 and out.shape == (*q.shape[:3], v.shape[-1])
  assert_close(out, ref_attention(q, k, v, allowed, sc), dtype=q.dtype)
  for got, want in zip((dq, dk, dv), ref_grads(q, k, v, allowed, do, sc)):
    assert got.dtype == q.dtype
    assert_close(got, f64(want), scale=max(1.0, np.abs(want).max()))
  # out-of-range ids of valid slots: exactly as if the slots were not valid
  ns = -(-k.shape[1] // sb)
  in_range = (idx >= 0) & (idx < ns)
  same = selected_and_grads(q, k, v, np.where(in_range, idx, 0), valid & in_range, pos,
                            do, sb, scale)
  for a, b in zip((out, dq, dk, dv), same):
    assert_equal(a, b)


@settings(max_examples=6)
@given(attention_case(lengths=st.integers(1, 8)))
def test_check_indices_reports_out_of_range_ids(case):
  q, k, v, idx, valid, sb, pos, scale = case
  f = checkify.checkify(lambda *a: selected_attention(*a, sb, q_positions=pos, impl="xla",
                                                      check_indices=True))
  err, _ = jax.jit(f)(q, k, v, idx, valid)
  ns = -(-k.shape[1] // sb)
  bad = (valid & ((idx < 0) | (idx >= ns))).any()
  assert (err.get() is not None) == bad
  if bad:
    assert "block_idx" in err.get()


@settings(max_examples=6)
@given(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2), float_dtypes)
def test_empty_inputs_give_zeros(t, s, n, dtype):
  if t and s and n:
    n = 0
  q = jnp.ones((1, t, 2, 4), dtype)
  k, v = jnp.ones((1, s, 1, 4), dtype), jnp.ones((1, s, 1, 3), dtype)
  idx = jnp.zeros((1, t, 1, n), jnp.int32)
  out = selected_attention(q, k, v, idx, idx >= 0, 2, impl="xla")
  assert out.shape == (1, t, 2, 3) and not np.asarray(out).any()


@given(st.data())
def test_bad_arguments_raise(data):
  b, t, s, hq, hkv, d, n = 1, 4, 8, 2, 1, 4, 2
  q = np.ones((b, t, hq, d), np.float32)
  k = np.ones((b, s, hkv, d), np.float32)
  idx, valid = np.zeros((b, t, hkv, n), np.int32), np.ones((b, t, hkv, n), bool)
  name = data.draw(st.sampled_from("qkv"))
  qkv = dict(q=q, k=k, v=k)
  qkv[name] = qkv[name].astype(data.draw(int_dtypes))
  with pytest.raises(TypeError, match=f"{name} has dtype"):
    selected_attention(qkv["q"], qkv["k"], qkv["v"], idx, valid, 4, impl="xla")
  cases = [
      (TypeError, "block_idx", (q, k, k, idx.astype(np.float32), valid, 4), {}),
      (ValueError, "block_idx shape", (q, k, k, idx[:, :, :, 0], valid, 4), {}),
      (ValueError, "block_idx shape", (q, k, k, np.zeros((b, t + 1, hkv, n), np.int32),
                                       valid, 4), {}),
      (ValueError, "valid shape", (q, k, k, idx, valid[..., :1], 4), {}),
      (ValueError, "select_block=", (q, k, k, idx, valid,
                                     data.draw(st.sampled_from((0, -1, 2.0)))), {}),
      (ValueError, "q_positions", (q, k, k, idx, valid, 4),
       dict(q_positions=np.zeros((b, t + 1), np.int32))),
      (ValueError, "4-D", (q[0], k, k, idx, valid, 4), {}),
      (ValueError, "head dim", (q, np.ones((b, s, hkv, d + 1), np.float32),
                                np.ones((b, s, hkv, d + 1), np.float32), idx, valid, 4),
       {}),
      (ValueError, "Hkv", (np.ones((b, t, 3, d), np.float32),
                           np.ones((b, s, 2, d), np.float32),
                           np.ones((b, s, 2, d), np.float32),
                           np.zeros((b, t, 2, n), np.int32), np.ones((b, t, 2, n), bool),
                           4), {}),
  ]
  err, match, args, kwargs = data.draw(st.sampled_from(cases))
  with pytest.raises(err, match=match):
    selected_attention(*args, impl="xla", **kwargs)
  scores = np.zeros((b, t, hkv, 3), np.float32)
  with pytest.raises(ValueError, match="num_selected="):
    select_blocks(scores, np.zeros((b, t), np.int32),
                  data.draw(st.sampled_from((0, -1, 1.5))), 4)


@pytest.mark.slow
@settings(max_examples=2)
@given(attention_case(dtypes=st.just(jnp.float32), lengths=st.just(16),
                      block_sizes=st.just(8)), st.integers(0, 2**31))
def test_interpret_kernel_matches_xla(case, seed):
  """The Pallas kernel (interpret mode, l' = 8): same output and gradients as XLA,
  including invalid and out-of-range block ids."""
  q, k, v, idx, valid, sb, pos, scale = case
  do = cotangent(q, v, seed)
  got = selected_and_grads(q, k, v, idx, valid, pos, do, sb, scale, impl="interpret")
  want = selected_and_grads(q, k, v, idx, valid, pos, do, sb, scale)
  for a, b in zip(got, want):
    np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-5)
