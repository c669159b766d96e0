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
Out-of-range indices are the caller's bug; they are clamped to [0, N) (every impl).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

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


def lookup_reference(values, indices, weights, groups, num_groups: int):
  """XLA forward on flat inputs: [L, K] indices/weights/groups -> [L, G, v]."""
  out_dtype = jnp.result_type(values.dtype, weights.dtype)
  rows = jnp.take(values, indices, axis=0, mode="clip")               # [L, K, v]
  onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)      # [L, K, G]
  scaled = weights.astype(jnp.float32)[..., None] * onehot
  out = jnp.einsum("lkg,lkv->lgv", scaled, rows, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def sorted_segment_rows(indices, contributions, num_rows: int):
  """Deterministic Σ of `contributions[L, v]` into rows `indices[L]` -> [num_rows, v] f32.

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
  """(dV [N, v] in values' dtype, dw [L, K] in weights' dtype) for [L, G, v] d_out."""
  flat_groups = groups.reshape(-1)
  rows = jnp.take(values, indices, axis=0, mode="clip")               # [L, K, v]
  dy = jnp.take_along_axis(d_out.astype(jnp.float32), groups[..., None], axis=1)
  d_weights = jnp.einsum("lkv,lkv->lk", dy, rows.astype(jnp.float32))
  contrib = weights.astype(jnp.float32).reshape(-1, 1) * dy.reshape(flat_groups.size, -1)
  d_values = sorted_segment_rows(indices.reshape(-1), contrib, values.shape[0])
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


def memory_lookup(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                  groups: jax.Array | None = None, num_groups: int | None = None,
                  impl: str = "auto") -> jax.Array:
  """Weighted sum of gathered value rows (see the module docstring).

  Args:
    values: [N, v] float table.
    indices: int [..., K] rows of `values` (int32 math: N < 2**31).
    weights: float [..., K].
    groups: optional int [..., K] in [0, num_groups): the output row each lookup adds to.
    num_groups: static G (required with `groups`).
    impl: "auto" | "xla" | "pallas" | "interpret" (`sparsejax.ops.dispatch`).

  Returns:
    [..., v] without groups, [..., G, v] with them; dtype result_type(values, weights).
    Differentiable in `values` and `weights` (deterministic backward).
  """
  values, indices, weights = map(jnp.asarray, (values, indices, weights))
  _check(values, indices, weights, groups, num_groups)
  lead, k = indices.shape[:-1], indices.shape[-1]
  if groups is None:
    groups2d, g = jnp.zeros((max(1, indices.size // k), k), jnp.int32), 1
  else:
    groups2d, g = jnp.asarray(groups, jnp.int32).reshape(-1, k), num_groups
  idx2d = jnp.clip(indices.astype(jnp.int32), 0, values.shape[0] - 1).reshape(-1, k)
  w2d = weights.reshape(-1, k)
  impl = resolve_impl(impl, op="memory_lookup")
  if impl == "xla":
    out = _lookup_xla(values, idx2d, w2d, groups2d, g)
  else:
    out = _kernel_lookup(values, idx2d, w2d, groups2d, g, impl)
  if groups is None:
    return out.reshape(*lead, values.shape[1])
  return out.reshape(*lead, g, values.shape[1])
