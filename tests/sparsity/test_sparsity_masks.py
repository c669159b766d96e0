"""topk / N:M / block / channel masks against NumPy references (exact counts, ties at the
lower flat index), traced densities, errors, and sharded inputs over fsdp × tensor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.sharding import MeshConfig, make_mesh
from sparsejax.sparsity import block_mask, channel_mask, nm_mask, topk_mask


def np_topk(scores: np.ndarray, k: int) -> np.ndarray:
  """The k largest scores, ties to the lower flat index (stable descending sort)."""
  flat = scores.ravel()
  mask = np.zeros(flat.shape, bool)
  mask[np.argsort(-flat, kind="stable")[:k]] = True
  return mask.reshape(scores.shape)


def _scores(rng, shape, ties: bool):
  """Random scores; with ties, a handful of distinct values (many equal scores)."""
  if ties:
    return rng.integers(0, 4, shape).astype(np.float32)
  return np.abs(rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(37,), (12, 10), (3, 5, 7)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_mask_matches_numpy(rng_seed, shape, ties):
  rng = np.random.default_rng(rng_seed)
  scores = _scores(rng, shape, ties)
  n = scores.size
  for density in (0.0, rng.uniform(0.05, 0.95), 0.5, 1.0):
    k = round(density * n)
    got = np.asarray(topk_mask(jnp.asarray(scores), density))
    assert got.dtype == bool and got.sum() == k
    np.testing.assert_array_equal(got, np_topk(scores, k))


def test_topk_mask_special_values_and_dtypes(rng_seed):
  # NaN ranks above +inf, -0.0 ties with +0.0 (lower index kept), -inf lowest.
  s = np.array([0.0, -np.inf, np.nan, -0.0, np.inf, -1.0, 0.0], np.float32)
  order = [2, 4, 0, 3, 6, 5, 1]
  for k in range(len(s) + 1):
    want = np.zeros(len(s), bool)
    want[order[:k]] = True
    np.testing.assert_array_equal(topk_mask(jnp.asarray(s), k / len(s)), want)
  rng = np.random.default_rng(rng_seed)
  x = rng.standard_normal((9, 8)).astype(np.float32)
  for dtype in (jnp.bfloat16, jnp.float16):
    xd = jnp.asarray(x, dtype)
    want = np_topk(np.asarray(xd.astype(jnp.float32)), 29)
    np.testing.assert_array_equal(topk_mask(xd, 29 / 72), want)


def test_traced_density_equals_concrete(rng_seed):
  rng = np.random.default_rng(rng_seed)
  scores = jnp.asarray(_scores(rng, (16, 6), ties=True))
  f = jax.jit(lambda s, d: (topk_mask(s, d), block_mask(s, d, (4, 2)),
                            channel_mask(s, d, axis=1)))
  for density in (0.0, 0.3, 0.71, 1.0):
    got = f(scores, jnp.float32(density))
    want = (topk_mask(scores, density), block_mask(scores, density, (4, 2)),
            channel_mask(scores, density, axis=1))
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)


def test_pytree_scores_with_per_tensor_densities(rng_seed):
  rng = np.random.default_rng(rng_seed)
  scores = {"a": jnp.asarray(_scores(rng, (8, 4), False)),
            "b": jnp.asarray(_scores(rng, (5,), True)), "c": None}
  masks = topk_mask(scores, {"a": 0.25, "b": 0.6, "c": None})
  assert masks["c"] is None
  np.testing.assert_array_equal(masks["a"], np_topk(np.asarray(scores["a"]), 8))
  np.testing.assert_array_equal(masks["b"], np_topk(np.asarray(scores["b"]), 3))
  one = topk_mask(scores, 0.5)
  assert int(one["a"].sum()) == 16 and int(one["b"].sum()) == 2


def np_nm(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
  s = np.moveaxis(scores, axis, -1)
  groups = s.reshape(-1, m)
  mask = np.zeros(groups.shape, bool)
  for g, row in enumerate(groups):
    mask[g, np.argsort(-row, kind="stable")[:n]] = True
  return np.moveaxis(mask.reshape(s.shape), -1, axis)


@pytest.mark.slow
@pytest.mark.parametrize("n,m,axis", [(2, 4, 0), (4, 8, 0), (1, 4, 1), (3, 4, -1),
                                      (0, 2, 0), (2, 2, 0)])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_mask_matches_numpy(rng_seed, n, m, axis, ties):
  rng = np.random.default_rng(rng_seed)
  scores = _scores(rng, (16, 8), ties)
  got = np.asarray(nm_mask(jnp.asarray(scores), n, m, axis=axis))
  np.testing.assert_array_equal(got, np_nm(scores, n, m, axis))
  assert got.sum() == scores.size * n // m


def np_block(scores, density, block, pool):
  (h, w), (bh, bw) = scores.shape, block
  tiles = scores.reshape(h // bh, bh, w // bw, bw).astype(np.float64)
  pooled = tiles.mean(axis=(1, 3)) if pool == "mean" else tiles.max(axis=(1, 3))
  kept = np_topk(pooled, round(density * pooled.size))
  return np.repeat(np.repeat(kept, bh, axis=0), bw, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("block", [(2, 2), (4, 1), (1, 3), (8, 6)])
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_block_mask_matches_numpy(rng_seed, block, pool):
  rng = np.random.default_rng(rng_seed)
  for ties in (False, True):
    scores = _scores(rng, (8, 6), ties)
    for density in (0.0, rng.uniform(0.1, 0.9), 1.0):
      got = np.asarray(block_mask(jnp.asarray(scores), density, block, pool=pool))
      np.testing.assert_array_equal(got, np_block(scores, density, block, pool))


def test_block_mask_3d(rng_seed):
  rng = np.random.default_rng(rng_seed)
  scores = _scores(rng, (4, 6, 2), False)
  got = np.asarray(block_mask(jnp.asarray(scores), 0.5, (2, 3, 2)))
  pooled = scores.reshape(2, 2, 2, 3, 1, 2).mean(axis=(1, 3, 5))
  want = np_topk(pooled, 2)[:, None, :, None, :, None]
  np.testing.assert_array_equal(got, np.broadcast_to(want, (2, 2, 2, 3, 1, 2)).reshape(4, 6, 2))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("pool", ["mean", "max"])
def test_channel_mask_matches_numpy(rng_seed, axis, pool):
  rng = np.random.default_rng(rng_seed)
  for ties in (False, True):
    scores = _scores(rng, (6, 5, 4), ties)
    others = tuple(a for a in range(3) if a != axis)
    pooled = (scores.astype(np.float64).mean(axis=others) if pool == "mean"
              else scores.max(axis=others))
    density = rng.uniform(0.1, 0.9)
    kept = np_topk(pooled, round(density * scores.shape[axis]))
    want = np.broadcast_to(np.expand_dims(kept, others), scores.shape)
    got = channel_mask(jnp.asarray(scores), density, axis=axis, pool=pool)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("call,match", [
    (lambda s: topk_mask(s, 1.5), "density"),
    (lambda s: topk_mask(s, -0.1), "density"),
    (lambda s: nm_mask(s, 5, 4), "n=5"),
    (lambda s: nm_mask(s, 2, 3), "m=3"),
    (lambda s: nm_mask(s, 2, 4, axis=2), "axis=2"),
    (lambda s: block_mask(s, 0.5, (3, 2)), "block"),
    (lambda s: block_mask(s, 0.5, (2,)), "block"),
    (lambda s: block_mask(s, 0.5, (2, 2), pool="sum"), "pool"),
    (lambda s: channel_mask(s, 2.0, axis=0), "density"),
    (lambda s: channel_mask(s, 0.5, axis=0, pool="l2"), "pool"),
])
def test_errors_name_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((8, 4)))
  with pytest.raises(TypeError, match="floating"):
    topk_mask(jnp.ones((4,), jnp.int32), 0.5)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))


@pytest.mark.slow
def test_masks_keep_sharding_and_values(rng_seed, mesh):
  rng = np.random.default_rng(rng_seed)
  scores = _scores(rng, (16, 8), ties=True)
  sharding = NamedSharding(mesh, P("fsdp", "tensor"))
  sharded = jax.device_put(scores, sharding)
  fns = {"topk": lambda s: topk_mask(s, 0.37),
         "nm": lambda s: nm_mask(s, 2, 4),
         "block": lambda s: block_mask(s, 0.4, (4, 2), pool="max"),
         "channel": lambda s: channel_mask(s, 0.5, axis=0)}
  for name, fn in fns.items():
    want = np.asarray(fn(jnp.asarray(scores)))
    jitted = jax.jit(fn)
    for got in (fn(sharded), jitted(sharded)):
      assert got.sharding.is_equivalent_to(sharding, 2), (name, got.sharding)
      np.testing.assert_array_equal(got, want, err_msg=name)
    assert "all-gather" not in jitted.lower(sharded).compile().as_text(), name
