"""Product-key retrieval (PKM, TDQKR, IVE) and the XLA memory lookup vs NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.ops import memory as memory_ops
from sparsejax.ops import product_keys


def _normal(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def test_pkm_equals_brute_force_top_k_over_all_slots(rng_seed):
  rng = np.random.default_rng(rng_seed)
  t, h, n, kdim, k = 5, 2, 9, 6, 4
  q1, q2 = _normal(rng, t, h, kdim), _normal(rng, t, h, kdim)
  k1, k2 = _normal(rng, h, n, kdim), _normal(rng, h, n, kdim)
  weights, slots = product_keys.pkm_retrieve(q1, q2, k1, k2, k)
  for ti in range(t):
    for hi in range(h):
      full = (q1[ti, hi] @ k1[hi].T)[:, None] + (q2[ti, hi] @ k2[hi].T)[None, :]
      best = np.argsort(-full.ravel())[:k]                      # slot = i·n + j
      np.testing.assert_array_equal(slots[ti, hi], best)
      p = np.exp(full.ravel()[best] - full.ravel()[best].max())
      np.testing.assert_allclose(weights[ti, hi], p / p.sum(), rtol=1e-5)


def _tdqkr_numpy(q_row, q_col, keys_row, keys_col, cores, u, v, m):
  """Loop re-derivation of UltraMem TDQKR (Huang et al. 2025, §3) one token at a time."""
  t, h, n = q_row.shape[0], keys_row.shape[0], keys_row.shape[1]
  scores = np.zeros((t, h, m, cores.shape[1]), np.float32)
  slots = np.zeros((t, h, m), np.int64)
  for ti in range(t):
    for hi in range(h):
      s_row = np.einsum("d,nrd->nr", q_row[ti], keys_row[hi])
      s_col = np.einsum("d,nrd->nr", q_col[ti], keys_col[hi])
      rows = np.argsort(-(s_row @ u[hi]), kind="stable")[:m]
      cols = np.argsort(-(s_col @ v[hi]), kind="stable")[:m]
      cands = [(i, j, [s_row[i] @ core @ s_col[j] for core in cores[hi]])
               for i in rows for j in cols]
      cands.sort(key=lambda c: -sum(c[2]))
      for slot, (i, j, per_core) in enumerate(cands[:m]):
        scores[ti, hi, slot], slots[ti, hi, slot] = per_core, i * n + j
  return scores, slots


@pytest.mark.slow
@pytest.mark.parametrize("r,c,m", [(2, 2, 3), (1, 1, 4), (3, 2, 2)])
def test_tdqkr_matches_loop_reference(rng_seed, r, c, m):
  rng = np.random.default_rng(rng_seed)
  t, h, n, kdim = 4, 2, 7, 5
  q_row, q_col = _normal(rng, t, kdim), _normal(rng, t, kdim)
  keys_row, keys_col = _normal(rng, h, n, r, kdim), _normal(rng, h, n, r, kdim)
  cores = rng.uniform(size=(h, c, r, r)).astype(np.float32)
  u, v = product_keys.tucker_rank_one(jnp.asarray(cores))
  got_scores, got_slots = product_keys.tdqkr_retrieve(q_row, q_col, keys_row, keys_col,
                                                      cores, u, v, m)
  want_scores, want_slots = _tdqkr_numpy(q_row, q_col, keys_row, keys_col, cores,
                                         np.asarray(u), np.asarray(v), m)
  np.testing.assert_array_equal(got_slots, want_slots)
  np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-5)


def test_tdqkr_is_exact_when_the_candidate_grid_covers_all_keys(rng_seed):
  """m = n: the surrogate selects every row/column, so the result is the exact top-m of
  G = Σ_c S_row C_c S_colᵀ over all n² slots, whatever u, v are (scores can be < 0)."""
  rng = np.random.default_rng(rng_seed)
  t, h, n, kdim, r, c = 3, 2, 5, 4, 2, 2
  q_row, q_col = _normal(rng, t, kdim), _normal(rng, t, kdim)
  keys_row, keys_col = _normal(rng, h, n, r, kdim), _normal(rng, h, n, r, kdim)
  cores = _normal(rng, h, c, r, r)
  u, v = _normal(rng, h, r), _normal(rng, h, r)
  scores, slots = product_keys.tdqkr_retrieve(q_row, q_col, keys_row, keys_col, cores,
                                              u, v, n)
  s_row = np.einsum("td,hnrd->thnr", q_row, keys_row)
  s_col = np.einsum("td,hnrd->thnr", q_col, keys_col)
  full = np.einsum("thia,hcab,thjb->thijc", s_row, cores, s_col).reshape(t, h, n * n, c)
  best = np.argsort(-full.sum(-1), axis=-1)[..., :n]
  np.testing.assert_array_equal(slots, best)
  np.testing.assert_allclose(scores, np.take_along_axis(full, best[..., None], 2),
                             rtol=1e-4, atol=1e-5)
  assert (np.asarray(scores) < 0).any()                 # raw scores, no nonlinearity


def test_tucker_rank_one_is_the_leading_singular_pair_and_sign_aligned(rng_seed):
  rng = np.random.default_rng(rng_seed)
  cores = jnp.asarray(rng.uniform(size=(3, 2, 4, 4)), jnp.float32)
  u, v = product_keys.tucker_rank_one(cores)
  summed = np.asarray(cores).sum(1)
  sigma = np.linalg.svd(summed, compute_uv=False)[:, 0]
  np.testing.assert_allclose(np.einsum("hab,hb->ha", summed, v), sigma[:, None] * u,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
  flip = np.array([1.0, -1.0, -1.0])[:, None]           # previous signs per head
  u2, v2 = product_keys.tucker_rank_one(cores, u * flip + 0.01, v * flip - 0.01)
  np.testing.assert_allclose(u2, u * flip, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v2, v * flip, rtol=1e-5, atol=1e-6)


def test_singular_value_loss(rng_seed):
  rng = np.random.default_rng(rng_seed)
  cores = rng.uniform(size=(2, 2, 3, 3)).astype(np.float32)
  sigma = np.linalg.svd(cores.sum(1), compute_uv=False)
  want = np.mean(np.maximum(sigma[:, 1:] - 0.15, 0) ** 2)
  np.testing.assert_allclose(product_keys.tucker_singular_value_loss(cores), want,
                             rtol=1e-4)
  assert float(product_keys.tucker_singular_value_loss(cores[:, :, :1, :1])) == 0.0


def test_implicit_value_expansion_with_multi_core_scoring(rng_seed):
  """Grouped lookup of the [N·C, v/C] view == loop over slots: chunk c of V[ρ] scaled by
  G_c, summed into virtual block e = ⌊perm[p]/N⌋."""
  rng = np.random.default_rng(rng_seed)
  t, s, c, e, rows, vdim = 3, 6, 2, 4, 10, 8
  values = _normal(rng, rows, vdim)
  perm = rng.permutation(e * rows).astype(np.int32)
  slots = rng.integers(0, e * rows, (t, s)).astype(np.int32)
  slots[0, :3] = slots[0, 0]                             # duplicates just add
  scores = _normal(rng, t, s, c)
  idx, w, groups = product_keys.implicit_value_expansion(slots, scores, perm, rows)
  out = memory_ops.memory_lookup(values.reshape(rows * c, vdim // c), idx, w,
                                 groups=groups, num_groups=e * c, impl="xla")
  want = np.zeros((t, e, vdim), np.float32)
  for ti in range(t):
    for si in range(s):
      block, row = divmod(int(perm[slots[ti, si]]), rows)
      chunks = values[row].reshape(c, vdim // c) * scores[ti, si][:, None]
      want[ti, block] += chunks.reshape(vdim)
  np.testing.assert_allclose(np.asarray(out).reshape(t, e, vdim), want, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True])
def test_memory_lookup_xla_forward_and_backward(rng_seed, grouped):
  """vs autodiff of a NumPy-style one-hot formulation, with duplicate and hot rows."""
  key = jax.random.key(rng_seed)
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  n, v, k, g = 40, 12, 6, 3
  values = jax.random.normal(k1, (n, v))
  indices = jax.random.randint(k2, (2, 5, k), 0, n).at[0, :, 0].set(7).at[1, 0, :].set(3)
  weights = jax.random.normal(k3, (2, 5, k))
  groups = jax.random.randint(k4, (2, 5, k), 0, g) if grouped else None
  kwargs = dict(groups=groups, num_groups=g) if grouped else {}

  def naive(values, weights):
    rows = jnp.einsum("...kn,nv->...kv", jax.nn.one_hot(indices, n), values)
    if not grouped:
      return jnp.einsum("...k,...kv->...v", weights, rows)
    return jnp.einsum("...k,...kg,...kv->...gv", weights, jax.nn.one_hot(groups, g), rows)

  out = memory_ops.memory_lookup(values, indices, weights, impl="xla", **kwargs)
  np.testing.assert_allclose(out, naive(values, weights), rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(k5, out.shape)
  got = jax.jit(jax.grad(lambda a, b: jnp.sum(memory_ops.memory_lookup(
      a, indices, b, impl="xla", **kwargs) * cot), (0, 1)))(values, weights)
  want = jax.jit(jax.grad(lambda a, b: jnp.sum(naive(a, b) * cot), (0, 1)))(values,
                                                                          weights)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_memory_lookup_rejects_bad_input():
  values = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="weights shape"):
    memory_ops.memory_lookup(values, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="num_groups"):
    memory_ops.memory_lookup(values, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)),
                             groups=jnp.zeros((2, 3), jnp.int32), num_groups=0)
  with pytest.raises(ValueError, match="values must be 2-D"):
    memory_ops.memory_lookup(jnp.ones(4), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_sorted_segment_rows_both_paths_equal_numpy(rng_seed, monkeypatch, backend):
  """The GPU path (stable sort + segmented scan, no atomics) is traced here on CPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  rng = np.random.default_rng(rng_seed)
  indices = rng.integers(0, 9, 50).astype(np.int32)
  indices[:12] = 4                                                  # a hot row
  contrib = _normal(rng, 50, 3)
  want = np.zeros((11, 3), np.float32)
  np.add.at(want, indices, contrib)
  got = jax.jit(memory_ops.sorted_segment_rows, static_argnums=2)(indices, contrib, 11)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
