"""Memory lookup kernels (PKM / UltraMem weighted gather-sum): TPU (Mosaic), GPU (Triton).

`memory_lookup_kernel(values, indices, weights, groups, num_groups)` computes

    out[l, g, :] = Σ_k weights[l, k] · [groups[l, k] = g] · values[indices[l, k], :]

with f32 accumulation, out [L, G, v] in result_type(values, weights). Backward (a
`jax.custom_vjp`, deterministic: no atomics) is two kernels:
    d_values[n]  = Σ_{(l,k): indices[l,k]=n} weights[l,k] · dY[l, groups[l,k]]  (CSR
                   of the row-sorted lookups, built in XLA by `csr.py`; one write per
                   touched dV tile / row into an aliased zeros table)
    d_weights[l,k] = ⟨dY[l, groups[l,k]], values[indices[l,k]]⟩               (gather)
Indices and groups get no gradient. Invalid lookups (index outside [0, N), negative =
padding, or group outside [0, G)) contribute exactly zero to the output and get zero
d_weights and no d_values update (`rule.py`). No tokens (L = 0), no lookups (K = 0) or
an empty table give zeros of the output shape. `kernel_unmet` states the inputs a
kernel cannot take (callers fall back to XLA). See `tpu.py` / `gpu.py` for tiling,
DMA patterns, VMEM limits, rooflines and grid-step / DMA counts.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from pallas_kernels._common import BACKENDS, default_backend, match_vma
from pallas_kernels.memory_lookup.gpu import (lookup_dvalues_gpu, lookup_dweights_gpu,
                                              lookup_fwd_gpu)
from pallas_kernels.memory_lookup.tpu import (SUPPORTED_DTYPES, VMEM_BUDGET,
                                              lookup_dvalues_tpu, lookup_dweights_tpu,
                                              lookup_fwd_tpu, packing, vmem_bytes)


def kernel_unmet(values_shape, values_dtype, weights_dtype, k: int, num_groups: int,
                 backend: str) -> str | None:
  """Why the `backend` kernel cannot take these inputs, or None when it can.

  Both: float32 / bfloat16 values and weights. TPU: an even number of rows for
  bfloat16 tables (aligned row pairs) and a VMEM footprint (`tpu.vmem_bytes`) within
  `tpu.VMEM_BUDGET`.
  """
  supported = [jnp.dtype(t) for t in SUPPORTED_DTYPES]
  for name, dtype in (("values", values_dtype), ("weights", weights_dtype)):
    if jnp.dtype(dtype) not in supported:
      return f"{name} dtype {jnp.dtype(dtype)} is not float32 or bfloat16"
  if backend != "tpu":
    return None
  n, v = values_shape
  if packing(values_dtype) == 2 and n % 2:
    return f"bfloat16 values with an odd number of rows N={n}"
  need = vmem_bytes(v, k, num_groups)
  if need > VMEM_BUDGET:
    return (f"VMEM footprint {need} bytes for K={k} lookups of v={v} columns into "
            f"G={num_groups} groups exceeds {VMEM_BUDGET}")
  return None


def _check(values, indices, weights, groups, num_groups, backend) -> int:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
  if values.ndim != 2:
    raise ValueError(f"values must be 2-D [N, v], got shape {values.shape}")
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
    values: [N, v] float32 / bfloat16 table (TPU: N even for bfloat16).
    indices: int [L, K] rows of `values`; outside [0, N): the lookup is invalid.
    weights: float32 / bfloat16 [L, K].
    groups: int [L, K] in [0, num_groups): the output row each lookup adds to;
      outside: the lookup is invalid (contributes zero, zero gradients).
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
  (n, v), (l, k) = values.shape, indices.shape
  if min(n, v, l, k) == 0:      # nothing to read: zeros (zero gradients by autodiff)
    return jnp.zeros((l, num_groups, v), jnp.result_type(values.dtype, weights.dtype))
  if backend == "tpu" and packing(values.dtype) == 2 and n % 2:
    raise ValueError(f"bfloat16 values need an even number of rows on TPU (the kernel "
                     f"reads aligned row pairs), got N={n}")
  # Inside a shard_map: one manual-axis type for all (dV of a replicated table is then
  # a per-shard partial sum, summed by the pcast's transpose).
  values, indices, weights, groups = match_vma(values, indices.astype(jnp.int32),
                                               weights, groups.astype(jnp.int32))
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


__all__ = ["memory_lookup_kernel", "kernel_unmet", "lookup_fwd_tpu", "lookup_dvalues_tpu",
           "lookup_dweights_tpu", "lookup_fwd_gpu", "lookup_dvalues_gpu",
           "lookup_dweights_gpu", "BACKENDS", "SUPPORTED_DTYPES"]
