"""Lottery-ticket IMP rounds (sparsejax.sparsity.lottery) against a NumPy reference:
exact global-magnitude selection over the kept weights, round-consistent counts
(K_{r+1} = round(0.8 K_r)), nested masks, rewinding, the reinit control, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.sharding import MeshConfig, make_mesh
from sparsejax.sparsity import lottery


def _params(rng):
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"block_0": {"attn": {"kernel": f(12, 20)}, "norm": {"scale": f(12)}},
          "block_1": {"ffn": {"kernel": f(20, 7)}},
          "embedding": {"embedding": f(9, 12)}}


def _reference_round(params, masks, fraction):
  """NumPy float64: sort the kept |w| over all tensors (stable: the lower (tensor, flat
  index) first among equals) and keep the round((1 - fraction) K) largest."""
  flat = {n: np.abs(np.asarray(params[n.split("/")[0]][n.split("/")[1]][n.split("/")[2]],
                               np.float64)).ravel() for n in masks}
  entries = [(-flat[n][i], t, i) for t, n in enumerate(masks)
             for i in np.flatnonzero(np.asarray(masks[n]).ravel())]
  keep = int(round((1 - fraction) * len(entries)))
  chosen = sorted(entries)[:keep]
  out = {n: np.zeros(np.asarray(masks[n]).size, bool) for n in masks}
  names = list(masks)
  for _, t, i in chosen:
    out[names[t]][i] = True
  return {n: m.reshape(np.shape(masks[n])) for n, m in out.items()}


def test_initial_masks_select_the_kernels(rng_seed):
  masks = lottery.initial_masks(_params(np.random.default_rng(rng_seed)))
  assert list(masks) == ["block_0/attn/kernel", "block_1/ffn/kernel"]
  assert all(m.dtype == jnp.bool_ and bool(m.all()) for m in masks.values())


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_rounds_match_numpy_and_are_nested(rng_seed, fraction):
  rng = np.random.default_rng(rng_seed)
  params = _params(rng)
  masks = lottery.initial_masks(params)
  total = lottery.total_count(masks)
  expected_counts = lottery.round_counts(total, 4, fraction)
  assert expected_counts[0] == total == 12 * 20 + 20 * 7
  for r in range(1, 5):
    # weights change between rounds (retraining): fresh values each round
    params = _params(rng)
    new = lottery.prune_round(params, masks, fraction)
    want = _reference_round(params, masks, fraction)
    for n in masks:
      np.testing.assert_array_equal(np.asarray(new[n]), want[n])
      assert not np.any(np.asarray(new[n]) & ~np.asarray(masks[n]))   # nested
    assert lottery.kept_count(new) == expected_counts[r]
    density = lottery.densities(new)["total"]
    assert abs(density - (1 - fraction) ** r) <= r / total   # rounding per round
    masks = new


@pytest.mark.slow
def test_ties_keep_the_lower_tensor_then_index():
  params = {"a": {"x": {"kernel": jnp.ones((2, 5))}}, "b": {"y": {"kernel": jnp.ones((5, 2))}}}
  masks = lottery.initial_masks(params)
  new = lottery.prune_round(params, masks, 0.2)     # keep 16 of 20 equal weights
  np.testing.assert_array_equal(np.asarray(new["a/x/kernel"]), np.ones((2, 5), bool))
  np.testing.assert_array_equal(np.asarray(new["b/y/kernel"]).ravel(),
                                [True] * 6 + [False] * 4)


def test_round_counts_and_bad_fraction():
  assert lottery.round_counts(1000, 3) == [1000, 800, 640, 512]
  assert lottery.round_counts(7, 2) == [7, 6, 5]      # round(5.6) = 6, round(4.8) = 5
  with pytest.raises(ValueError, match="fraction=1.0 must be in"):
    lottery.round_counts(10, 1, 1.0)
  with pytest.raises(ValueError, match="lack the masked tensors"):
    lottery.prune_round({"w": jnp.ones((2, 2))}, {"v": jnp.ones((2, 2), bool)})


def test_rewind_and_reinit_share_masks_not_values(rng_seed):
  rng = np.random.default_rng(rng_seed)
  snapshot, trained = _params(rng), _params(rng)
  masks = lottery.prune_round(trained, lottery.initial_masks(trained), 0.2)
  ticket = lottery.rewind(snapshot, masks)
  init_fn = lambda key: jax.tree.map(
      lambda x: jax.random.normal(jax.random.fold_in(key, x.size), x.shape), snapshot)
  control = lottery.reinit(init_fn, jax.random.key(rng_seed % 1000), masks)
  for path in (("block_0", "attn", "kernel"), ("block_1", "ffn", "kernel")):
    m = np.asarray(masks["/".join(path)])
    t = np.asarray(ticket[path[0]][path[1]][path[2]])
    c = np.asarray(control[path[0]][path[1]][path[2]])
    s = np.asarray(snapshot[path[0]][path[1]][path[2]])
    np.testing.assert_array_equal(t, np.where(m, s, 0))       # rewound survivors
    assert np.all(c[~m] == 0) and np.all(c[m] != 0)           # same kept positions
    assert not np.any(np.isclose(c[m], s[m]))                 # new values
  # unmasked tensors (norms, embeddings) are the snapshot's / the fresh init's
  np.testing.assert_array_equal(np.asarray(ticket["embedding"]["embedding"]),
                                np.asarray(snapshot["embedding"]["embedding"]))


@pytest.mark.slow
def test_sharded_round_equals_single_device(rng_seed):
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4, expert=1))
  rng = np.random.default_rng(rng_seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {"l0": {"kernel": f(16, 24)}, "l1": {"kernel": f(24, 8)}}
  specs = {"l0": P("fsdp", "tensor"), "l1": P("tensor", "fsdp")}
  sharded = {k: {"kernel": jax.device_put(v["kernel"], NamedSharding(mesh, specs[k]))}
             for k, v in params.items()}
  masks = lottery.initial_masks(params)
  masks_sh = lottery.initial_masks(sharded)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), sharded)
  for name, m in lottery.initial_masks(abstract).items():   # from shapes alone
    assert bool(m.all()) and m.sharding == masks_sh[name].sharding
  for _ in range(2):
    masks = lottery.prune_round(params, masks, 0.2)
    masks_sh = lottery.prune_round(sharded, masks_sh, 0.2)
  for k in params:
    name = f"{k}/kernel"
    np.testing.assert_array_equal(np.asarray(masks_sh[name]), np.asarray(masks[name]))
    assert masks_sh[name].sharding.is_equivalent_to(sharded[k]["kernel"].sharding, 2)
