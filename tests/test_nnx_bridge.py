"""Flax NNX interop: a `DecoderLM` built from our Linen layers runs and trains as an
`nnx.bridge.ToNNX` module, with the same logits as the Linen `apply` on the same params.

The params are `nn.LogicallyPartitioned`; the bridge turns them into `nnx.Param`s whose
`out_sharding` are the logical names, and (flax >= 0.12, eager sharding on by default)
shards them at creation. That needs a mesh and the logical-axis rules in context,
exactly what the trainer uses (`jax.set_mesh` + `nn.logical_axis_rules`).
"""

import contextlib

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import tiny_config_dict
from sparsejax import sharding
from sparsejax.models import DecoderLM, parse_model_config
from sparsejax.train.trainer import cross_entropy


# FSDP x tensor parallel, so the bridged params really are sharded (8 fake CPU devices).
MESH = sharding.MeshConfig(data=2, fsdp=2, tensor=2)


@contextlib.contextmanager
def _mesh_and_rules():
  mesh = sharding.make_mesh(MESH)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    yield


def _params(module: nnx.Module) -> dict:
  """The module's `nnx.Param`s as a plain nested dict of arrays (Linen layout)."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


@pytest.mark.slow
def test_to_nnx_matches_linen_and_trains_one_step(rng_seed):
  cfg = parse_model_config(tiny_config_dict()["model"])
  linen_model = DecoderLM(cfg)
  k_in, k_tgt = jax.random.split(jax.random.key(rng_seed))
  tokens = jax.random.randint(k_in, (8, 16), 0, cfg.vocab_size)
  targets = jax.random.randint(k_tgt, (8, 16), 0, cfg.vocab_size)

  with _mesh_and_rules():
    model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(rng_seed))
    nnx.bridge.lazy_init(model, tokens)

    # Same param tree as a Linen init, and the logical names survive as NNX metadata.
    params = _params(model)
    linen_shapes = jax.eval_shape(linen_model.init, jax.random.key(0), tokens)["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(params, sharding.unbox(linen_shapes))
    embedding = nnx.state(model, nnx.Param)["embedding"]
    assert embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert embedding[...].sharding.spec == P("tensor", "fsdp")

    # Same logits as Linen `apply` with the NNX module's params (jitted only to compile
    # one program instead of one per op).
    nnx_logits = nnx.jit(lambda m, x: m(x))(model, tokens)
    linen_logits = jax.jit(linen_model.apply)({"params": params}, tokens)
    chex.assert_shape(nnx_logits, (8, 16, cfg.vocab_size))
    np.testing.assert_allclose(np.asarray(nnx_logits), np.asarray(linen_logits),
                               rtol=1e-5, atol=1e-5)

    # One AdamW step on the NNX side lowers the loss on the same batch.
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    def loss_fn(m):
      return cross_entropy(m(tokens), targets)

    @nnx.jit
    def train_step(m, opt):
      loss, grads = nnx.value_and_grad(loss_fn)(m)
      opt.update(m, grads)
      return loss, grads

    before = jax.tree.map(np.asarray, params)
    loss0, grads = train_step(model, optimizer)
    after = jax.tree.map(np.asarray, _params(model))
    loss1 = nnx.jit(loss_fn)(model)

  # Gradients cover exactly the params (not the bridge's RNG state) and are non-zero.
  grads = nnx.to_pure_dict(grads)
  assert jax.tree.structure(grads) == jax.tree.structure(before)
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))
  linen_loss = float(cross_entropy(linen_logits, targets))
  assert float(loss0) == pytest.approx(linen_loss, rel=1e-5)
  assert float(loss1) < float(loss0)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert all(jax.tree.leaves(changed)), changed
  assert int(optimizer.step[...]) == 1
