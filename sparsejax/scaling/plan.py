"""Plan a pod run on paper: compile a config's train and decode steps for a TPU slice.

`plan(config, topology)` builds the config's `Trainer` on an AOT mesh of the slice
(`sparsejax.scaling.tpu`): params, optimizer state and batch exist only as sharded
`jax.ShapeDtypeStruct`s (`jax.eval_shape`, nothing allocated), and the jitted train step
— and a one-token KV-cache decode step — are compiled by XLA:TPU into the per-chip
program. From it the report takes memory per chip (`memory_analysis()`: arguments,
outputs, donated aliases, temporaries), FLOPs and HBM bytes (`cost_analysis()`), the
collectives of the compiled HLO (`sparsejax.scaling.hlo`) and a roofline step time and
MFU (`sparsejax.scaling.roofline`). A program larger than the chip's HBM raises
`HbmOverflowError` naming the biggest per-chip buffers.

Compile time grows with depth (blocks are unrolled): `fit_layers=(a, b)` compiles at a
and b blocks and extrapolates every count affinely to the config's depth (a block's
costs repeat exactly; memory layers keep their number, their placements clipped to the
shallower model), so an 8B model plans in the time of two 1–2-block compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from sparsejax import sharding
from sparsejax.models import accounting
from sparsejax.scaling import hlo as hlo_lib
from sparsejax.scaling import roofline
from sparsejax.scaling.tpu import TpuCompileError, compile_for_tpu, tpu_mesh
from sparsejax.train.config import Config
from sparsejax.train.generate import decode_step
from sparsejax.train.trainer import Trainer, check_batch
from sparsejax.validation import ConfigError, check

GIB = 1 << 30
MEMORY_FIELDS = ("argument", "output", "alias", "temp")


class HbmOverflowError(ConfigError):
  """The compiled program needs more memory per chip than the chip's HBM."""


@dataclasses.dataclass
class StepCost:
  """Per-chip counts of one compiled step (bytes, FLOPs)."""
  memory: dict[str, float]             # MEMORY_FIELDS
  flops: float
  bytes_accessed: float
  collectives: dict[str, hlo_lib.CollectiveStats]
  largest: list[tuple[int, str]]       # biggest buffers of the compiled HLO

  @property
  def total_memory(self) -> float:
    """Peak bytes per chip: arguments + outputs − donated aliases + temporaries."""
    m = self.memory
    return m["argument"] + m["output"] - m["alias"] + m["temp"]

  @property
  def ici_bytes(self) -> float:
    return sum(c.sent_bytes for c in self.collectives.values())


def step_cost(compiled, num_devices: int) -> StepCost:
  """The StepCost of a `TpuCompiled`."""
  mem = compiled.memory
  text = compiled.hlo
  return StepCost(
      memory={f: float(getattr(mem, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS},
      flops=float(compiled.cost.get("flops", 0.0)),
      bytes_accessed=float(compiled.cost.get("bytes accessed", 0.0)),
      collectives=hlo_lib.collectives(text, num_devices),
      largest=hlo_lib.largest_buffers(text))


def extrapolate(a: StepCost, b: StepCost, at: tuple[int, int], depth: int) -> StepCost:
  """The affine extension v(depth) = v(a) + (v(b) − v(a))·(depth − a)/(b − a) of every
  count of steps compiled at `at` = (a, b) blocks."""
  t = (depth - at[0]) / (at[1] - at[0])
  line = lambda x, y: x + (y - x) * t
  stats = {op: hlo_lib.CollectiveStats(
      round(line(a.collectives[op].count, b.collectives[op].count)),
      round(line(a.collectives[op].bytes, b.collectives[op].bytes)),
      line(a.collectives[op].sent_bytes, b.collectives[op].sent_bytes))
           for op in a.collectives}
  return StepCost({f: line(a.memory[f], b.memory[f]) for f in MEMORY_FIELDS},
                  line(a.flops, b.flops), line(a.bytes_accessed, b.bytes_accessed),
                  stats, b.largest)


def with_depth(config: Config, num_layers: int) -> Config:
  """`config` with `num_layers` blocks; memory placements s:t clipped to the last block
  (their number kept)."""
  model = config.model
  pairs = ",".join(f"{min(s, num_layers - 1)}:{min(t, num_layers - 1)}"
                   for s, t in model.memory_placements)
  return dataclasses.replace(config, model=dataclasses.replace(
      model, num_layers=num_layers, memory_layers=pairs))


def _shard_bytes(leaf: Any, spec: NamedSharding) -> int:
  return math.prod(spec.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def largest_arguments(trainer: Trainer, top: int = 5) -> list[tuple[int, str]]:
  """The `top` largest per-chip shards of the train state, (bytes, "path shape spec")."""
  leaves = jax.tree_util.tree_flatten_with_path(trainer.abstract_state)[0]
  specs = jax.tree.leaves(trainer.state_shardings)
  found = [(_shard_bytes(leaf, spec), f"{jax.tree_util.keystr(path)} "
            f"{leaf.dtype}{list(leaf.shape)} over {tuple(spec.spec)}")
           for (path, leaf), spec in zip(leaves, specs)]
  return sorted(found, reverse=True)[:top]


def _cache_sharding(leaf: Any, batch: int, mesh) -> NamedSharding:
  """KV-cache arrays [B, S, kv_heads, head_dim] over batch and tensor; others by batch."""
  if leaf.ndim == 0 or leaf.shape[0] != batch:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())
  names = ("batch", None, "kv_heads", None) if leaf.ndim == 4 else \
      ("batch",) + (None,) * (leaf.ndim - 1)
  return NamedSharding(mesh, sharding.logical_to_spec(names, leaf.shape, mesh))


def _compile_train(trainer: Trainer) -> StepCost:
  data = trainer.config.data
  tokens = jax.ShapeDtypeStruct((data.batch_size, data.seq_len), jnp.int32)
  with trainer.activate():
    compiled = compile_for_tpu(trainer._train_step,  # pylint: disable=protected-access
                               trainer.abstract_state, {"inputs": tokens, "targets": tokens},
                               mesh=trainer.mesh)
  return step_cost(compiled, trainer.mesh.devices.size)


def _compile_decode(trainer: Trainer, batch: int) -> StepCost:
  """One cached decode step of `batch` tokens at context `data.seq_len`."""
  model, mesh = trainer.model, trainer.mesh
  rng = jax.random.key(0)   # before the mesh: AOT (compile-only) meshes hold no arrays
  full = jax.ShapeDtypeStruct((batch, trainer.config.data.seq_len), jnp.int32)
  with trainer.activate():
    cache = jax.eval_shape(functools.partial(model.init, decode=True), rng, full)["cache"]
    cache = sharding.unbox(cache)
    cache_shardings = jax.tree.map(lambda a: _cache_sharding(a, batch, mesh), cache)
    token = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), (batch, 1),
                                                         mesh))
    state, specs = trainer.abstract_state, trainer.state_shardings

    def decode(params, model_state, cache, tokens):
      return decode_step(model, {"params": params, **model_state}, cache, tokens)
    decode.__name__ = "decode_step"
    jitted = jax.jit(decode, donate_argnums=2,
                     in_shardings=(specs.params, specs.model_state, cache_shardings,
                                   token), out_shardings=(None, cache_shardings))
    compiled = compile_for_tpu(jitted, state.params, state.model_state, cache,
                               jax.ShapeDtypeStruct((batch, 1), jnp.int32), mesh=mesh)
  return step_cost(compiled, mesh.devices.size)


def _overflow(step: str, cost: StepCost, spec: roofline.Chip, trainer: Trainer,
              compiler: str = "") -> HbmOverflowError:
  args = "; ".join(f"{b / GIB:.2f} GiB {name}" for b, name in largest_arguments(trainer))
  temps = "; ".join(f"{b / GIB:.2f} GiB {name}" for b, name in cost.largest) if \
      cost.largest else "n/a"
  need = f"{cost.total_memory / GIB:.1f} GiB" if cost.total_memory else "more"
  return HbmOverflowError(
      f"the {step} step needs {need} per chip, more than the {spec.hbm_bytes / GIB:.0f} "
      f"GiB HBM of a {spec.name} chip: shard more (config.mesh.fsdp / tensor / expert), "
      f"set config.model.remat=True or lower config.data.batch_size. Biggest "
      f"arguments per chip: {args}. Biggest buffers: {temps}.{compiler}")


def _compile_checked(step: str, compile_fn, trainer: Trainer,
                     spec: roofline.Chip) -> StepCost:
  """compile_fn(trainer) -> StepCost; XLA's own out-of-HBM error -> HbmOverflowError."""
  try:
    return compile_fn(trainer)
  except TpuCompileError as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text and "hbm" in text.lower():
      empty = StepCost({f: 0.0 for f in MEMORY_FIELDS}, 0.0, 0.0, {}, [])
      raise _overflow(step, empty, spec, trainer,
                      f" XLA: {' '.join(text.split())[:600]}") from e
    raise


def _step_report(cost: StepCost, spec: roofline.Chip, num_chips: int,
                 model_flops: float | None, tokens: int) -> dict[str, Any]:
  est = roofline.estimate(spec, cost.flops, cost.bytes_accessed, cost.ici_bytes)
  return {
      "memory_bytes": {**cost.memory, "total": cost.total_memory,
                       "hbm": spec.hbm_bytes,
                       "fraction_of_hbm": cost.total_memory / spec.hbm_bytes},
      "flops_per_chip": cost.flops,
      "hbm_bytes_per_chip": cost.bytes_accessed,
      "collectives": {op: c.as_dict() for op, c in cost.collectives.items()},
      "collective_bytes_per_chip": sum(c.bytes for c in cost.collectives.values()),
      "ici_bytes_sent_per_chip": cost.ici_bytes,
      "largest_buffers": [[b, name] for b, name in cost.largest],
      "roofline": est.as_dict(),
      "tokens": tokens,
      "tokens_per_s": tokens / est.step_s if est.step_s else None,
      "mfu": (roofline.mfu(model_flops, num_chips, spec, est.step_s)
              if model_flops and est.step_s else None),
  }


def _model_flops_per_token(config: Config) -> float | None:
  """Forward model FLOPs per token (accounting.flops_per_token), None without a formula
  for one of the model's components."""
  try:
    return accounting.flops_per_token(config.model, config.data.seq_len)
  except ValueError:
    return None


def decode_param_bytes_per_token(config: Config, params: Any, batch: int,
                                 bytes_per_param: int = 2) -> float:
  """Parameter bytes a decode step of `batch` tokens reads, per token, with bf16 weights
  (KV cache excluded): every non-routed param, and of each routed one the expected
  distinct slices when each token picks `per_token` of `units` uniformly,
  units·(1 − (1 − per_token/units)^batch) (MoE: experts; memories: value rows)."""
  total = accounting.count_params(params)["total_params"]
  for r in accounting.routed_params(config.model, params).values():
    expected = r.units * (1 - (1 - r.per_token / r.units) ** batch)
    total += (expected - r.units) * r.unit_size
  return total * bytes_per_param / batch


DECODE_BATCHES = (1, 4, 16, 64)


def plan(config: Config, topology: str, *, train: bool = True, decode_batch: int = 1,
         fit_layers: tuple[int, int] | None = None) -> dict[str, Any]:
  """The JSON-ready report of `config` compiled for `topology` (module docstring).

  `train=False` skips the train step, `decode_batch` = 0 the decode step (with both,
  only the params and the on-paper decode bytes are reported). Raises HbmOverflowError
  when a step does not fit, ConfigError for a mesh that does not match the slice, a
  batch that does not split over its data-parallel chips or a bad `fit_layers`.
  """
  mesh = tpu_mesh(topology, config.mesh)
  if train:
    check_batch(config.data.batch_size, mesh)
  num_chips = mesh.devices.size
  spec = roofline.chip(mesh.devices.flat[0].device_kind)
  depth = config.model.num_layers
  if fit_layers is not None:
    check(0 < fit_layers[0] < fit_layers[1] < depth, "--fit_layers", fit_layers,
          f"two block counts a < b below config.model.num_layers={depth}")
  check(decode_batch >= 0, "--decode_batch", decode_batch, ">= 0 (0 = no decode step)")
  full = Trainer(config, mesh=mesh)         # abstract state only: nothing compiled
  params = full.abstract_state.params
  counts = accounting.count_params(params)
  steps = {"train": _compile_train} if train else {}
  if decode_batch:
    steps["decode"] = lambda trainer: _compile_decode(trainer, decode_batch)
  costs = {}
  for name, compile_fn in steps.items():
    if fit_layers is None:
      costs[name] = _compile_checked(name, compile_fn, full, spec)
    else:
      a, b = (_compile_checked(name, compile_fn,
                               Trainer(with_depth(config, n), mesh=mesh), spec)
              for n in fit_layers)
      costs[name] = extrapolate(a, b, fit_layers, depth)
    if costs[name].total_memory > spec.hbm_bytes:
      raise _overflow(name, costs[name], spec, full)
  tokens = config.data.batch_size * config.data.seq_len
  flops_per_token = _model_flops_per_token(config)
  report = {
      "topology": topology, "chip": spec.name,
      "device_kind": mesh.devices.flat[0].device_kind, "num_chips": num_chips,
      "mesh": dict(mesh.shape), "chip_peaks": dataclasses.asdict(spec),
      "compiled_layers": list(fit_layers) if fit_layers else [depth],
      "extrapolated": fit_layers is not None,
      "num_layers": depth, "batch_size": config.data.batch_size,
      "seq_len": config.data.seq_len,
      "total_params": counts["total_params"],
      "nonembedding_params": counts["nonembedding_params"],
      "activated_params": accounting.activated_params(config.model, params),
      "model_flops_per_token": flops_per_token,
  }
  if train:
    report["train"] = _step_report(
        costs["train"], spec, num_chips,
        3 * flops_per_token * tokens if flops_per_token else None, tokens)
    report["train"]["xla_flops_per_token"] = costs["train"].flops * num_chips / tokens
  if decode_batch:
    report["decode"] = _step_report(costs["decode"], spec, num_chips, None,
                                    decode_batch)
    report["decode"]["batch"] = decode_batch
    report["decode"]["hbm_bytes_per_token"] = (costs["decode"].bytes_accessed
                                               * num_chips / decode_batch)
  report["decode_param_bytes_per_token"] = {
      str(b): decode_param_bytes_per_token(config, params, b) for b in DECODE_BATCHES}
  return report
