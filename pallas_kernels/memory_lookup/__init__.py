"""Memory lookup kernels (PKM / UltraMem weighted gather-sum): TPU (Mosaic), GPU (Triton).

`memory_lookup_kernel(values, indices, weights, groups, num_groups)` computes

    out[l, g, :] = Σ_k weights[l, k] · [groups[l, k] = g] · values[indices[l, k], :]

with f32 accumulation, out [L, G, v] in result_type(values, weights). Backward (a
`jax.custom_vjp`, deterministic: no atomics) is two kernels:
    d_values[n]  = Σ_{(l,k): indices[l,k]=n} weights[l,k] · dY[l, groups[l,k]]  (CSR
                   of the row-sorted lookups, built in XLA; one write per dV tile)
    d_weights[l,k] = ⟨dY[l, groups[l,k]], values[indices[l,k]]⟩               (gather)
Indices and groups get no gradient. Out-of-range indices are clamped (like XLA's
`mode="clip"`). See `tpu.py` / `gpu.py` for tiling, DMA patterns and rooflines.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from pallas_kernels._common import BACKENDS, default_backend
from pallas_kernels.memory_lookup.gpu import (lookup_dvalues_gpu, lookup_dweights_gpu,
                                              lookup_fwd_gpu)
from pallas_kernels.memory_lookup.tpu import (SUPPORTED_DTYPES, lookup_dvalues_tpu,
                                              lookup_dweights_tpu, lookup_fwd_tpu)



def _check(values, indices, weights, groups, num_groups, backend) -> int:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
  if values.ndim != 2:
    raise ValueError(f"values must be 2-D [N, v], got shape {values.shape}")
  if values.shape[0] < 1 or values.shape[1] < 1:
    raise ValueError(f"values must be non-empty, got shape {values.shape}")
  supported = [jnp.dtype(t) for t in SUPPORTED_DTYPES]
  if values.dtype not in supported:
    raise ValueError(f"values must be float32 or bfloat16, got {values.dtype}")
  if indices.ndim != 2:
    raise ValueError(f"indices must be 2-D [L, K], got shape {indices.shape}")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got {indices.dtype}")
  if weights.shape != indices.shape or groups.shape != indices.shape:
    raise ValueError(f"weights {weights.shape} and groups {groups.shape} must have the "
                     f"shape of indices {indices.shape}")
  if weights.dtype not in supported:
    raise ValueError(f"weights must be float32 or bfloat16, got {weights.dtype}")
  if not jnp.issubdtype(groups.dtype, jnp.integer):
    raise ValueError(f"groups must be integers, got {groups.dtype}")
  if indices.shape[1] < 1:
    raise ValueError(f"indices must have K >= 1 lookups per row, got {indices.shape}")
  if values.shape[0] >= 2**31:
    raise ValueError(f"values has {values.shape[0]} rows; int32 indices need < 2**31")
  if isinstance(num_groups, bool):
    raise ValueError(f"num_groups={num_groups!r} must be a static int >= 1")
  try:
    num_groups = operator.index(num_groups)
  except TypeError:
    raise ValueError(f"num_groups={num_groups!r} must be a static int >= 1") from None
  if num_groups < 1:
    raise ValueError(f"num_groups={num_groups!r} must be a static int >= 1")
  return num_groups


def memory_lookup_kernel(values: jax.Array, indices: jax.Array, weights: jax.Array,
                         groups: jax.Array, num_groups: int, *, interpret=False,
                         backend: str | None = None) -> jax.Array:
  """Grouped weighted gather-sum of value rows, differentiable in values and weights.

  Args:
    values: [N, v] float32 / bfloat16 table.
    indices: int [L, K] rows of `values` (clamped to [0, N)).
    weights: float32 / bfloat16 [L, K].
    groups: int [L, K] in [0, num_groups): the output row each lookup adds to (out of
      range is the caller's bug: the backward would read the wrong dY rows).
    num_groups: static G >= 1.
    interpret: run in interpret mode for CPU tests (True; for the TPU kernel also a
      `pltpu.InterpretParams`).
    backend: "tpu" (Mosaic) or "gpu" (Triton); default by `jax.default_backend()`
      (TPU kernel unless the default backend is a GPU).

  Returns:
    out [L, G, v] in result_type(values, weights).
  """
  values, indices, weights, groups = map(jnp.asarray, (values, indices, weights, groups))
  backend = default_backend() if backend is None else backend
  num_groups = _check(values, indices, weights, groups, num_groups, backend)
  indices = indices.astype(jnp.int32)
  groups = groups.astype(jnp.int32)
  if backend == "tpu":
    fwd = lambda v, i, w, g: lookup_fwd_tpu(v, i, w, g, num_groups, interpret=interpret)
    dvals = lambda v, i, w, g, dy: lookup_dvalues_tpu(v, i, w, g, dy, interpret=interpret)
    dwts = lambda v, i, g, dy: lookup_dweights_tpu(v, i, g, dy, interpret=interpret)
  else:
    interp = bool(interpret)
    fwd = lambda v, i, w, g: lookup_fwd_gpu(v, i, w, g, num_groups, interpret=interp)
    dvals = lambda v, i, w, g, dy: lookup_dvalues_gpu(v, i, w, g, dy, interpret=interp)
    dwts = lambda v, i, g, dy: lookup_dweights_gpu(v, i, g, dy, interpret=interp)

  @jax.custom_vjp
  def op(values, indices, weights, groups):
    return fwd(values, indices, weights, groups)

  def op_fwd(values, indices, weights, groups):
    return fwd(values, indices, weights, groups), (values, indices, weights, groups)

  def op_bwd(res, d_out):
    values, indices, weights, groups = res
    d_values = dvals(values, indices, weights, groups, d_out)
    d_weights = dwts(values, indices, groups, d_out).astype(weights.dtype)
    return d_values, None, d_weights, None

  op.defvjp(op_fwd, op_bwd)
  return op(values, indices, weights, groups)


__all__ = ["memory_lookup_kernel", "lookup_fwd_tpu", "lookup_dvalues_tpu",
           "lookup_dweights_tpu", "lookup_fwd_gpu", "lookup_dvalues_gpu",
           "lookup_dweights_gpu", "BACKENDS", "SUPPORTED_DTYPES"]
