"""Sharded memory lookup (table split over mesh axes by rows or value columns): equals
the unsharded XLA `memory_lookup` forward and its grads w.r.t. values and weights (with
and without groups, with duplicate indices), really splits the table, replicates tokens
that don't divide, falls back without a mesh, and rejects tables that don't divide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.ops.memory import memory_lookup
from sparsejax.ops import memory_sharded as ms
from sparsejax.ops.memory_sharded import memory_lookup_sharded
from sparsejax.sharding import MeshConfig, make_mesh

N, V, K, G = 32, 8, 6, 3

# (mesh, table_axes, expected table axes, expected token axes)
SETUPS = {
    "data2_fsdp4": (dict(data=2, fsdp=4), None, ("fsdp",), ("data",)),
    "data2_tensor2_expert2": (dict(data=2, tensor=2, expert=2), None,
                              ("tensor", "expert"), ("data",)),
    "tensor_only": (dict(data=2, tensor=2, expert=2), ("tensor",), ("tensor",),
                    ("data", "expert")),
}


def inputs(seed, lead, grouped):
  rng = np.random.default_rng(seed)
  values = jnp.asarray(rng.standard_normal((N, V)), jnp.float32)
  idx = rng.integers(0, N, (*lead, K))
  # Duplicates within and across tokens, on rows of several shards.
  idx[..., :2] = rng.choice([1, 17, N - 1], size=(*lead, 2))
  idx[..., 2] = idx[..., 3]
  weights = jnp.asarray(rng.standard_normal((*lead, K)), jnp.float32)
  groups = jnp.asarray(rng.integers(0, G, (*lead, K)), jnp.int32) if grouped else None
  out_shape = (*lead, G, V) if grouped else (*lead, V)
  cot = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
  return values, jnp.asarray(idx, jnp.int32), weights, groups, cot


def check_against_reference(mesh, values, idx, weights, groups, cot, **kw):
  g = dict(groups=groups, num_groups=None if groups is None else G)

  def loss(fn, values, weights):
    return jnp.sum(fn(values, idx, weights, **g) * cot)

  def sharded(values, idx, weights, **kw2):
    return memory_lookup_sharded(values, idx, weights, **kw2, **kw)

  @jax.jit
  def run(values, weights):
    out = sharded(values, idx, weights, **g)
    return out, jax.grad(lambda v, w: loss(sharded, v, w), (0, 1))(values, weights)

  with jax.set_mesh(mesh):
    out, (d_values, d_weights) = run(values, weights)

  def reference(values, weights):
    def lookup(*a, **k):
      return memory_lookup(*a, impl="xla", **k)
    return lookup(values, idx, weights, **g), jax.grad(
        lambda v, w: loss(lookup, v, w), (0, 1))(values, weights)

  ref, (ref_dv, ref_dw) = jax.jit(reference)(values, weights)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_values, ref_dv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_weights, ref_dw, rtol=1e-5, atol=1e-5)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("grouped", [False, True], ids=["plain", "groups"])
def test_matches_unsharded_forward_and_grads(rng_seed, setup, mode, grouped):
  cfg, table_axes, want_table, want_batch = SETUPS[setup]
  mesh = make_mesh(MeshConfig(**cfg))
  kw = dict(mode=mode)
  if table_axes is not None:
    kw["table_axes"] = table_axes
  values, idx, weights, groups, cot = inputs(rng_seed, (8, 2), grouped)
  out = check_against_reference(mesh, values, idx, weights, groups, cot, **kw)
  # Tokens split over the non-table batch axes; columns leave v split over the table.
  want = (want_batch, None, *((None,) if grouped else ()),
          want_table if mode == "columns" else None)
  assert normalize(out.sharding.spec, out.ndim) == normalize(want, out.ndim)


def normalize(spec, ndim):
  """Spec entries as tuples of axis names (() = replicated), padded to ndim."""
  entries = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
  return entries + [()] * (ndim - len(entries))


@pytest.mark.parametrize("mode", ["rows", "columns"])
def test_table_is_split_inside_the_map(mode):
  mesh = make_mesh(MeshConfig(data=2, tensor=2, expert=2))
  values, idx, weights, _, _ = inputs(0, (4,), False)
  seen = []

  def spy(values_l, *a, **k):
    seen.append(values_l.shape)
    return memory_lookup(values_l, *a, **k)

  orig, ms.memory_lookup = ms.memory_lookup, spy
  try:
    # An explicit concrete mesh works without jax.set_mesh.
    out = jax.jit(lambda v, w: memory_lookup_sharded(v, idx, w, mode=mode, mesh=mesh))(
        values, weights)
  finally:
    ms.memory_lookup = orig
  assert seen == [(N // 4, V) if mode == "rows" else (N, V // 4)]
  np.testing.assert_allclose(out, memory_lookup(values, idx, weights, impl="xla"),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("lead", [(3,), ()], ids=["odd_tokens", "no_token_dim"])
def test_replicated_tokens(rng_seed, mode, lead):
  """Token counts the batch axes don't divide (and bare [K] indices) stay replicated."""
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  values, idx, weights, groups, cot = inputs(rng_seed, lead, True)
  check_against_reference(mesh, values, idx, weights, groups, cot, mode=mode)


def test_no_mesh_or_unit_table_axes_fall_back(rng_seed):
  values, idx, weights, _, _ = inputs(rng_seed, (4,), False)
  ref = memory_lookup(values, idx, weights, impl="xla")
  np.testing.assert_allclose(memory_lookup_sharded(values, idx, weights), ref, rtol=1e-6)
  with jax.set_mesh(make_mesh(MeshConfig(data=-1))):
    out = jax.jit(lambda v, w: memory_lookup_sharded(v, idx, w))(values, weights)
  np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_rejects_tables_that_do_not_divide():
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  values = jnp.zeros((30, 6), jnp.float32)
  idx, weights = jnp.zeros((4, K), jnp.int32), jnp.ones((4, K), jnp.float32)
  with pytest.raises(ValueError, match=r"N=30 rows.*fsdp.*4"):
    memory_lookup_sharded(values, idx, weights, mode="rows", mesh=mesh)
  with pytest.raises(ValueError, match=r"v=6 value columns.*fsdp.*4"):
    memory_lookup_sharded(values, idx, weights, mode="columns", mesh=mesh)
  with pytest.raises(ValueError, match="mode="):
    memory_lookup_sharded(values, idx, weights, mode="diagonal", mesh=mesh)
  with pytest.raises(ValueError, match="not a mesh axis"):
    memory_lookup_sharded(values, idx, weights, table_axes=("model",), mesh=mesh)
