"""Sparse-attention kernels on a device mesh and on each platform: the block-sparse and
NSA layers call their Pallas kernels inside `jax.shard_map` (a `pallas_call` cannot be
auto-partitioned), so the whole sharded train step of the local_global and nsa configs
lowers for TPU and CUDA on the 8 fake CPU devices (mesh data 2 × fsdp 2 × tensor 2);
on that mesh the interpret-mode kernels equal the XLA path (forward and grads); "auto"
picks each platform's kernel, or XLA where the kernel's constraints fail; bf16 kernels
use the MXU's native matmul precision (HIGHEST only for f32 operands)."""

import contextlib
import os
import re
import runpy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from conftest import REPO
from sparsejax import sharding
from sparsejax.models.config import parse_model_config
from sparsejax.models.transformer import DecoderLM
from sparsejax.ops import dispatch
from sparsejax.ops import masks as M
from sparsejax.ops.nsa import selected_attention
from sparsejax.ops.sparse_attention import block_sparse_attention
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import Trainer

MESH = dict(data=2, fsdp=2, tensor=2)


def _eqns(jaxpr):
  for e in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    yield e
    for value in e.params.values():
      for x in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr)):
          yield from _eqns(x)


def pallas_calls(fn, *args) -> dict[str, list]:
  """{kernel name: [its jaxpr's eqns]} of the pallas_calls traced by fn(*args)."""
  return {e.params["name"]: list(_eqns(e.params["jaxpr"]))
          for e in _eqns(jax.make_jaxpr(fn)(*args)) if e.primitive.name == "pallas_call"}


def _config(name, **model):
  config = runpy.run_path(os.path.join(REPO, "experiments", "configs", f"{name}.py"))[
      "get_config"]()
  config.model.update(num_layers=1, kernel_impl="pallas", **model)
  config.data.update(batch_size=8)
  config.mesh.update(MESH)
  return parse_config(config.to_dict())


@pytest.mark.slow
@pytest.mark.parametrize("platform,target,call", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
@pytest.mark.parametrize("name,kernels", [
    ("local_global", ("block_sparse_attention_fwd", "block_sparse_attention_dkv")),
    ("nsa", ("nsa_selection_fwd", "nsa_selection_dkv", "block_sparse_attention_fwd"))])
def test_sharded_train_step_lowers(platform, target, call, name, kernels):
  with dispatch.target_platform(platform):
    trainer = Trainer(_config(name))
    batch = jax.ShapeDtypeStruct((8, trainer.config.data.seq_len), jnp.int32)
    with trainer.activate():
      lowered = trainer._train_step.trace(
          trainer.abstract_state, {"inputs": batch, "targets": batch}).lower(
              lowering_platforms=(target,))
  text = lowered.as_text()
  assert call in set(re.findall(r"custom_call @([^\s(]+)\(", text))
  assert "sdy.manual_computation" in text or "shard_map" in text    # inside shard_map
  for kernel in kernels:
    assert f"{kernel}_{platform}" in text


@pytest.mark.slow
@pytest.mark.parametrize("attention,options", [
    ("block_sparse", dict(pattern="local_global", window=6, num_global=2, block_q=8,
                          block_kv=8)),
    ("nsa", dict(block_len=8, stride=4, select_block=8, num_selected=2, window=6))])
def test_sharded_interpret_kernels_equal_xla(rng_seed, attention, options):
  """One layer, T = 16, on the 2 × 2 × 2 mesh: kernel_impl="interpret" (TPU kernels
  inside shard_map: batch 4 -> 1 per (data, fsdp) shard, 2 kv heads -> 1 per tensor
  shard) equals kernel_impl="xla", loss and every gradient."""
  make = lambda impl: DecoderLM(parse_model_config(dict(
      d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, attention=attention,
      attention_options=options, kernel_impl=impl)))
  tokens = jax.random.randint(jax.random.key(rng_seed), (4, 16), 0, 256)
  mesh = sharding.make_mesh(sharding.MeshConfig(**MESH))
  xla = make("xla")
  boxed = jax.eval_shape(xla.init, jax.random.key(0), tokens)
  variables = sharding.unbox(jax.jit(xla.init)(jax.random.key(rng_seed), tokens))
  placed = jax.device_put(variables, sharding.tree_shardings(boxed, mesh))

  def loss_and_grads(model):
    def loss(params):
      logits = model.apply({**placed, "params": params}, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(loss))(placed["params"])

  got_loss, got = loss_and_grads(make("interpret"))
  want_loss, want = loss_and_grads(xla)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))


def _nsa_model(head_dim, kernel_impl="auto"):
  return DecoderLM(parse_model_config(dict(
      d_model=4 * head_dim, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=head_dim,
      attention="nsa", kernel_impl=kernel_impl, attention_options=dict(
          block_len=16, stride=8, select_block=16, num_selected=2, window=16))))


@pytest.mark.parametrize("platform,head_dim,want", [
    ("cpu", 16, set()),
    ("tpu", 16, {"nsa_selection_fwd_tpu", "block_sparse_attention_fwd_tpu"}),
    ("gpu", 16, {"nsa_selection_fwd_gpu", "block_sparse_attention_fwd_gpu"}),
    ("gpu", 8, set()),                  # Triton needs D >= 16: both branches fall back
])
def test_auto_picks_the_platform_kernel(platform, head_dim, want):
  """kernel_impl="auto" (the default): an NSA model's forward runs the selection and
  window kernels of the target platform, XLA on CPU and where a constraint fails."""
  model = _nsa_model(head_dim)
  tokens = jnp.zeros((2, 32), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  with contextlib.ExitStack() as stack:
    if platform != "cpu":
      stack.enter_context(dispatch.target_platform(platform))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")        # the fallback's one-time warning
    calls = pallas_calls(model.apply, variables, tokens)
  assert set(calls) == want


@pytest.mark.parametrize("dtype,precision", [(jnp.bfloat16, None),
                                             (jnp.float32, jax.lax.Precision.HIGHEST)])
def test_kernel_matmul_precision(dtype, precision):
  """Every matmul of both TPU kernels (forward, dq, dk/dv) uses HIGHEST only for f32
  operands: Mosaic rejects it on bf16 ("Bad lhs type")."""
  q = jnp.ones((1, 32, 2, 16), dtype)
  kv = jnp.ones((1, 32, 1, 16), dtype)
  idx, valid = jnp.zeros((1, 32, 1, 2), jnp.int32), jnp.ones((1, 32, 1, 2), bool)
  fns = [lambda q: block_sparse_attention(q, kv, kv, M.CausalMask(), block_q=16,
                                          block_kv=16, impl="pallas"),
         lambda q: selected_attention(q, kv, kv, idx, valid, 16, impl="pallas")]
  for fn in fns:
    with dispatch.target_platform("tpu"):
      calls = pallas_calls(jax.grad(lambda q: fn(q).astype(jnp.float32).sum()), q)
    assert len(calls) == 3
    dots = [e for eqns in calls.values() for e in eqns if e.primitive.name == "dot_general"]
    assert dots and all(_precision(e) == precision for e in dots), calls.keys()


def _precision(eqn):
  p = eqn.params["precision"]
  return p[0] if isinstance(p, tuple) else p


@pytest.mark.slow
@pytest.mark.parametrize("op", ["block_sparse", "nsa_selection"])
def test_kernels_inside_a_checked_shard_map_equal_xla(rng_seed, op):
  """Called inside the caller's `jax.shard_map` (check_vma=True, every axis already
  manual, so no shard_map of their own), the interpret kernels' outputs and custom_vjp
  cotangents carry the shards' varying axes; output and grads equal the XLA path.
  T = 24: 3 × 3 blocks of 8 (block-sparse), 2 selection blocks of 16, the last partial
  (NSA)."""
  keys = jax.random.split(jax.random.key(rng_seed), 4)
  q = jax.random.normal(keys[0], (4, 24, 4, 16))
  k, v = (jax.random.normal(key, (4, 24, 2, 16)) for key in keys[1:3])
  idx = jax.random.randint(keys[3], (4, 24, 2, 2), -1, 3)     # -1 and 2: no block
  mesh = sharding.make_mesh(sharding.MeshConfig(**MESH))
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)

  def value_and_grads(impl):
    if op == "block_sparse":
      fn = lambda q, k, v, idx: block_sparse_attention(
          q, k, v, M.LocalMask(12), block_q=8, block_kv=8, impl=impl)
    else:                               # block ids sharded like q (per kv head)
      fn = lambda q, k, v, idx: selected_attention(q, k, v, idx, idx >= 0, 16, impl=impl)
    run = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    loss = lambda q, k, v: jnp.sum(jnp.sin(run(q, k, v, idx)))
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (got_loss, got), (want_loss, want) = value_and_grads("interpret"), value_and_grads("xla")
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for a, b, name in zip(got, want, "qkv"):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
