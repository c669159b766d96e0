"""A data-parallel train step that exchanges sparse gradients (top-k + error feedback,
or DGC) instead of the dense all-reduce of the plain jitted step.

Enabled by `config.train.grad_compression.method` ("topk_ef" | "dgc"). Inside
`jax.shard_map` over the mesh, each device computes the gradient of the mean loss of
its own batch shard, compresses it (`sparsejax.sparsity.gradient`), `all_gather`s the
(values, indices) of every matrix over the "data" axis in the configured wire format
(float32 or bfloat16 values, int32 or chunk-local uint16 indices) and scatter-adds them; the
mean over devices goes to the configured optimizer, which updates the replicated params
identically on every device. Like the plain step it differentiates at
`trainer.forward_params` (the masked weights under `config.sparsity`) and logs the
sparsity metrics; the trainer still refuses that combination (a gradient-grown mask,
RigL, would grow from the compressed gradient).

Supported mesh: pure data parallel, config.mesh.fsdp = tensor = expert = 1 (params
replicated, the batch split over "data"; a single device is the degenerate N = 1).

Per-device state: the error-feedback residuals (topk_ef) or DGC's momentum u and
velocity v, stored in `TrainState.grad_comm` as arrays [N, *param.shape] sharded over
"data" (row i is device i's local state), so they checkpoint and resume exactly like
the optimizer state; restoring therefore needs the same number of data devices.

Non-parameter model state updated by the forward pass (e.g. an MoE routing bias) is
averaged over the devices (each computes it from its own batch shard). DGC's momentum
correction is the momentum: the optimizer must not add its own (config.optim.b1 = 0);
its clipping is the devices' local clipping, so the optimizer does not clip again.

Logged per step: `comm_bytes` (bytes of the arrays one device sends: values + indices of
the sparsified matrices, the dense vectors), `dense_bytes` (the gradient one device
contributes to a dense all-reduce), their ratio `compression`, and `grad_ratio` (the
warm-up stage's fraction of each matrix sent).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

from sparsejax import sharding
from sparsejax.sparsity import gradient
from sparsejax.validation import ConfigError, check

AXIS = "data"


def check_supported(config: Any, mesh: jax.sharding.Mesh) -> None:
  """ConfigError unless compression (when enabled) can run on `mesh` with `config`."""
  cfg = config.train.grad_compression
  if not cfg.enabled:
    return
  field = "config.train.grad_compression.method"
  other = {a: mesh.shape[a] for a in sharding.MESH_AXES if a != AXIS}
  if any(size > 1 for size in other.values()):
    raise ConfigError(
        f"{field}={cfg.method!r} supports only a pure data-parallel mesh (params "
        f"replicated: config.mesh.fsdp = tensor = expert = 1, config.mesh.data = all "
        f"devices); this mesh is {dict(mesh.shape)}")
  check(cfg.method != "dgc" or config.optim.b1 == 0, "config.optim.b1", config.optim.b1,
        "0 with config.train.grad_compression.method='dgc' (DGC's momentum correction "
        "is the momentum; set config.train.grad_compression.momentum instead)")


def optimizer_config(config: Any) -> Any:
  """`config.optim` for the optimizer: with DGC its clipping moves into the devices'
  local clipping (`gradient.clip_local`), so the optimizer does not clip the
  aggregated gradient again (its norm counts the delayed, accumulated entries)."""
  if config.train.grad_compression.method == "dgc":
    return dataclasses.replace(config.optim, grad_clip_norm=0.0)
  return config.optim


def init_comm(cfg: gradient.GradCompressionConfig, params: Any,
              mesh: jax.sharding.Mesh) -> Any:
  """Zero per-device state [N, *shape] per leaf (None when compression is off).
  `params` may hold `nn.LogicallyPartitioned` boxes (the trainer's init)."""
  if not cfg.enabled:
    return None
  num = mesh.shape[AXIS]
  local = gradient.init_state(cfg, sharding.unbox(params))
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num, *x.shape)), local)


def place_comm_state(state_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """The train state's shardings with `grad_comm` rows split over "data"."""
  if state_shardings.grad_comm is None:
    return state_shardings
  split = NamedSharding(mesh, P(AXIS))
  return state_shardings.replace(
      grad_comm=jax.tree.map(lambda _: split, state_shardings.grad_comm))


def _pmean_floats(tree: Any) -> Any:
  return jax.tree.map(lambda x: lax.pmean(x, AXIS)
                      if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def make_step(trainer: Any):
  """The train step `(state, batch) -> (state, metrics)` for `jax.jit`, built from the
  trainer's loss, optimizer, LR schedule, mesh and config."""
  config, mesh = trainer.config, trainer.mesh
  cfg = config.train.grad_compression
  num = mesh.shape[AXIS]
  ratios = cfg.stage_ratios()

  def local(params, model_state, comm, batch, step):
    grad_fn = jax.value_and_grad(trainer.loss, has_aux=True)
    with nn.logical_axis_rules(()):   # every axis is manual here: no sharding constraints
      (loss, (ce, aux, model_state, sown)), grads = grad_fn(params, model_state, batch)
    if cfg.method == "dgc":
      grads = gradient.clip_local(grads, config.optim.grad_clip_norm, num)
    comm = jax.tree.map(lambda x: x[0], comm)

    def branch(ks, comm, grads):
      mean, comm, sent = gradient.compress_and_exchange(cfg, comm, grads, ks, AXIS, num)
      return mean, comm, jnp.asarray(sent, jnp.float32)

    branches = [functools.partial(branch, ks)
                for ks in gradient.stage_ks(cfg, params)]
    if len(branches) == 1:
      mean, comm, sent = branches[0](comm, grads)
    else:
      mean, comm, sent = lax.switch(gradient.stage_index(cfg, step), branches, comm,
                                    grads)
    metrics = _pmean_floats({"loss": loss, "ce": ce, "aux_loss": aux, **sown})
    comm = jax.tree.map(lambda x: x[None], comm)
    return mean, comm, _pmean_floats(model_state), metrics, sent

  exchange = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P()),
      out_specs=(P(), P(AXIS), P(), P(), P()), check_vma=False)

  def step(state, batch):
    mean, comm, model_state, metrics, sent = exchange(
        trainer.forward_params(state), state.model_state, state.grad_comm, batch,
        state.step)
    updates, opt_state = trainer.tx.update(mean, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    dense = sum(gradient.payload(p) for p in jax.tree.leaves(state.params))
    stage = gradient.stage_index(cfg, state.step)
    metrics.update(grad_norm=optax.tree.norm(mean), lr=trainer.schedule(state.step),
                   comm_bytes=sent, dense_bytes=jnp.float32(dense),
                   compression=dense / sent,
                   grad_ratio=jnp.asarray(ratios, jnp.float32)[stage],
                   **trainer.sparsity_metrics(opt_state))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         model_state=model_state, grad_comm=comm), metrics

  return step
