"""Expert parallelism for the capacity (GShard) MoE dispatch (docs/moe.md).

  moe_ffn_expert_parallel(x [T,D], weights [T,k], experts [T,k], w_gate | None [E,D,F],
                          w_up [E,D,F], w_down [E,F,D], *, mesh, ...)
      -> y [T,D], dropped_fraction f32 scalar

Inside `jax.shard_map` over `mesh`:
  * tokens (x, weights, experts) are split over `batch_axes` (default data × fsdp ×
    expert, as `sparsejax.sharding.BATCH_AXES`); every device holds T_l = T / n_batch,
  * the expert weights are split over `axis` ("expert") on their leading E dim; every
    device holds E_l = E / n_expert experts. Their other dims are replicated inside the
    map: an fsdp-sharded embed dim (or tensor-sharded mlp dim) is all-gathered at the
    shard_map boundary (ZeRO-3 style; the gradient is reduce-scattered back by the
    transpose), so any param layout is accepted,
  * each device builds the capacity dispatch of its local tokens with
    C_l = ceil(k·T_l/E · capacity_factor) slots per expert (`ops.moe.capacity_dispatch`,
    so capacity is per device, from the local token count) → [E, C_l, D],
  * `all_to_all` over `axis` sends expert e's slots to the device owning e
    → [E_l, n_expert·C_l, D], the local experts run (`ops.moe.expert_ffn`),
  * `all_to_all` back → [E, C_l, D], combined with the routing weights (f32).
Dropped slots contribute 0 (the residual carries those tokens); so do invalid expert
ids (outside [0, E)), which take no slot (the rule of `ops.moe`). The result equals
`moe_ffn(dispatch="capacity")` applied separately to each device's token block (the
blocks in mesh order of `batch_axes`), and `dispatch="dropless"` when nothing is
dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparsejax.ops import moe as moe_ops

DEFAULT_BATCH_AXES = ("data", "fsdp", "expert")


def _mesh_axes(mesh, axis: str, batch_axes: Sequence[str]) -> tuple[str, ...]:
  names = tuple(mesh.axis_names)
  if axis not in names:
    raise ValueError(f"expert axis {axis!r} is not a mesh axis {names}")
  batch = tuple(a for a in batch_axes if a in names)
  if axis not in batch:
    raise ValueError(f"batch_axes {tuple(batch_axes)} must include the expert axis "
                     f"{axis!r}: every expert-axis device routes its own tokens")
  return batch


def moe_ffn_expert_parallel(
    x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array | None,
    w_up: jax.Array, w_down: jax.Array, *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    activation: moe_ops.Activation = "silu", capacity_factor: float = 1.25,
    axis: str = "expert", batch_axes: Sequence[str] = DEFAULT_BATCH_AXES,
    check_indices: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Capacity-dispatch routed experts with the experts sharded over mesh axis `axis`.

  Same arguments and result as `ops.moe.moe_ffn(dispatch="capacity")` (y [T,D] in
  x.dtype, dropped fraction f32; invalid expert ids contribute 0, or are reported
  through `checkify.checkify` with `check_indices=True`), except that capacity is
  computed per device from its T_l local tokens. `mesh`: a Mesh or AbstractMesh (None: the mesh set by `jax.set_mesh`).
  Requires T divisible by the product of the `batch_axes` sizes present in the mesh and
  E divisible by the `axis` size. Works under jit and grad.
  """
  moe_ops._check_shapes(x, weights, experts, w_gate, w_up, w_down)
  moe_ops.check_dispatch_args("capacity", capacity_factor)
  act = moe_ops._activation(activation)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError("moe_ffn_expert_parallel needs a mesh (argument or jax.set_mesh)")
  batch = _mesh_axes(mesh, axis, batch_axes)
  n_batch = math.prod(mesh.shape[a] for a in batch)
  n_exp = mesh.shape[axis]
  t, k = experts.shape
  e = w_up.shape[0]
  if t % n_batch:
    raise ValueError(f"T={t} tokens must be divisible by the {n_batch} devices of "
                     f"batch axes {batch}")
  if e % n_exp:
    raise ValueError(f"E={e} experts must be divisible by mesh axis {axis!r} of size "
                     f"{n_exp}")
  if check_indices:
    moe_ops.check_experts(experts, e, "moe_ffn_expert_parallel")
  if experts.size == 0:
    return jnp.zeros_like(x), jnp.zeros((), jnp.float32)
  weights = jnp.where(moe_ops.valid_experts(experts, e), weights.astype(jnp.float32), 0.0)
  t_local = t // n_batch
  c = moe_ops.capacity(t_local, k, e, capacity_factor)
  gated = w_gate is not None

  def body(x, weights, experts, *ws):
    w_gate, w_up, w_down = ws if gated else (None, *ws)
    dispatch, combine, dropped = moe_ops.capacity_dispatch(weights, experts, e, c,
                                                           x.dtype)
    xe = jnp.einsum("tec,td->ecd", dispatch, x)                  # [E, C, D]
    # Expert e's slots go to the device owning it: [E_l, n_exp·C, D] (source-major).
    xe = jax.lax.all_to_all(xe, axis, split_axis=0, concat_axis=1, tiled=True)
    out = moe_ops.expert_ffn(xe, w_gate, w_up, w_down, act)       # [E_l, n_exp·C, D]
    out = jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=0, tiled=True)
    y = jnp.einsum("tec,ecd->td", combine, out.astype(jnp.float32))
    # Every device has the same T_l·k slots, so the mean of the means is global.
    fraction = jnp.sum(dropped).astype(jnp.float32) / dropped.size
    return y.astype(x.dtype), jax.lax.pmean(fraction, batch)

  tok = P(batch)
  w_spec = P(axis, None, None)
  ws = (w_gate, w_up, w_down) if gated else (w_up, w_down)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, *([w_spec] * len(ws))),
                     out_specs=(tok, P()), check_vma=True)
  return fn(x, weights, experts, *ws)
