"""Native Sparse Attention op (`sparsejax.ops.nsa`) against per-token NumPy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from sparsejax.ops import nsa

# A: the brief's tiny sizes (n = 2 < 3 forced blocks: priority current > previous);
# B: more selection blocks than n, so top-n really chooses (3 forced + 1 by score).
CONFIGS = {
    "A": dict(t=40, block_len=8, stride=4, select_block=16, num_selected=2, window=16),
    "B": dict(t=64, block_len=8, stride=4, select_block=8, num_selected=4, window=8),
}
HQ, HKV, D = 4, 2, 8


def _inputs(seed, t, b=1, dv=D):
  ks = jax.random.split(jax.random.key(seed), 10)
  q = jax.random.normal(ks[0], (b, t, HQ, D))
  kv = [jax.random.normal(ks[i], (b, t, HKV, D if i % 2 else dv)) for i in range(1, 7)]
  gates = jax.nn.sigmoid(jax.random.normal(ks[7], (b, t, HQ, 3)))
  phi_k = nsa.init_phi_params(ks[8], 8, D, 16, std=0.3)
  phi_v = nsa.init_phi_params(ks[9], 8, dv, 16, std=0.3)
  return q, kv, gates, phi_k, phi_v


def _run(q, kv, gates, **kw):
  kw = dict(kw)
  kw.pop("t", None)
  phis = dict(phi_k=kw.pop("phi_k", None), phi_v=kw.pop("phi_v", None))
  fn = jax.jit(functools.partial(nsa.nsa_attention, return_aux=True, **kw))
  return fn(q, *kv, gates, **phis)


# ------------------------------------------------------------------- NumPy reference

def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_phi(params, block):                     # block [l, D]
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = block + p["pos"]
  h = _np_gelu(x.reshape(-1) @ p["w1"] + p["b1"])
  return x.mean(0) + h @ p["w2"] + p["b2"]


def _np_softmax_av(logits, values):
  if len(logits) == 0:
    return np.zeros(values.shape[-1]), np.zeros(0)
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max())
  p = e / e.sum()
  return p @ values, p


def _np_nsa(q, kv, gates, phi_k, phi_v, *, block_len, stride, select_block,
            num_selected, window, t=None):
  """Per (batch, token, head) loop re-deriving the three branches from the spec."""
  del t
  q, gates = np.asarray(q, np.float64), np.asarray(gates, np.float64)
  kc_, vc_, ks_, vs_, kw_, vw_ = (np.asarray(a, np.float64) for a in kv)
  b_, t_, hq, d = q.shape
  g = hq // kv[0].shape[2]
  scale = 1 / math.sqrt(d)
  l, dd, ls, n, w = block_len, stride, select_block, num_selected, window
  nc = max(0, (t_ - l) // dd + 1)
  ns = -(-t_ // ls)
  out = {name: np.zeros((b_, t_, hq, vc_.shape[-1])) for name in ("cmp", "slc", "win")}
  sel = {}
  for b in range(b_):
    for h in range(kv[0].shape[2]):
      kcmp = np.array([_np_phi(phi_k, kc_[b, i * dd:i * dd + l, h]) for i in range(nc)])
      vcmp = np.array([_np_phi(phi_v, vc_[b, i * dd:i * dd + l, h]) for i in range(nc)])
      kcmp, vcmp = kcmp.reshape(nc, d), vcmp.reshape(nc, vc_.shape[-1])
      for t in range(t_):
        vis = [i for i in range(nc) if i * dd + l - 1 <= t]
        score = np.zeros(ns)
        for hh in range(h * g, (h + 1) * g):
          o, p = _np_softmax_av(kcmp[vis] @ q[b, t, hh] * scale, vcmp[vis])
          out["cmp"][b, t, hh] = o
          for i, pi in zip(vis, p):             # Eq. 9, overlap convention
            for j in range(ns):
              if i * dd < (j + 1) * ls and i * dd + l > j * ls:
                score[j] += pi
        c = t // ls
        forced = [c, c - 1, 0]                  # priority order
        chosen = []
        for j in forced + sorted(range(c + 1), key=lambda j: (-score[j], j)):
          if 0 <= j <= c and j not in chosen and len(chosen) < n:
            chosen.append(j)
        sel[b, t, h] = set(chosen)
        toks = [s for j in chosen for s in range(j * ls, (j + 1) * ls) if s <= t]
        win = list(range(max(0, t - w + 1), t + 1))
        for hh in range(h * g, (h + 1) * g):
          out["slc"][b, t, hh] = _np_softmax_av(ks_[b, toks, h] @ q[b, t, hh] * scale,
                                                vs_[b, toks, h])[0]
          out["win"][b, t, hh] = _np_softmax_av(kw_[b, win, h] @ q[b, t, hh] * scale,
                                                vw_[b, win, h])[0]
  total = sum(gates[..., i:i + 1] * out[c] for i, c in enumerate(("cmp", "slc", "win")))
  return total, out, sel


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_branches_match_numpy_loop(rng_seed, name):
  cfg = CONFIGS[name]
  q, kv, gates, phi_k, phi_v = _inputs(rng_seed, cfg["t"], dv=6)
  out, aux = _run(q, kv, gates, phi_k=phi_k, phi_v=phi_v, **cfg)
  want, branches, sel = _np_nsa(q, kv, gates, phi_k, phi_v, **cfg)
  idx, valid = np.asarray(aux["block_idx"]), np.asarray(aux["valid"])
  for (b, t, h), chosen in sel.items():
    assert set(idx[b, t, h][valid[b, t, h]].tolist()) == chosen, (b, t, h)
  for c in ("cmp", "slc", "win"):
    np.testing.assert_allclose(aux[f"o_{c}"], branches[c], rtol=1e-4, atol=1e-5,
                               err_msg=c)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  # rows that see no compressed block (t < l - 1) give exactly 0, not NaN
  assert np.all(np.asarray(aux["o_cmp"])[:, :cfg["block_len"] - 1] == 0)
  # the dense masked window reference agrees with the block-sparse window path
  ref = nsa.window_attention_reference(q, kv[4], kv[5], cfg["window"])
  np.testing.assert_allclose(ref, aux["o_win"], rtol=1e-5, atol=1e-6)


def test_selection_scores_eq9_hand_made():
  # l=8, d=4, l'=16, S=40: compression block i = tokens [4i, 4i+8), 9 blocks;
  # selection block j = [16j, 16j+16), 3 blocks. Overlap: i in {4j-1, ..., 4j+3}.
  overlap = nsa.selection_overlap(9, 3, 8, 4, 16)
  want = np.zeros((9, 3))
  want[0:4, 0] = want[3:8, 1] = want[7:9, 2] = 1
  np.testing.assert_array_equal(overlap, want)
  # paper config l=32, d=16, l'=64: selection block j <- compression blocks 4j-1..4j+3
  big = nsa.selection_overlap(20, 4, 32, 16, 64)
  assert np.flatnonzero(big[:, 2]).tolist() == [7, 8, 9, 10, 11]
  # two query heads in one GQA group: p = 2^i and p = 1 -> sums over overlaps + counts
  p = np.stack([2.0 ** np.arange(9), np.ones(9)])[None, None]         # [1, 1, 2, 9]
  scores = nsa.selection_scores(jnp.asarray(p), 8, 4, 16, num_kv_heads=1,
                                num_sel_blocks=3)
  np.testing.assert_allclose(scores[0, 0, 0], [15 + 4, 248 + 5, 384 + 2])
  per_head = nsa.selection_scores(jnp.asarray(p), 8, 4, 16, num_kv_heads=2,
                                  num_sel_blocks=3)
  np.testing.assert_allclose(per_head[0, 0], [[15, 248, 384], [4, 5, 2]])


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_forced_blocks_always_selected_and_no_future_block(rng_seed, n):
  t, ls, ns = 64, 8, 8
  scores = jax.random.uniform(jax.random.key(rng_seed), (2, t, 3, ns)) * 4
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  idx, valid = jax.jit(nsa.select_blocks, static_argnums=(2, 3))(scores, pos, n, ls)
  idx, valid, scores = np.asarray(idx), np.asarray(valid), np.asarray(scores)
  for b in range(2):
    for tt in range(t):
      c = tt // ls
      for h in range(3):
        chosen = idx[b, tt, h][valid[b, tt, h]].tolist()
        assert len(set(chosen)) == len(chosen) == min(n, c + 1)
        assert max(chosen) <= c                            # never a future block
        forced = list(dict.fromkeys(j for j in (c, c - 1, 0) if j >= 0))
        assert set(forced[:n]) <= set(chosen)              # priority current, prev, initial
        free = [j for j in chosen if j not in forced[:n]]
        rest = [j for j in range(c + 1) if j not in chosen]
        if free and rest:                                  # the others are the top scores
          assert scores[b, tt, h, free].min() >= scores[b, tt, h, rest].max()


@pytest.mark.slow
def test_full_coverage_equals_causal_attention(rng_seed):
  t = 48
  q, kv, gates, _, _ = _inputs(rng_seed, t, b=2)
  kw = dict(block_len=8, stride=4, select_block=16, num_selected=3, window=t)
  _, aux = _run(q, kv, gates, **kw)
  for branch, (k, v) in (("slc", kv[2:4]), ("win", kv[4:6])):
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(aux[f"o_{branch}"], want, rtol=1e-4, atol=1e-5,
                               err_msg=branch)


def test_gradients_reach_compression_kv_only_through_compression_branch(rng_seed):
  cfg = dict(CONFIGS["A"])
  t = cfg.pop("t")
  q, kv, gates, phi_k, phi_v = _inputs(rng_seed, t)
  r = jax.random.normal(jax.random.key(rng_seed + 1), q.shape)

  @jax.jit
  def grads(q, kv, gates, phis):
    def loss(q, kv, phis):
      out = nsa.nsa_attention(q, *kv, gates, phi_k=phis[0], phi_v=phis[1], **cfg)
      return jnp.sum(out * r)
    return jax.grad(loss, argnums=(0, 1, 2))(q, kv, phis)

  gq, gkv, gphi = grads(q, kv, gates, (phi_k, phi_v))
  for g in jax.tree.leaves((gq, gkv, gphi)):
    assert np.isfinite(g).all() and np.abs(g).max() > 0
  _, gkv0, gphi0 = grads(q, kv, gates.at[..., 0].set(0.0), (phi_k, phi_v))
  for g in jax.tree.leaves((gkv0[:2], gphi0)):            # k_cmp, v_cmp, φ params
    assert np.all(np.asarray(g) == 0)
  assert all(np.abs(g).max() > 0 for g in gkv0[2:])


def _branch_reads(s, l, d, n, ls, w, seed):
  """Counts the tokens the three branches read for the query at position s - 1."""
  nc = nsa.num_compressed_blocks(s, l, d)
  n_cmp = int((nsa.compressed_block_ends(nc, l, d) <= s - 1).sum())
  ns = -(-s // ls)
  scores = jax.random.uniform(jax.random.key(seed), (1, 1, 1, ns))
  idx, valid = nsa.select_blocks(scores, jnp.full((1, 1), s - 1), n, ls)
  blocks = np.asarray(idx)[valid]
  n_slc = sum(1 for j in blocks for x in range(j * ls, (j + 1) * ls) if x <= s - 1)
  n_win = sum(1 for x in range(s) if s - 1 - w < x <= s - 1)
  return n_cmp + n_slc + n_win


@pytest.mark.slow
def test_decode_token_count_and_paper_table4(rng_seed):
  small = dict(block_len=8, stride=4, num_selected=2, select_block=16, window=16)
  for s in (1, 5, 8, 9, 17, 31, 32, 33, 64, 100, 128, 129):
    reads = _branch_reads(s, 8, 4, 2, 16, 16, rng_seed + s)
    assert nsa.nsa_decode_tokens(s, **small, exact=True) == reads, s
    assert nsa.nsa_decode_tokens(s, **small) <= s
    if s >= 64 and s % 16 == 0:   # unclipped; the paper omits the block ending at s-1
      assert nsa.nsa_decode_tokens(s, **small) == reads - 1 == (s - 8) // 4 + 2 * 16 + 16
  paper = {8192: (2048, 4.0), 16384: (2560, 6.4), 32768: (3584, 9.1), 65536: (5632, 11.6)}
  for s, (tokens, ratio) in paper.items():
    got = nsa.nsa_decode_tokens(s)                        # l=32, d=16, n=16, l'=64, w=512
    assert got == (s - 32) // 16 + 16 * 64 + 512 and abs(got - tokens) <= 2
    assert round(s / got, 1) == ratio
  assert nsa.nsa_decode_tokens(4096, exact=True) == nsa.nsa_decode_tokens(4096) + 1 == 1791
  assert nsa.nsa_decode_tokens(100) == 100                # small caches: dense


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=9), "stride=9"), (dict(num_selected=0), "num_selected=0"),
    (dict(window=0), "window=0"), (dict(block_len=0), "block_len=0")])
def test_bad_config_raises(kwargs, match):
  q, kv, gates, _, _ = _inputs(0, 16)
  cfg = {**dict(block_len=8, stride=4, select_block=8, num_selected=2, window=4), **kwargs}
  with pytest.raises(ValueError, match=match):
    nsa.nsa_attention(q, *kv, gates, **cfg)
  with pytest.raises(ValueError, match="gates shape"):
    nsa.nsa_attention(q, *kv, gates[..., :2], block_len=8, stride=4, select_block=8,
                      num_selected=2, window=4)


@pytest.mark.slow
@pytest.mark.parametrize("t", [5, 1], ids=["t<l", "t=1"])
def test_sequences_shorter_than_a_compression_block(rng_seed, t):
  """S < l: no compressed block; the compression branch gives 0, only forced blocks
  are selected, and everything matches the NumPy loop (forward, finite grads)."""
  cfg = dict(CONFIGS["A"], t=t)
  q, kv, gates, phi_k, phi_v = _inputs(rng_seed, t, dv=6)
  out, aux = _run(q, kv, gates, phi_k=phi_k, phi_v=phi_v, **cfg)
  want, branches, _ = _np_nsa(q, kv, gates, phi_k, phi_v, **cfg)
  assert aux["p_cmp"].shape == (1, t, HQ, 0) and (np.asarray(aux["o_cmp"]) == 0).all()
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  grads = jax.jit(jax.grad(lambda q: nsa.nsa_attention(
      q, *kv, gates, phi_k=phi_k, phi_v=phi_v,
      **{k: v for k, v in cfg.items() if k != "t"}).sum()))(q)
  assert np.isfinite(grads).all() and np.abs(grads).max() > 0


def test_empty_sequence():
  q, kv, gates, phi_k, phi_v = _inputs(0, 0)
  cfg = {k: v for k, v in CONFIGS["A"].items() if k != "t"}
  out = nsa.nsa_attention(q, *kv, gates, phi_k=phi_k, phi_v=phi_v, **cfg)
  assert out.shape == (1, 0, HQ, D)


def _selection_inputs(seed, t=24, s=24, n=3, ls=8):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((2, t, HQ, D)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, s, HKV, D)), jnp.float32) for _ in "kv")
  scores = jnp.asarray(rng.random((2, t, HKV, -(-s // ls))), jnp.float32)
  idx, valid = nsa.select_blocks(scores, jnp.broadcast_to(jnp.arange(t), (2, t)), n, ls,
                                 num_initial=0, num_local=1)
  return q, k, v, np.asarray(idx), np.asarray(valid)


@pytest.mark.slow
def test_invalid_block_ids_contribute_nothing(rng_seed):
  """Valid slots holding -1 (padding) or ids >= ceil(S/l') give exactly the output and
  grads of the same call with those slots marked invalid: query 0 never sees keys of
  a wrapped-around block; `check_indices=True` makes checkify report them."""
  q, k, v, idx, valid = _selection_inputs(rng_seed)
  bad = np.random.default_rng(rng_seed).random(idx.shape) < 0.3
  bad[:, 0] = True                                        # token 0: only bad slots
  bad_idx = np.where(bad, np.where(np.arange(idx.shape[-1]) % 2, -1, 3), idx)
  cot = jax.random.normal(jax.random.key(rng_seed), q.shape)

  def run(idx, valid):
    f = lambda q, k, v: nsa.selected_attention(q, k, v, idx, valid, 8, impl="xla")
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(cot)

  got = jax.jit(run)(bad_idx, valid | bad)
  want = jax.jit(run)(idx, valid & ~bad)
  for x, y in zip(got, want):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert (np.asarray(got[0])[:, 0] == 0).all()
  checked = checkify.checkify(jax.jit(lambda idx: nsa.selected_attention(
      q, k, v, idx, valid | bad, 8, check_indices=True)))
  err, _ = checked(jnp.asarray(bad_idx))
  assert "block_idx of a valid slot must be in [0, 3)" in err.get()
  err, _ = checked(jnp.asarray(idx))
  assert err.get() is None


def test_window_impl_values():
  q, kv, gates, _, _ = _inputs(0, 16)
  with pytest.raises(ValueError, match="impl='reference' must be one of"):
    nsa.window_attention(q, kv[4], kv[5], 4, impl="reference")
  with pytest.raises(TypeError, match="k has dtype int32"):
    nsa.window_attention(q, kv[4].astype(jnp.int32), kv[5], 4)


@pytest.mark.slow
def test_compressed_keys_take_the_rope_scaling(rng_seed):
  """cmp_rope_scaling: linear factor f rotates compressed block i at its last position
  (i·d + l − 1)/f (position interpolation), not at i·d + l − 1."""
  cfg = dict(CONFIGS["B"], cmp_rope_theta=100.0)
  q, kv, gates, phi_k, _ = _inputs(rng_seed, cfg["t"])
  scaling = nsa.attention_ops.RopeScaling("linear", 4.0)
  _, aux = _run(q, kv, gates, phi_k=phi_k, cmp_rope_scaling=scaling, **cfg)
  kc, vc = nsa.compress(kv[0], 8, 4, phi_k), nsa.compress(kv[1], 8, 4)
  ends = nsa.compressed_block_ends(kc.shape[1], 8, 4)
  rotate = lambda pos: nsa.attention_ops.rope(kc, jnp.broadcast_to(pos, kc.shape[:2]),
                                              100.0)
  want, _ = nsa.compression_attention(q, rotate(ends / 4.0), vc, 8, 4)
  unscaled, _ = nsa.compression_attention(q, rotate(ends), vc, 8, 4)
  np.testing.assert_allclose(aux["o_cmp"], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(aux["o_cmp"], unscaled, atol=1e-3)
