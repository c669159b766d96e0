"""Mesh, logical rules, sharded state and sharded-vs-single-device train step equality."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config_dict
from sparsejax import sharding
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import Trainer
from sparsejax.validation import ConfigError


def test_mesh_resolves_rest_axis_and_uses_auto_axis_types():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("cfg,match", [
    (dict(data=3), "multiply to 3"),
    (dict(data=-1, fsdp=3), "must divide"),
])
def test_mesh_errors(cfg, match):
  with pytest.raises(ConfigError, match=match):
    sharding.make_mesh(sharding.MeshConfig(**cfg))


def test_logical_to_spec_replicates_what_the_mesh_cannot_split():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 3), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"),
                                                                      None)
  assert sharding.logical_to_spec(("batch",), (2,), mesh) == P("data")


def _tiny(mesh_cfg):
  return parse_config(tiny_config_dict(mesh=mesh_cfg))


def test_state_is_created_sharded():
  trainer = Trainer(_tiny(dict(data=2, fsdp=2, tensor=2)))
  state = trainer.init_state()
  q = state.params["block_0"]["attention"]["q_proj"]["kernel"]        # [embed, heads, hd]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  up = state.params["block_1"]["ffn"]["up_proj"]["kernel"]            # [embed, mlp]
  assert up.sharding.spec == P("fsdp", "tensor")
  emb = state.params["embedding"]                                     # [vocab, embed]
  assert emb.sharding.spec == P("tensor", "fsdp")
  # Adam moments follow their parameters.
  mu = state.opt_state[1][0].mu["block_0"]["attention"]["q_proj"]["kernel"]
  assert mu.sharding.spec == q.sharding.spec


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(rng_seed):
  config = _tiny(dict(data=2, fsdp=2, tensor=2))
  sharded = Trainer(config)
  single = Trainer(config, mesh=sharding.make_mesh(sharding.MeshConfig(data=1),
                                                   devices=jax.devices()[:1]))
  tokens = np.asarray(jax.random.randint(jax.random.key(rng_seed), (8, 33), 0, 256))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def loss_and_grads(trainer):
    state = trainer.init_state(seed=3)
    with trainer.activate():
      gbatch = trainer.global_batch(batch)
      (loss, _), grads = jax.jit(jax.value_and_grad(trainer.loss, has_aux=True))(
          state.params, state.model_state, gbatch)
    new_state, metrics = trainer.train_step(state, gbatch)
    return loss, grads, new_state.params, metrics["loss"]

  l1, g1, p1, m1 = loss_and_grads(sharded)
  l0, g0, p0, m0 = loss_and_grads(single)
  assert len(g1["embedding"].sharding.device_set) == 8
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  np.testing.assert_allclose(m1, m0, rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, g1), jax.tree.map(np.asarray, g0),
                              rtol=2e-4, atol=1e-6)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, p1), jax.tree.map(np.asarray, p0),
                              rtol=2e-4, atol=1e-6)
