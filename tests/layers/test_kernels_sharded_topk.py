"""The Top-K (Q-Sparse) kernel under sharding: every kernel call of a sharded model runs
inside `jax.shard_map` (a Pallas call cannot be partitioned by XLA).

On the 8 fake CPU devices (mesh data × fsdp × tensor = 2 × 2 × 2): the whole train step
of the qsparse and bitnet_qsparse configs with model.kernel_impl="pallas" lowers for
TPU and CUDA with every kernel custom call inside a manual (shard_map) region, and with
kernel_impl="interpret" the sharded loss and gradients equal kernel_impl="xla"'s.
"""

import os
import re
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from sparsejax import sharding
from sparsejax.ops import dispatch
from sparsejax.ops.topk import topk_sparsify
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import Trainer

MESH = dict(data=2, fsdp=2, tensor=2, expert=1)
BATCH, SEQ = 4, 4
TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def tiny_trainer(name: str, kernel_impl: str) -> Trainer:
  """The experiment config `name`, shrunk to one small block, on the 2×2×2 mesh."""
  config = runpy.run_path(os.path.join(REPO, "experiments", "configs", f"{name}.py")
                          )["get_config"]()
  config.model.update(kernel_impl=kernel_impl, num_layers=1, d_model=32, num_heads=4,
                      num_kv_heads=2, d_ff=64)
  config.data.update(seq_len=SEQ, batch_size=BATCH)
  config.mesh = MESH
  return Trainer(parse_config(config))


def kernel_calls_outside_shard_map(text: str, target: str) -> tuple[int, int]:
  """(kernel custom calls, those not inside an `sdy.manual_computation` region) of a
  lowered StableHLO module (regions are not nested here: one shard_map per call)."""
  total = outside = 0
  inside = False
  for line in text.splitlines():
    if "sdy.manual_computation(" in line:
      inside = True
    elif "sdy.return" in line or line.lstrip().startswith("func.func"):
      inside = False
    if re.search(rf"custom_call @{re.escape(target)}\(", line):
      total += 1
      outside += not inside
  return total, outside


@pytest.mark.parametrize("name", ["qsparse", "bitnet_qsparse"])
@pytest.mark.parametrize("lowering", ["tpu", "cuda"])
def test_sharded_train_step_lowers_with_kernels_inside_shard_map(name, lowering):
  tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
  with dispatch.target_platform("gpu" if lowering == "cuda" else "tpu"):
    trainer = tiny_trainer(name, "pallas")
    with trainer.activate():
      lowered = trainer._train_step.trace(
          trainer.abstract_state, {"inputs": tokens, "targets": tokens}).lower(
              lowering_platforms=(lowering,))
  total, outside = kernel_calls_outside_shard_map(lowered.as_text(), TARGETS[lowering])
  assert total >= 4 and outside == 0      # q/k/v, o, gate/up, down inputs (fwd only)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qsparse", "bitnet_qsparse"])
def test_sharded_interpret_kernel_equals_xla_loss_and_grads(rng_seed, name):
  tokens = np.asarray(jax.random.randint(jax.random.key(rng_seed), (BATCH, SEQ + 1), 0,
                                         256))
  results = {}
  state = tiny_trainer(name, "xla").init_state(seed=1)   # the same params for both
  for impl in ("xla", "interpret"):
    trainer = tiny_trainer(name, impl)
    with trainer.activate():
      batch = trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
      (loss, (_, _, _, metrics)), grads = jax.jit(
          jax.value_and_grad(trainer.loss, has_aux=True))(
              state.params, state.model_state, batch)
    results[impl] = (loss, metrics, grads)
  (l_x, m_x, g_x), (l_i, m_i, g_i) = results["xla"], results["interpret"]
  np.testing.assert_allclose(l_i, l_x, rtol=1e-6)
  sparsity = {k: v for k, v in m_x.items() if k.endswith("act_sparsity")}
  assert sparsity and all(float(v) > 0.2 for v in sparsity.values())
  for k in sparsity:                      # the same entries were kept, exactly
    assert float(m_i[k]) == float(m_x[k]), k
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_i),
                          jax.tree_util.tree_leaves(g_x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("rows", [8, 3], ids=["rows_split", "rows_replicated"])
def test_op_on_mesh_runs_the_kernel_per_shard(rng_seed, rows):
  """topk_sparsify(impl="interpret") under `jax.set_mesh` equals the XLA op, whether the
  rows split over data × fsdp (8 rows) or not (3 rows: replicated); STE grad."""
  mesh = sharding.make_mesh(sharding.MeshConfig(**MESH))
  k1, k2 = jax.random.split(jax.random.key(rng_seed))
  x = jax.random.normal(k1, (rows, 5, 40)).astype(jnp.bfloat16)
  g = jax.random.normal(k2, x.shape).astype(jnp.bfloat16).astype(jnp.float32)
  with jax.set_mesh(mesh):
    run = lambda impl: jax.jit(lambda x: topk_sparsify(x, 9, impl=impl))
    y, y_ref = run("interpret")(x), run("xla")(x)
    text = run("interpret").lower(x).as_text()
    dx = jax.jit(jax.grad(lambda x: jnp.sum(topk_sparsify(x, 9, impl="interpret")
                                            .astype(jnp.float32) * g)))(x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  assert np.mean(np.asarray(y) == 0) > 0.7
  assert "sdy.manual_computation" in text
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(g, np.float32))
