"""Properties of structured masks, mask_info and block_sparse_attention (random inputs).

Masks are drawn as specs (kind, parameters) that build both the Mask object and an
independent NumPy predicate; mask_info is checked for consistency with the dense mask;
attention against a float64 dense masked-softmax reference (rows with no allowed key
give exactly 0) and its gradients against a dense jnp reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prop_helpers import assert_close, f64, float_dtypes, int_dtypes, rng_for
from sparsejax.ops import block_sparse_attention, mask_info
from sparsejax.ops import masks as M

MAX_LEN = 32


def ref_predicate(spec, q, k):
  """NumPy bool of broadcast(q, k) for a mask spec (written from the mask docstrings)."""
  kind, *p = spec
  if kind == "causal":
    return k <= q + p[0]
  if kind == "local":
    return (q - p[0] <= k) & (k <= q + p[1])
  if kind == "chunked":
    return (q // p[0] == k // p[0]) & (k <= q)
  if kind == "strided":
    d = q - k
    return (d >= 0) & ((d < p[1]) | (d % p[0] == 0))
  if kind == "global":
    return np.broadcast_to(k < p[0], np.broadcast_shapes(q.shape, k.shape))
  if kind == "document":
    ids = np.asarray(p[0])
    return ids[q] == ids[k]
  a, b = ref_predicate(p[0], q, k), ref_predicate(p[1], q, k)
  return a & b if kind == "and" else a | b


def build(spec):
  kind, *p = spec
  if kind in ("and", "or"):
    a, b = build(p[0]), build(p[1])
    return a & b if kind == "and" else a | b
  cls = dict(causal=M.CausalMask, local=M.LocalMask, chunked=M.ChunkedCausalMask,
             strided=M.StridedMask, global_=M.GlobalMask, document=M.DocumentMask)
  return cls["global_" if kind == "global" else kind](*p)


@st.composite
def segment_ids(draw):
  cuts = sorted(draw(st.lists(st.integers(1, MAX_LEN - 1), max_size=4)))
  ids = np.zeros(MAX_LEN, int)
  for c in cuts:
    ids[c:] += 1
  return tuple(int(i) for i in ids)


single_specs = st.one_of(
    st.tuples(st.just("causal"), st.integers(-3, 3)),
    st.tuples(st.just("local"), st.integers(0, 6), st.integers(0, 3)),
    st.tuples(st.just("chunked"), st.integers(1, 6)),
    st.tuples(st.just("strided"), st.integers(1, 5), st.integers(0, 4)),
    st.tuples(st.just("global"), st.integers(1, 4)),
    st.tuples(st.just("document"), segment_ids()))
mask_specs = st.one_of(single_specs,
                       st.tuples(st.sampled_from(("and", "or")), single_specs, single_specs))


def ref_dense(specs, t, s):
  """[H, t, s] (H = 1 for one spec)."""
  q, k = np.arange(t)[:, None], np.arange(s)[None, :]
  return np.stack([np.broadcast_to(ref_predicate(p, q, k), (t, s)) for p in specs])


@st.composite
def blocked_len(draw, max_len=MAX_LEN):
  """(length, block): length a multiple of the block, or a block larger than it."""
  block = draw(st.sampled_from((1, 2, 4, 8)))
  length = block * draw(st.integers(1, max_len // block))
  return length, draw(st.sampled_from((block, block, 64)))


@settings(max_examples=100)
@given(mask_specs, st.integers(1, 3), blocked_len(), blocked_len())
def test_dense_and_mask_info_agree_with_predicate(spec, heads, tq, tk):
  (t, bq), (s, bkv) = tq, tk
  bq, bkv = min(bq, t), min(bkv, s)
  specs = [spec] if heads == 1 else [spec] + [("causal", h) for h in range(heads - 1)]
  mask = build(spec) if heads == 1 else M.MultiHeadMask(tuple(map(build, specs)))
  want = ref_dense(specs, t, s)
  dense = mask.dense(t, s)
  np.testing.assert_array_equal(dense if heads > 1 else dense[None], want)
  info = mask_info(mask, t, s, bq, bkv)
  nq, nkv = t // bq, s // bkv
  tiles = want.reshape(heads, nq, bq, nkv, bkv).transpose(0, 1, 3, 2, 4)
  kind = np.where(tiles.all((-2, -1)), M.FULL, np.where(tiles.any((-2, -1)), M.PARTIAL,
                                                         M.EMPTY))
  np.testing.assert_array_equal(info.block_kind, kind)
  np.testing.assert_array_equal(info.nnz, want.sum((1, 2)))
  for h, i in np.ndindex(heads, nq):
    nonempty = np.flatnonzero(kind[h, i])
    count = info.kv_counts[h, i]
    assert count == nonempty.size
    np.testing.assert_array_equal(info.kv_blocks[h, i, :count], nonempty)
    pad = nonempty[-1] if nonempty.size else 0           # padding repeats the last one
    assert (info.kv_blocks[h, i, count:] == pad).all()
  for h, j in np.ndindex(heads, nkv):
    nonempty = np.flatnonzero(kind[h, :, j])
    assert info.q_counts[h, j] == nonempty.size
    np.testing.assert_array_equal(info.q_blocks[h, j, :nonempty.size], nonempty)
  partial = kind == M.PARTIAL
  assert ((info.partial_index >= 0) == partial).all()
  np.testing.assert_array_equal(info.partial_masks[info.partial_index[partial]],
                                tiles[partial])
  visited = (kind > 0).sum()
  want_eff = want.sum() / (visited * bq * bkv) if visited else 1.0
  assert math.isclose(info.block_efficiency, want_eff)


def ref_attention(q, k, v, allowed, scale):
  """float64 dense masked softmax; allowed [Hm, T, S]; zero rows where none allowed."""
  q, k, v = f64(q), f64(k), f64(v)
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) * scale
  logits = np.where(allowed[None], logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  p = np.exp(logits - np.where(np.isfinite(m), m, 0))
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom > 0, denom, 1)
  return np.einsum("bhts,bshv->bthv", p, v)


def jnp_attention(q, k, v, allowed, scale):
  """Dense f32 jnp version of `ref_attention` (for gradients)."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  logits = jnp.where(allowed[None], logits, -1e30)
  p = jnp.where(allowed[None], jax.nn.softmax(logits, -1), 0.0)
  return jnp.einsum("bhts,bshv->bthv", p, v)


@st.composite
def attention_case(draw, dtypes=float_dtypes):
  (t, bq), (s, bkv) = draw(blocked_len()), draw(blocked_len())
  b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
  d, dv = draw(st.integers(1, 8)), draw(st.integers(1, 8))
  spec = draw(mask_specs)
  per_head = draw(st.booleans()) and hkv * g > 1
  specs = [spec] + ([draw(single_specs) for _ in range(hkv * g - 1)] if per_head else [])
  mask = M.MultiHeadMask(tuple(map(build, specs))) if per_head else build(spec)
  rng, dtype = rng_for(draw), draw(dtypes)
  arr = lambda *shape: np.asarray(jnp.asarray(rng.standard_normal(shape), dtype))
  q, k, v = arr(b, t, hkv * g, d), arr(b, s, hkv, d), arr(b, s, hkv, dv)
  scale = draw(st.one_of(st.none(), st.floats(0.1, 2.0)))
  return q, k, v, mask, ref_dense(specs, t, s), scale, bq, bkv



@functools.partial(jax.jit, static_argnames="scale")
def ref_grads(q, k, v, allowed, do, scale):
  """Gradients of the dense f32 reference (q, k, v upcast) for cotangent `do`."""
  args = [a.astype(jnp.float32) for a in (q, k, v)]
  _, vjp = jax.vjp(lambda *a: jnp_attention(*a, allowed, scale), *args)
  return vjp(do.astype(jnp.float32))

@functools.partial(jax.jit, static_argnames=("mask", "scale", "bq", "bkv", "impl"))
def attention_and_grads(q, k, v, do, mask, scale, bq, bkv, impl="xla"):
  f = lambda q, k, v: block_sparse_attention(q, k, v, mask, scale=scale, block_q=bq,
                                             block_kv=bkv, impl=impl)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(do.astype(out.dtype)))


@pytest.mark.slow
@settings(max_examples=8)
@given(attention_case(), st.integers(0, 2**31))
def test_attention_matches_dense_reference(case, seed):
  q, k, v, mask, allowed, scale, bq, bkv = case
  do = np.random.default_rng(seed).standard_normal((*q.shape[:3], v.shape[-1]))
  out, dq, dk, dv = attention_and_grads(q, k, v, do, mask, scale, bq, bkv)
  sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
  assert_close(out, ref_attention(q, k, v, allowed, sc))
  empty_rows = ~allowed.any(-1)                                   # [Hm, T]
  rows = np.broadcast_to(empty_rows.T[None], q.shape[:3])
  assert (np.asarray(out)[rows] == 0).all()
  assert (np.asarray(dq)[rows] == 0).all()
  for got, want in zip((dq, dk, dv), ref_grads(q, k, v, allowed, do, sc)):
    assert got.dtype == q.dtype
    assert_close(got, f64(want), scale=max(1.0, np.abs(want).max()))


@settings(max_examples=8)
@given(st.integers(0, 2), st.integers(0, 2), float_dtypes, mask_specs)
def test_empty_sequences_give_zeros(t, s, dtype, spec):
  if t and s:
    t = 0
  q, k, v = jnp.ones((1, t, 2, 4), dtype), jnp.ones((1, s, 1, 4), dtype), jnp.ones(
      (1, s, 1, 3), dtype)
  out = block_sparse_attention(q, k, v, build(spec), impl="xla")
  assert out.shape == (1, t, 2, 3) and out.dtype == dtype and not np.asarray(out).any()


@given(st.data())
def test_bad_arguments_raise(data):
  b, t, s, hq, hkv, d = 1, 8, 8, 4, 2, 4
  q, k, v = (np.ones((b, t, hq, d), np.float32), np.ones((b, s, hkv, d), np.float32),
             np.ones((b, s, hkv, d), np.float32))
  ok = dict(q=q, k=k, v=v)
  causal = M.CausalMask()
  name = data.draw(st.sampled_from("qkv"))
  bad = dict(ok, **{name: ok[name].astype(data.draw(int_dtypes))})
  with pytest.raises(TypeError, match=f"{name} has dtype"):
    block_sparse_attention(bad["q"], bad["k"], bad["v"], causal, impl="xla")
  cases = [
      ("4-D", (q[0], k, v), {}),
      ("batch", (q, np.ones((2, s, hkv, d), np.float32), np.ones((2, s, hkv, d))), {}),
      ("head dim", (q, np.ones((b, s, hkv, d + 1)), v), {}),
      ("v shape", (q, k, np.ones((b, s + 1, hkv, d))), {}),
      ("Hkv", (q, np.ones((b, s, 3, d)), np.ones((b, s, 3, d))), {}),
      ("mask", (q, k, v), dict(mask="causal")),
      ("MultiHeadMask", (q, k, v), dict(mask=M.MultiHeadMask((causal,) * (hq + 1)))),
      ("scale=", (q, k, v), dict(scale=data.draw(st.sampled_from((0.0, -1.0, math.inf,
                                                                  math.nan))))),
  ]
  name, args, kwargs = data.draw(st.sampled_from(cases))
  kwargs.setdefault("mask", causal)
  with pytest.raises(ValueError, match=name):
    block_sparse_attention(*args, kwargs.pop("mask"), impl="xla", **kwargs)


def test_bad_block_sizes_name_the_argument():
  q = np.ones((1, 8, 2, 4), np.float32)
  for arg in ("block_q", "block_kv"):
    for size in (0, -2, 3, 2.0):
      with pytest.raises(ValueError, match=f"{arg}="):
        block_sparse_attention(q, q, q, M.CausalMask(), impl="xla", **{arg: size})


@given(st.data())
def test_bad_mask_arguments_raise(data):
  with pytest.raises(ValueError, match="left"):
    M.LocalMask(data.draw(st.sampled_from((-1, 1.5, None))))
  with pytest.raises(ValueError, match="chunk"):
    M.ChunkedCausalMask(data.draw(st.sampled_from((0, -3, 2.0))))
  with pytest.raises(ValueError, match="stride"):
    M.StridedMask(0, 2)
  with pytest.raises(ValueError, match="num_global"):
    M.GlobalMask(0)
  with pytest.raises(ValueError, match="segment_ids"):
    M.DocumentMask(data.draw(st.sampled_from(((), (0.5, 1.0), ((0, 1),)))))
  t = data.draw(st.integers(2, 12))
  with pytest.raises(ValueError, match="DocumentMask has"):
    M.DocumentMask((0,) * (t - 1)).dense(t, t)
  bq = data.draw(st.integers(1, t).filter(lambda b: t % b))
  with pytest.raises(ValueError, match="block_q"):
    mask_info(M.CausalMask(), t, t, bq, 1)
  with pytest.raises(ValueError, match="block_kv"):
    mask_info(M.CausalMask(), t, t, 1, bq)
  with pytest.raises(ValueError, match="q_len"):
    mask_info(M.CausalMask(), 0, t, 1, 1)


@pytest.mark.slow
@settings(max_examples=2)
@given(attention_case(dtypes=st.just(jnp.float32)).filter(
    lambda c: c[0].shape[1] % 8 == 0 and c[1].shape[1] % 8 == 0 and c[0].shape[1] <= 16
    and c[1].shape[1] <= 16), st.integers(0, 2**31))
def test_interpret_kernel_matches_xla(case, seed):
  """The Pallas kernels (interpret mode, 8-row blocks): same output and gradients."""
  q, k, v, mask, _, scale, _, _ = case
  do = np.random.default_rng(seed).standard_normal((*q.shape[:3], v.shape[-1]))
  got = attention_and_grads(q, k, v, do, mask, scale, 8, 8, impl="interpret")
  want = attention_and_grads(q, k, v, do, mask, scale, 8, 8)
  for a, b in zip(got, want):
    np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-5)
