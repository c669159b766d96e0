"""Memory lookup: the weighted gather-sum at the heart of PKM / UltraMem layers.

    y[..., :]    = Σ_k w[..., k] · V[idx[..., k], :]                      (no groups)
    y[..., g, :] = Σ_k w[..., k] · [groups[..., k] = g] · V[idx[..., k], :]  (grouped)

Grouped outputs let one pass fill several output rows per token, e.g. UltraMem's E
virtual blocks × C value chunks (`sparsejax.ops.product_keys.implicit_value_expansion`).

Backward (deterministic: no float atomics):
    dV[n]   = Σ_{(t,k): idx[t,k]=n} w[t,k] · dY[t, groups[t,k]]
              (`sorted_segment_rows`: XLA scatter-add on CPU/TPU, whose update order is
              fixed; on GPU a segmented scan over the stably sorted indices);
    dw[t,k] = ⟨dY[t, groups[t,k]], V[idx[t,k]]⟩.
Indices are not differentiable.

Bytes per call (the roofline the kernels are measured against), L = lookups = Π(...)·K:
    forward  L·v·b(V) + (#rows of y)·G·v·b(y) + L·(4 + b(w) [+ 4 for groups]).

Invalid lookups (the rule of every impl, XLA and kernels): an index outside [0, N)
(negative = padding) or a group outside [0, G) contributes exactly zero to y, its
weight gets zero gradient and it adds nothing to dV — never clamped, never wrapped.
`check_indices=True` adds a `jax.experimental.checkify` check instead, reported by a
`checkify.checkify` wrapper. No tokens, K = 0 or an empty table give zeros.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from jax.experimental import checkify

from sparsejax.ops.dispatch import kernel_platform, resolve_impl


def _check(values, indices, weights, groups, num_groups) -> None:
  if values.ndim != 2:
    raise ValueError(f"values must be 2-D [N, v], got shape {values.shape}")
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise ValueError(f"values must be floating point, got dtype {values.dtype}")
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    raise ValueError(f"weights must be floating point, got dtype {weights.dtype}")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got dtype {indices.dtype}")
  if indices.ndim < 1 or weights.shape != indices.shape:
    raise ValueError(f"weights shape {weights.shape} must equal indices shape "
                     f"{indices.shape} ([..., K])")
  if values.shape[0] >= 2**31:
    raise ValueError(f"values has {values.shape[0]} rows; int32 indices need < 2**31")
  if groups is None:
    if num_groups is not None:
      raise ValueError("num_groups is only meaningful with groups")
    return
  if groups.shape != indices.shape or not jnp.issubdtype(groups.dtype, jnp.integer):
    raise ValueError(f"groups must be integers shaped like indices {indices.shape}, got "
                     f"{groups.dtype}{list(groups.shape)}")
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"num_groups={num_groups!r} must be a static int >= 1 with groups")


def check_lookup_indices(indices, groups, num_rows: int, num_groups: int | None,
                         op: str = "memory_lookup") -> None:
  """`checkify.check`s that indices are in [0, num_rows) and groups in [0, num_groups)."""
  for name, x, size, what in (("indices", indices, num_rows, "rows of values"),
                              ("groups", groups, num_groups, "num_groups")):
    if x is None or x.size == 0:
      continue
    checkify.check(jnp.all((x >= 0) & (x < size)),
                   f"{op}: {name} must be in [0, {size}) ({what}); got min {{lo}}, "
                   "max {hi}", lo=jnp.min(x), hi=jnp.max(x))


def valid_lookups(indices, groups, num_rows: int, num_groups: int):
  """bool [L, K]: the lookup reads a row in [0, num_rows) into a group in [0, G)."""
  return ((indices >= 0) & (indices < num_rows) & (groups >= 0)
          & (groups < num_groups))


def lookup_reference(values, indices, weights, groups, num_groups: int):
  """XLA forward on flat inputs: [L, K] indices/weights/groups -> [L, G, v]."""
  out_dtype = jnp.result_type(values.dtype, weights.dtype)
  valid = valid_lookups(indices, groups, values.shape[0], num_groups)
  rows = jnp.take(values, jnp.where(valid, indices, 0), axis=0)       # [L, K, v]
  onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)      # [L, K, G]
  scaled = jnp.where(valid, weights.astype(jnp.float32), 0.0)[..., None] * onehot
  out = jnp.einsum("lkg,lkv->lgv", scaled, rows, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def sorted_segment_rows(indices, contributions, num_rows: int):
  """Deterministic Σ of `contributions[L, v]` into rows `indices[L]` -> [num_rows, v] f32
  (indices in [num_rows, 2**31) are dropped).

  On CPU and TPU an XLA scatter-add applies its updates in a fixed order, so it is used
  as is. On GPU XLA's scatter-add uses float atomics (run-to-run nondeterministic), so
  there: stable sort by row, a segmented inclusive scan (fixed summation tree), then
  each distinct row is written once from its segment's last element (≈40× slower than
  a scatter on CPU, which is why it is GPU-only; the Pallas kernel is GPU's default)."""
  vals = contributions.astype(jnp.float32)
  if jax.default_backend() != "gpu":
    return jnp.zeros((num_rows, vals.shape[1]), jnp.float32).at[indices].add(
        vals, mode="drop")
  order = jnp.argsort(indices, stable=True)
  idx = indices[order]
  vals = vals[order]
  starts = jnp.concatenate([jnp.ones((1,), bool), idx[1:] != idx[:-1]])

  def combine(a, b):
    a_start, a_val = a
    b_start, b_val = b
    return a_start | b_start, jnp.where(b_start[:, None], b_val, a_val + b_val)

  _, sums = lax.associative_scan(combine, (starts, vals))
  ends = jnp.concatenate([idx[1:] != idx[:-1], jnp.ones((1,), bool)])
  target = jnp.where(ends, idx, num_rows)                             # non-ends dropped
  return jnp.zeros((num_rows, vals.shape[1]), jnp.float32).at[target].set(
      sums, mode="drop", unique_indices=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lookup_xla(values, indices, weights, groups, num_groups):
  return lookup_reference(values, indices, weights, groups, num_groups)


def _lookup_xla_fwd(values, indices, weights, groups, num_groups):
  out = lookup_reference(values, indices, weights, groups, num_groups)
  return out, (values, indices, weights, groups)


@jax.jit  # the segmented scan is hundreds of small ops: never run them one by one
def lookup_backward_reference(values, indices, weights, groups, d_out):
  """(dV [N, v] in values' dtype, dw [L, K] in weights' dtype) for [L, G, v] d_out.
  Invalid lookups get dw = 0 and add nothing to dV."""
  n = values.shape[0]
  valid = valid_lookups(indices, groups, n, d_out.shape[1])
  rows = jnp.take(values, jnp.where(valid, indices, 0), axis=0)       # [L, K, v]
  dy = jnp.take_along_axis(d_out.astype(jnp.float32),
                           jnp.where(valid, groups, 0)[..., None], axis=1)
  d_weights = jnp.where(valid, jnp.einsum("lkv,lkv->lk", dy, rows.astype(jnp.float32)),
                        0.0)
  contrib = weights.astype(jnp.float32).reshape(-1, 1) * dy.reshape(valid.size, -1)
  d_values = sorted_segment_rows(jnp.where(valid, indices, n).reshape(-1), contrib, n)
  return d_values.astype(values.dtype), d_weights.astype(weights.dtype)


def _lookup_xla_bwd(num_groups, res, d_out):
  del num_groups
  values, indices, weights, groups = res
  d_values, d_weights = lookup_backward_reference(values, indices, weights, groups, d_out)
  return d_values, None, d_weights, None


_lookup_xla.defvjp(_lookup_xla_fwd, _lookup_xla_bwd)


def _kernel_lookup(values, indices, weights, groups, num_groups: int, impl: str):
  from pallas_kernels.memory_lookup import memory_lookup_kernel  # lazy: kernels optional
  return memory_lookup_kernel(values, indices, weights, groups, num_groups,
                              interpret=impl == "interpret", backend=kernel_platform())


def resolve_lookup_impl(impl: str, values_shape, values_dtype, weights_dtype, k: int,
                        num_groups: int) -> str:
  """`resolve_impl` for a lookup into a [N, v] table (per device) with K lookups per
  row into G groups: "auto" falls back to XLA where the kernel's constraints fail."""
  unmet = None
  if impl != "xla":
    from pallas_kernels.memory_lookup import kernel_unmet  # lazy: kernels optional
    unmet = kernel_unmet(values_shape, values_dtype, weights_dtype, k, num_groups,
                         kernel_platform())
  return resolve_impl(impl, op="memory_lookup", unmet=unmet)


def memory_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                  groups: jax.Array | None = None, num_groups: int | None = None,
                  impl: str = "auto", check_indices: bool = False) -> jax.Array:
  """Weighted sum of gathered value rows (see the module docstring).

  Args:
    values: [N, v] float table.
    indices: int [..., K] rows of `values` (int32 math: N < 2**31).
    weights: float [..., K].
    groups: optional int [..., K] in [0, num_groups): the output row each lookup adds to.
    num_groups: static G (required with `groups`).
    impl: "auto" | "xla" | "pallas" | "interpret" (`sparsejax.ops.dispatch`); "auto"
      uses XLA where the kernel cannot take the inputs (`resolve_lookup_impl`).
    check_indices: also `checkify.check` that indices are in [0, N) and groups in
      [0, num_groups) (reported under `checkify.checkify`); off: invalid lookups
      contribute zero (module docstring).

  Returns:
    [..., v] without groups, [..., G, v] with them; dtype result_type(values, weights).
    Differentiable in `values` and `weights` (deterministic backward).
  """
  values, indices, weights = map(jnp.asarray, (values, indices, weights))
  if groups is not None:
    groups = jnp.asarray(groups)
  _check(values, indices, weights, groups, num_groups)
  if check_indices:
    check_lookup_indices(indices, groups, values.shape[0], num_groups)
  (n, v), (*lead, k) = values.shape, indices.shape
  g = 1 if groups is None else num_groups
  out_shape = (*lead, v) if groups is None else (*lead, g, v)
  if min(indices.size, n, v) == 0:     # no tokens, K = 0 or an empty table
    return jnp.zeros(out_shape, jnp.result_type(values.dtype, weights.dtype))
  idx2d = indices.astype(jnp.int32).reshape(-1, k)
  groups2d = (jnp.zeros(idx2d.shape, jnp.int32) if groups is None
              else groups.astype(jnp.int32).reshape(-1, k))
  w2d = weights.reshape(-1, k)
  impl = resolve_lookup_impl(impl, values.shape, values.dtype, weights.dtype, k, g)
  if impl == "xla":
    out = _lookup_xla(values, idx2d, w2d, groups2d, g)
  else:
    out = _kernel_lookup(values, idx2d, w2d, groups2d, g, impl)
  return out.reshape(out_shape)
