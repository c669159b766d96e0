"""The one device mesh and the logical-axis → mesh-axis rules.

Mesh axes are ("data", "fsdp", "tensor", "expert"), all `AxisType.Auto` so XLA's SPMD
partitioner propagates shardings (`jax.make_mesh` alone defaults to Explicit). Params
carry logical names (e.g. ("embed", "mlp")); `LOGICAL_RULES` maps them to mesh axes:
FSDP shards the embed dim of weights, tensor parallelism the heads/mlp/vocab dims, and
activations' batch dim is split over data × fsdp × expert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.validation import ConfigError, check

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("expert", "expert"),
    ("memory_table", ("fsdp", "tensor", "expert")),   # sharded memory value tables
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; exactly one may be -1 (= all remaining devices)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  def validate(self, prefix: str = "config.mesh") -> None:
    for axis in MESH_AXES:
      value = getattr(self, axis)
      check(value == -1 or value >= 1, f"{prefix}.{axis}", value, ">= 1 or -1 (rest)")
    auto = [a for a in MESH_AXES if getattr(self, a) == -1]
    check(len(auto) <= 1, f"{prefix}.{auto[-1] if auto else 'data'}", -1,
          f"used by at most one axis (now {auto})")

  def shape(self, num_devices: int) -> tuple[int, ...]:
    """Resolves -1 and checks that the product equals `num_devices`."""
    sizes = [getattr(self, a) for a in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % fixed:
        raise ConfigError(f"config.mesh: fixed axes {dict(zip(MESH_AXES, sizes))} "
                          f"(product {fixed}) must divide the {num_devices} devices")
      sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
      raise ConfigError(f"config.mesh: axis sizes {dict(zip(MESH_AXES, sizes))} "
                        f"multiply to {math.prod(sizes)}, but there are {num_devices} "
                        "devices (set one axis to -1)")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the ("data", "fsdp", "tensor", "expert") mesh with Auto axis types."""
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> P:
  """Maps logical axis names to a PartitionSpec, replicating dims the mesh can't split.

  A mesh axis is used at most once per array, and only where it divides the dim.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for axis in axes:
      size = mesh.shape[axis]
      if axis not in used and dim % (size * math.prod(mesh.shape[a] for a in kept)) == 0:
        kept.append(axis)
    kept = [a for a in kept if mesh.shape[a] > 1]
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def tree_shardings(boxed_abstract: Any, mesh: jax.sharding.Mesh,
                   rules=LOGICAL_RULES) -> Any:
  """NamedShardings for an abstract pytree whose leaves may be `nn.LogicallyPartitioned`.

  Leaves without logical names (optimizer counts, scalars) are replicated. Returns a
  tree matching `nn.unbox(boxed_abstract)`.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_abstract,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Batch dim over data × fsdp × expert, other dims replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Assembles per-process batches into global arrays sharded by `batch_sharding`."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local_batch.items()}


def unbox(tree: Any) -> Any:
  """Replaces `nn.LogicallyPartitioned` boxes by their values (no sharding constraint;
  placement comes from the jit out_shardings built by `tree_shardings`)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
