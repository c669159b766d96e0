"""Every Sparsifier algorithm on params sharded over the 8-device test mesh: masks keep
their params' shardings, and masks and params equal the single-device run bitwise
(global magnitude's threshold and RigL's drop/grow included)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.sharding import MeshConfig, make_mesh
from sparsejax.sparsity.algorithms import ALGORITHMS
from sparsejax.sparsity.config import SparsityConfig
from sparsejax.sparsity.sparsifier import Sparsifier, apply_masks

# fsdp × tensor for dense kernels, expert × fsdp × tensor for an MoE expert tensor.
MESHES = {"fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4, expert=1),
          "fsdp2_tensor2_expert2": dict(data=1, fsdp=2, tensor=2, expert=2)}
SPECS = {"dense_0/kernel": P("fsdp", "tensor"), "dense_1/kernel": P("tensor", "fsdp"),
         "ffn/w_gate": P("expert", "fsdp", "tensor"), "norm/scale": P("tensor")}
FIELDS = {"magnitude": dict(sparsity=0.7, schedule="polynomial", end_step=3,
                            update_every=1),
          "random": dict(sparsity=0.6), "snip": dict(sparsity=0.6),
          "global_magnitude": dict(sparsity=0.75), "ste": dict(sparsity=0.5),
          "static": dict(sparsity=0.8, distribution="erk"),
          "set": dict(sparsity=0.8, update_every=1),
          "rigl": dict(sparsity=0.8, update_every=1, distribution="erk"),
          "l1": dict(l1_strength=3.0)}


def _params(seed):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"dense_0": {"kernel": f(16, 24)}, "dense_1": {"kernel": f(24, 8)},
          "ffn": {"w_gate": f(4, 16, 8)}, "norm": {"scale": f(24)}}


def _place(tree, mesh):
  return {layer: {leaf: jax.device_put(x, NamedSharding(mesh, SPECS[f"{layer}/{leaf}"]))
                  for leaf, x in sub.items()} for layer, sub in tree.items()}


def _train(sp, params, seed, place, steps=3):
  """`steps` updates on fresh random gradients (placed like the params): the update is
  elementwise but for the mask selections, so sharded and single-device runs must agree
  bitwise (a model's gradients would differ in the last bits with the reduction order).
  """
  tx = sp.wrap_optax(optax.adam(0.05))
  state = tx.init(params)
  params = apply_masks(params, sp.masks(state))
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for t in range(steps):
    grads = place(_params(seed + 100 + t))
    forward = sp.pre_forward(params, state)   # w ⊙ m where each weight lives
    for layer, sub in forward.items():
      for leaf, x in sub.items():
        assert x.sharding.is_equivalent_to(params[layer][leaf].sharding, x.ndim)
    updates, state = step(params, state, grads)
    params = optax.apply_updates(params, updates)
  return params, state


# Every algorithm on the expert mesh, global magnitude and RigL on fsdp × tensor too;
# two cases in the fast tier (about 15 s each on a 2-core CPU), the rest slow.
FAST = {("global_magnitude", "fsdp2_tensor4"), ("rigl", "fsdp2_tensor2_expert2")}
CASES = [(a, "fsdp2_tensor2_expert2") for a in ALGORITHMS] + [
    ("global_magnitude", "fsdp2_tensor4"), ("rigl", "fsdp2_tensor4")]


@pytest.mark.parametrize("algorithm,mesh_name", [
    pytest.param(*case, marks=() if case in FAST else pytest.mark.slow) for case in CASES])
def test_sharded_equals_single_device(algorithm, mesh_name, rng_seed):
  mesh = make_mesh(MeshConfig(**MESHES[mesh_name]))
  sp = Sparsifier(SparsityConfig(algorithm=algorithm, **FIELDS[algorithm]), num_steps=4,
                  learning_rate=0.05)
  params = _params(rng_seed)
  ref_params, ref_state = _train(sp, params, rng_seed, lambda tree: tree)
  with jax.set_mesh(mesh):
    got_params, got_state = _train(sp, _place(params, mesh), rng_seed,
                                   lambda tree: _place(tree, mesh))
  masks, ref_masks = sp.masks(got_state), sp.masks(ref_state)
  assert set(masks) == {"dense_0/kernel", "dense_1/kernel", "ffn/w_gate"}
  for name, m in masks.items():
    layer, leaf = name.split("/")
    param = got_params[layer][leaf]
    assert m.dtype == jnp.bool_
    assert m.sharding.is_equivalent_to(param.sharding, m.ndim), (name, m.sharding)
    assert param.sharding.is_equivalent_to(NamedSharding(mesh, SPECS[name]), m.ndim)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(ref_masks[name]))
    np.testing.assert_array_equal(np.asarray(param), np.asarray(ref_params[layer][leaf]))
    if algorithm != "ste":
      assert np.all(np.asarray(param)[~np.asarray(m)] == 0)
  if algorithm not in ("static", "l1"):
    assert int(got_state.changes) == int(ref_state.changes)
  if algorithm in ("global_magnitude", "rigl", "set"):
    assert int(got_state.changes) > 0


def test_global_threshold_compiles_without_all_gather(rng_seed):
  """The global top-k is bisection with scalar all-reduces: no param is gathered."""
  mesh = make_mesh(MeshConfig(**MESHES["fsdp2_tensor4"]))
  sp = Sparsifier(SparsityConfig(algorithm="global_magnitude", sparsity=0.75),
                  num_steps=4)
  tx = sp.wrap_optax(optax.sgd(0.1))
  with jax.set_mesh(mesh):
    params = _place(_params(rng_seed), mesh)
    state = tx.init(params)
    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" in hlo
