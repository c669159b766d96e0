"""SET / RigL mask updates against NumPy references of the RigL reference algorithm:
exact active counts, dropped = smallest |w| among the active, grown = largest |grad| (SET:
largest noise) among the inactive after the drop; traced drop fractions, pytrees with
dense (None) leaves, and sharded inputs over fsdp × tensor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.sharding import MeshConfig, make_mesh
from sparsejax.sparsity import rigl_update, set_update


def np_drop_grow(w, mask, grow_score, fraction):
  """RigL's reference update on flat arrays: keep the n_keep largest |w| among the active
  (stable descending sort: ties keep the lower index), then grow the n_prune largest
  grow scores among the rest (inactive after the drop)."""
  w, mask, grow_score = w.ravel(), mask.ravel(), grow_score.ravel()
  n_ones = int(mask.sum())
  n_prune = int(np.float32(n_ones) * np.float32(fraction))
  active = np.flatnonzero(mask)
  order = active[np.argsort(-np.abs(w[active]), kind="stable")]
  kept = np.zeros_like(mask)
  kept[order[:n_ones - n_prune]] = True
  inactive = np.flatnonzero(~kept)
  order = inactive[np.argsort(-grow_score[inactive], kind="stable")]
  grown = np.zeros_like(mask)
  grown[order[:n_prune]] = True
  return kept | grown, kept, grown, n_prune


def _sparse_state(rng, shape, density, ties=False):
  n = int(np.prod(shape))
  mask = (rng.permutation(n) < max(4, round(density * n))).reshape(shape)
  w = rng.standard_normal(shape).astype(np.float32)
  if ties:
    w = np.round(w).astype(np.float32)         # many equal magnitudes (and zeros)
  g = rng.standard_normal(shape).astype(np.float32)
  if ties:
    g = np.round(g * 2).astype(np.float32)
  return np.where(mask, w, 0).astype(np.float32), mask, g


@pytest.mark.parametrize("ties", [False, True])
def test_rigl_matches_reference_and_invariants(rng_seed, ties):
  rng = np.random.default_rng(rng_seed)
  for shape in [(16, 12), (7, 3, 5)]:
    w, mask, g = _sparse_state(rng, shape, rng.uniform(0.1, 0.6), ties)
    fraction = float(rng.uniform(0.05, 0.5))
    got = np.asarray(rigl_update(jnp.asarray(w), jnp.asarray(mask), jnp.asarray(g),
                                 drop_fraction=fraction))
    want, kept, grown, k = np_drop_grow(w, mask, np.abs(g), fraction)
    assert got.dtype == bool and got.shape == shape
    np.testing.assert_array_equal(got.ravel(), want)
    assert got.sum() == mask.sum() and k > 0
    # Invariants, independent of the reference's sort.
    dropped = mask.ravel() & ~kept
    assert dropped.sum() == k
    if k:
      assert np.abs(w.ravel()[dropped]).max() <= np.abs(w.ravel()[kept]).min()
      assert np.abs(g.ravel()[grown]).min() >= np.abs(g.ravel()[~kept & ~grown]).max()
      # An entry both dropped and grown is only one whose |grad| beat the other candidates.
      regrown = dropped & grown
      assert not regrown.any() or (np.abs(g.ravel()[regrown]).min()
                                   >= np.abs(g.ravel()[~kept & ~grown]).max())


def test_rigl_regrows_a_dropped_weight_with_the_largest_gradient(rng_seed):
  rng = np.random.default_rng(rng_seed)
  w, mask, g = _sparse_state(rng, (8, 8), 0.5)
  smallest = np.flatnonzero(mask.ravel())[np.argmin(np.abs(w.ravel()[mask.ravel()]))]
  g.ravel()[smallest] = 100.0
  got = np.asarray(rigl_update(w, mask, g, drop_fraction=0.25)).ravel()
  assert got[smallest] and got.sum() == mask.sum()


@pytest.mark.slow
def test_set_matches_reference_with_the_same_noise(rng_seed):
  rng = np.random.default_rng(rng_seed)
  key = jax.random.key(rng_seed)
  shapes = {"a": (12, 8), "b": (9,)}
  state = {k: _sparse_state(rng, s, 0.4) for k, s in shapes.items()}
  weights = {k: jnp.asarray(v[0]) for k, v in state.items()}
  masks = {k: jnp.asarray(v[1]) for k, v in state.items()}
  weights["dense"], masks["dense"] = jnp.ones((3, 3)), None
  got = set_update(weights, masks, drop_fraction=0.3, key=key)
  assert got["dense"] is None
  for i, name in enumerate(sorted(shapes)):     # tree order of a dict: sorted keys
    noise = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), shapes[name]))
    want, kept, grown, k = np_drop_grow(state[name][0], state[name][1], noise, 0.3)
    np.testing.assert_array_equal(np.asarray(got[name]).ravel(), want)
    assert int(got[name].sum()) == state[name][1].sum() and k > 0
  other = set_update(weights, masks, drop_fraction=0.3, key=jax.random.fold_in(key, 7))
  assert not np.array_equal(other["a"], got["a"])       # the key decides the growth


def test_traced_drop_fraction_and_edges(rng_seed):
  rng = np.random.default_rng(rng_seed)
  w, mask, g = (jnp.asarray(a) for a in _sparse_state(rng, (10, 10), 0.3))
  f = jax.jit(lambda fr: rigl_update(w, mask, g, drop_fraction=fr))
  for fraction in (0.0, 0.17, 0.5, 1.0):
    np.testing.assert_array_equal(f(jnp.float32(fraction)),
                                  rigl_update(w, mask, g, drop_fraction=fraction))
  np.testing.assert_array_equal(rigl_update(w, mask, g, drop_fraction=0.0), mask)
  full = rigl_update(w, mask, g, drop_fraction=1.0)   # every active entry re-chosen by |g|
  want, *_ = np_drop_grow(np.asarray(w), np.asarray(mask), np.abs(np.asarray(g)), 1.0)
  np.testing.assert_array_equal(np.asarray(full).ravel(), want)


def test_errors():
  w, mask = jnp.ones((4, 4)), jnp.ones((4, 4), bool)
  with pytest.raises(ValueError, match="drop_fraction"):
    rigl_update(w, mask, w, drop_fraction=1.5)
  with pytest.raises(ValueError, match="grads shape"):
    rigl_update(w, mask, jnp.ones((4, 3)), drop_fraction=0.3)
  with pytest.raises(ValueError, match="drop_fraction"):
    set_update(w, mask, drop_fraction=-0.1, key=jax.random.key(0))


@pytest.mark.slow
def test_sharded_updates_keep_sharding_and_equal_single_device(rng_seed):
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  sharding = NamedSharding(mesh, P("fsdp", "tensor"))
  rng = np.random.default_rng(rng_seed)
  w, mask, g = _sparse_state(rng, (16, 8), 0.4, ties=True)
  key = jax.random.key(rng_seed)
  fns = {"rigl": lambda w, m, g: rigl_update(w, m, g, drop_fraction=0.3),
         "set": lambda w, m, g: set_update(w, m, drop_fraction=0.3, key=key)}
  args = [jax.device_put(a, sharding) for a in (w, mask, g)]
  for name, fn in fns.items():
    want = np.asarray(fn(w, mask, g))
    jitted = jax.jit(fn)
    for got in (fn(*args), jitted(*args)):
      assert got.sharding.is_equivalent_to(sharding, 2), (name, got.sharding)
      np.testing.assert_array_equal(got, want, err_msg=name)
    assert "all-gather" not in jitted.lower(*args).compile().as_text(), name
