"""A model with sharded UltraMem / PKM value tables equals the unsharded one on 8 fake
CPU devices, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.models.config import parse_model_config
from sparsejax.models.transformer import DecoderLM


def _loss_and_grads(model, variables, tokens):
  def loss(params):
    logits = model.apply({**variables, "params": params}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  return jax.value_and_grad(loss)(variables["params"])


@pytest.mark.parametrize("memory,mode,mesh_shape", [
    ("ultramem", "rows", dict(data=2, fsdp=4)),
    ("pkm", "columns", dict(data=2, tensor=2, expert=2)),
])
def test_sharded_value_table_equals_unsharded(rng_seed, memory, mode, mesh_shape):
  options = dict(knn=3, num_keys=8, heads=2, impl="xla")
  make_cfg = lambda shard: parse_model_config(dict(
      d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, memory=memory,
      memory_layers="0:0", memory_options=dict(options, shard_values=shard)))
  tokens = jax.random.randint(jax.random.key(rng_seed), (4, 6), 0, 256)
  plain = DecoderLM(make_cfg("none"))
  variables = sharding.unbox(jax.jit(plain.init)(jax.random.key(rng_seed), tokens))
  want_loss, want_grads = jax.jit(lambda v, t: _loss_and_grads(plain, v, t))(
      variables, tokens)

  sharded = DecoderLM(make_cfg(mode))
  mesh = sharding.make_mesh(sharding.MeshConfig(**{"data": 1, **mesh_shape}))
  boxed = jax.eval_shape(sharded.init, jax.random.key(0), tokens)
  shardings = sharding.tree_shardings(boxed, mesh)
  values_spec = shardings["params"]["memory_0"]["values"].spec
  assert values_spec[0 if mode == "rows" else 1] is not None     # really split
  placed = jax.device_put(variables, shardings)
  with jax.set_mesh(mesh):
    got_loss, got_grads = jax.jit(lambda v, t: _loss_and_grads(sharded, v, t))(
        placed, tokens)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0],
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))
