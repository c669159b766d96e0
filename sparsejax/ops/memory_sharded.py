"""Memory lookup with the value table sharded over the device mesh (PKM / UltraMem).

    memory_lookup_sharded(values [N, v], indices [..., K], weights [..., K], *,
                          groups=None, num_groups=None, mode="rows",
                          table_axes=("fsdp", "tensor", "expert"),
                          batch_axes=("data", "fsdp", "expert"), mesh=None, impl="auto",
                          check_indices=False)
        -> [..., v] or [..., G, v], same as `sparsejax.ops.memory.memory_lookup`

Large value tables do not fit one device, so the table is split over `table_axes` (the
mesh axes among them with size > 1; their product is n below) inside `jax.shard_map`:

  mode="rows"     values split on dim 0: device s holds rows [s·N/n, (s+1)·N/n) (s is
                  the linear index over the table axes, major to minor as listed). Every
                  device sees all tokens of its batch shard, keeps the lookups whose
                  index falls in its rows (local index = index - offset; the others get
                  the invalid index -1: zero contribution, zero gradient), runs
                  `memory_lookup` on its rows and the partial outputs are summed with
                  one `psum` over the table axes.
                  Communication: one all-reduce of [tokens_local, (G,) v] per call
                  forward; backward the output cotangent needs none (it is replicated
                  over the table axes) and d_weights is one all-reduce of
                  [tokens_local, K] (each lookup's d_weight is nonzero on one shard).
                  d_values of a shard gets contributions from its own rows only.
                  Compute: every shard runs the full [tokens_local, K] lookup (masked),
                  i.e. n× the gather work of one device; memory holds N/n rows each.
  mode="columns"  values split on dim 1 (v divisible by n): each device computes its
                  v/n column slice of the output for all tokens of its batch shard; the
                  output stays sharded over the table axes on its last dim. Indices,
                  weights and groups are replicated over the table axes (no collective
                  in the forward); backward d_weights is one all-reduce of
                  [tokens_local, K] over the table axes (each shard holds a partial dot
                  product over its columns).

  mode="none"     the table is not split (replicated). With the XLA implementation this
                  is plain `memory_lookup` (XLA partitions it); with a kernel
                  (a Pallas call cannot be partitioned by XLA) the lookup runs inside
                  `jax.shard_map` with the tokens split over the batch axes and the
                  table replicated; backward dV is one all-reduce of [N, v] over them.

Tokens (dim 0 of indices/weights/groups, and of the output) are split over the
`batch_axes` that are not table axes, keeping (in order) those whose cumulative
product divides dim 0; the rest of the batch axes replicate them. With the default
axes and the mesh of `sparsejax.sharding` that means: table over fsdp × tensor ×
expert, tokens over data. Inputs may arrive with any sharding (XLA reshards them at
the shard_map boundary, e.g. all-gathers tokens sharded over fsdp).

With no mesh (`mesh=None` and no `jax.set_mesh` in effect), a one-device mesh, or the
XLA implementation with table axes all of size 1, this is plain `memory_lookup`; a
kernel on a multi-device mesh always runs inside `jax.shard_map` (as mode="none" when
the table axes have size 1). Invalid lookups follow `memory_lookup`'s rule (an index
outside [0, N) is outside every shard's rows: zero contribution, zero gradients);
`check_indices` checks them once, before the map. Works under jit and grad; the
backward is `memory_lookup`'s deterministic one per shard plus the fixed-order
collectives above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparsejax.ops.memory import (_check, check_lookup_indices, memory_lookup,
                                  resolve_lookup_impl)

MODES = ("none", "rows", "columns")
DEFAULT_TABLE_AXES = ("fsdp", "tensor", "expert")
DEFAULT_BATCH_AXES = ("data", "fsdp", "expert")


def _vary(x, axes: tuple[str, ...]):
  """Marks an input that is replicated over `axes` as varying there (transpose: psum)."""
  if not axes:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axes, to="varying")
  return jax.lax.pvary(x, axes)  # older jax


def _axes(mesh, table_axes: Sequence[str], batch_axes: Sequence[str], n_tokens):
  """(table axes, batch axes) actually used: present in the mesh, size > 1; batch
  axes exclude table axes and keep those whose cumulative product divides n_tokens."""
  names = tuple(mesh.axis_names)
  for a in (*table_axes, *batch_axes):
    if a not in names:
      raise ValueError(f"axis {a!r} is not a mesh axis {names}")
  table = tuple(dict.fromkeys(a for a in table_axes if mesh.shape[a] > 1))
  batch: list[str] = []
  if n_tokens is not None:
    for a in dict.fromkeys(batch_axes):
      if a in table or mesh.shape[a] == 1:
        continue
      if n_tokens % (math.prod(mesh.shape[b] for b in batch) * mesh.shape[a]) == 0:
        batch.append(a)
  return table, tuple(batch)


def memory_lookup_sharded(
    values: jax.Array, indices: jax.Array, weights: jax.Array, *,
    groups: jax.Array | None = None, num_groups: int | None = None,
    mode: str = "rows", table_axes: Sequence[str] = DEFAULT_TABLE_AXES,
    batch_axes: Sequence[str] = DEFAULT_BATCH_AXES,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    impl: str = "auto", check_indices: bool = False) -> jax.Array:
  """`memory_lookup` with `values` sharded over mesh axes `table_axes` (module docstring).

  Args:
    values, indices, weights, groups, num_groups, impl, check_indices: as
      `memory.memory_lookup` (`impl` is resolved once, for the per-shard lookup).
    mode: "rows" (split N; partial sums combined with psum), "columns" (split v;
      output sharded on its last dim) or "none" (table replicated; tokens split when
      the lookup runs a kernel).
    table_axes: mesh axes the table is split over (default fsdp × tensor × expert);
      axes of size 1 are ignored. Rows: N must be divisible by their product;
      columns: v must be.
    batch_axes: mesh axes the tokens (dim 0 of indices) may be split over (default
      data × fsdp × expert, as `sparsejax.sharding.BATCH_AXES`); table axes and axes
      that do not divide dim 0 are skipped (tokens replicated over them).
    mesh: a Mesh or AbstractMesh; None: the one set by `jax.set_mesh` (none set:
      plain `memory_lookup`).

  Returns:
    [..., v] without groups, [..., G, v] with them, equal to `memory_lookup`.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} must be one of {MODES}")
  values, indices, weights = map(jnp.asarray, (values, indices, weights))
  if groups is not None:
    groups = jnp.asarray(groups)
  _check(values, indices, weights, groups, num_groups)
  table_axes = (table_axes,) if isinstance(table_axes, str) else tuple(table_axes)
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  if check_indices:
    check_lookup_indices(indices, groups, values.shape[0], num_groups,
                         op="memory_lookup_sharded")

  def plain(impl):
    return memory_lookup(values, indices, weights, groups=groups, num_groups=num_groups,
                         impl=impl)

  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return plain(impl)
  n_tok = indices.shape[0] if indices.ndim > 1 else None
  table, batch = _axes(mesh, () if mode == "none" else table_axes, batch_axes, n_tok)
  n_table = math.prod(mesh.shape[a] for a in table)
  if n_table == 1:
    mode = "none"
  n_rows, v = values.shape
  local_shape = {"none": (n_rows, v), "rows": (n_rows // n_table, v),
                 "columns": (n_rows, v // n_table)}[mode]
  g = 1 if groups is None else num_groups
  impl = resolve_lookup_impl(impl, local_shape, values.dtype, weights.dtype,
                             indices.shape[-1], g)
  if mode == "none" and impl == "xla":
    return plain(impl)
  sizes = {a: mesh.shape[a] for a in table}
  if mode == "rows" and n_rows % n_table:
    raise ValueError(f"mode='rows': the table's N={n_rows} rows must be divisible by the "
                     f"product {n_table} of the table axes {sizes}")
  if mode == "columns" and v % n_table:
    raise ValueError(f"mode='columns': the table's v={v} value columns must be "
                     f"divisible by the product {n_table} of the table axes {sizes}")

  grouped = groups is not None
  indices = indices.astype(jnp.int32)
  args = (values, indices, weights) + ((groups.astype(jnp.int32),) if grouped else ())
  lead = indices.ndim - 1                       # token dims; the output adds (G,) v
  tok_spec = P(batch or None, *([None] * lead)) if lead else P(None)
  out_lead = ((batch or None,) + (None,) * (lead - 1) if lead else ()) + (
      (None,) if grouped else ())

  if mode == "none":
    v_spec = P(None, None)

    def body(values_l, idx, w, *grp):
      values_l = _vary(values_l, batch)        # replicated: the transpose psums dV
      return memory_lookup(values_l, idx, w, groups=grp[0] if grouped else None,
                           num_groups=num_groups, impl=impl)

    out_spec = P(*out_lead, None)
  elif mode == "rows":
    v_spec = P(table, None)

    def body(values_l, idx, w, *grp):
      n_local = values_l.shape[0]
      offset = jax.lax.axis_index(table) * n_local
      # The tokens are replicated over the table axes, the table over the batch axes:
      # mark both varying everywhere, so the transposes psum their cotangents.
      values_l = _vary(values_l, batch)
      idx, w, *grp = (_vary(x, table) for x in (idx, w, *grp))
      local = idx - offset
      # Another shard's rows (and invalid indices, inside no shard) are invalid here.
      local = jnp.where((local >= 0) & (local < n_local), local, -1)
      out = memory_lookup(values_l, local, w, groups=grp[0] if grouped else None,
                          num_groups=num_groups, impl=impl)
      return jax.lax.psum(out, table)

    out_spec = P(*out_lead, None)
  else:
    v_spec = P(None, table)

    def body(values_l, idx, w, *grp):
      values_l = _vary(values_l, batch)
      idx, w, *grp = (_vary(x, table) for x in (idx, w, *grp))
      return memory_lookup(values_l, idx, w, groups=grp[0] if grouped else None,
                           num_groups=num_groups, impl=impl)

    out_spec = P(*out_lead, table)

  fn = jax.shard_map(body, mesh=mesh, in_specs=(v_spec, *([tok_spec] * (len(args) - 1))),
                     out_specs=out_spec, check_vma=True)
  return fn(*args)
