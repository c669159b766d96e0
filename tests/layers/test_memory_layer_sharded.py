"""A model with sharded UltraMem / PKM value tables equals the unsharded one on 8 fake
CPU devices, forward and backward; with a replicated table the memory kernels run in a
shard_map (interpret == xla) and whole train steps lower for TPU and CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.models.config import parse_model_config
from sparsejax.models.transformer import DecoderLM
from sparsejax.ops import dispatch
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import Trainer


def _loss_and_grads(model, variables, tokens):
  def loss(params):
    logits = model.apply({**variables, "params": params}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  return jax.value_and_grad(loss)(variables["params"])


@pytest.mark.parametrize("memory,mode,mesh_shape", [
    ("ultramem", "rows", dict(data=2, fsdp=4)),
    ("pkm", "columns", dict(data=2, tensor=2, expert=2)),
])
@pytest.mark.slow
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


@pytest.mark.parametrize("memory", [pytest.param("ultramem", marks=pytest.mark.slow),
                                    "pkm"])
def test_kernel_under_replicated_table_equals_xla(rng_seed, memory):
  """shard_values="none" with a kernel on the 2×2×2 mesh: the layer runs the kernel
  inside a shard_map (tokens split, table replicated); interpret == xla, forward and
  grads (the replicated table's gradient summed over the token shards). The TPU
  kernels: JAX's Triton interpreter fails on a scan inside a check_vma shard_map (its
  own message asks for check_vma=False); the GPU kernels are lowered below."""
  platform = "tpu"
  make_cfg = lambda impl: parse_model_config(dict(
      d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, memory=memory,
      memory_layers="0:0", memory_options=dict(knn=2, num_keys=4, heads=2, impl=impl)))
  tokens = jax.random.randint(jax.random.key(rng_seed), (4, 3), 0, 256)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  results = []
  # One init (the impl does not change the params) for both models.
  variables = sharding.unbox(jax.jit(DecoderLM(make_cfg("xla")).init)(
      jax.random.key(rng_seed), tokens))
  for impl in ("xla", "interpret"):
    model = DecoderLM(make_cfg(impl))
    with dispatch.target_platform(platform), jax.set_mesh(mesh):
      jaxpr = str(jax.make_jaxpr(lambda v, t: _loss_and_grads(model, v, t))(
          variables, tokens))
      results.append(jax.jit(lambda v, t: _loss_and_grads(model, v, t))(variables,
                                                                          tokens))
    assert ("pallas_call" in jaxpr) == (impl == "interpret")
    assert ("shard_map" in jaxpr) == (impl == "interpret")
  (want_loss, want_grads), (got_loss, got_grads) = results
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0],
                          jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))


def _config(name):
  import importlib.util
  import os
  from conftest import REPO
  path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ultramem", "pkm"])
@pytest.mark.parametrize("platform,lowering,target", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_whole_train_step_lowers_with_memory_kernels(name, platform, lowering, target):
  """The ultramem / pkm configs' train step with model.kernel_impl="pallas" on the
  8-device data × fsdp × tensor mesh lowers for TPU and CUDA with the memory kernels
  in it (inside shard_map: Mosaic refuses auto-partitioned kernels)."""
  config = _config(name)
  config.model.kernel_impl = "pallas"
  config.data.update(batch_size=8, seq_len=16)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  with dispatch.target_platform(platform):
    trainer = Trainer(parse_config(config))
    batch = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32) for k in ("inputs", "targets")}
    with trainer.activate():
      lowered = trainer._train_step.trace(trainer.abstract_state, batch).lower(
          lowering_platforms=(lowering,))
  text = lowered.as_text()
  inside, outside = _custom_calls_by_manual_region(text, target)
  assert inside > 0 and outside == 0, (inside, outside)
  for kind in ("fwd", "dvalues", "dweights"):
    assert f"memory_lookup_{kind}_{platform}" in text


def _custom_calls_by_manual_region(text: str, target: str) -> tuple[int, int]:
  """(# custom calls to `target` inside shard_map bodies, # outside) in a lowered
  module: a body is the lines indented deeper than its sdy.manual_computation line."""
  inside = outside = 0
  opened: list[int] = []                          # indents of enclosing manual regions
  for line in text.splitlines():
    indent = len(line) - len(line.lstrip())
    while opened and line.strip() and indent <= opened[-1]:
      if line.lstrip().startswith("}"):           # the region's closing line
        opened.pop()
        break
      opened.pop()
    if f"custom_call @{target}" in line:
      inside, outside = (inside + 1, outside) if opened else (inside, outside + 1)
    if "sdy.manual_computation(" in line:
      opened.append(indent)
  return inside, outside
