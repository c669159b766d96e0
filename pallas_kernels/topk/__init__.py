"""Top-K sparsification kernels (Q-Sparse): TPU (Mosaic) and GPU (Triton).

`topk_sparsify_kernel(x2d, k)` keeps, per row of `x2d[R, D]`, the `k` entries of
largest magnitude and zeroes the rest, bit-for-bit like `lax.top_k(|x|, k)` + scatter:
ordering is the integer order of bitcast(f32(|x|)), so NaN (either sign) ranks above
+inf, -0.0 ties with +0.0, and ties keep the lowest column. Unselected entries are
exactly +0.0. The backward pass is the straight-through identity (∂L/∂x = ∂L/∂y).
See `tpu.py` / `gpu.py` for the algorithms, rooflines and limits; `kernel_unmet` says
when a kernel cannot take an input (dtype, row length), so that callers fall back.
"""

from __future__ import annotations

import functools
import operator

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import BACKENDS, default_backend
from pallas_kernels.topk.gpu import MAX_BLOCK, topk_sparsify_gpu
from pallas_kernels.topk.tpu import (SUPPORTED_DTYPES, VMEM_BUDGET, topk_sparsify_tpu,
                                     vmem_bytes)


def kernel_unmet(d: int, dtype, backend: str) -> str | None:
  """Why the `backend` kernel cannot sparsify rows of length `d` in `dtype`, or None.

  Constraints: dtype float32 / bfloat16 / float16; GPU: the row is one Triton block of
  next_pow2(d) ≤ MAX_BLOCK elements; TPU: one row tile's VMEM (`tpu.vmem_bytes`) within
  `tpu.VMEM_BUDGET`.
  """
  if jnp.dtype(dtype) not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
    return f"dtype {jnp.dtype(dtype)} is not float32, bfloat16 or float16"
  if backend == "gpu" and pl.next_power_of_2(d) > MAX_BLOCK:
    return (f"row length D={d} exceeds the GPU kernel's one-block limit of {MAX_BLOCK} "
            "elements")
  if backend == "tpu" and vmem_bytes(d, dtype) > VMEM_BUDGET:
    return (f"row length D={d} needs {vmem_bytes(d, dtype) / 2**20:.1f} MiB of VMEM per "
            f"row tile, over the {VMEM_BUDGET / 2**20:.0f} MiB budget")
  return None


def static_int(v, name: str) -> int:
  """`v` as a Python int; a ValueError for floats, bools and traced values."""
  if isinstance(v, bool):
    raise ValueError(f"{name}={v!r} must be a static Python int")
  try:
    return operator.index(v)
  except TypeError:
    raise ValueError(f"{name}={v!r} must be a static Python int") from None


def _check(x2d, k: int, backend: str) -> None:
  if x2d.ndim != 2:
    raise ValueError(f"x2d must be 2-D [rows, D], got shape {x2d.shape}")
  if x2d.dtype not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
    raise ValueError(f"topk kernel supports float32, bfloat16 and float16 inputs, "
                     f"got {x2d.dtype}")
  d = x2d.shape[1]
  if not 1 <= k <= d:
    raise ValueError(f"k={k!r} must be in [1, {d}] for axis of size {d}")
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")


def _forward(x2d, k, interpret, return_threshold, backend, num_warps, num_stages):
  if x2d.shape[0] == 0:                   # no rows: nothing to launch
    empty = jnp.zeros((0,), jnp.int32)
    return (x2d, empty, empty) if return_threshold else x2d
  if backend == "tpu":
    return topk_sparsify_tpu(x2d, k, interpret=interpret,
                             return_threshold=return_threshold)
  return topk_sparsify_gpu(x2d, k, interpret=bool(interpret),
                           return_threshold=return_threshold, num_warps=num_warps,
                           num_stages=num_stages)


def topk_sparsify_kernel(x2d: jax.Array, k: int, *, interpret=False,
                         return_threshold: bool = False, backend: str | None = None,
                         num_warps: int | None = None, num_stages: int = 1):
  """Per-row top-k by magnitude with a straight-through (identity) gradient.

  Args:
    x2d: [R, D] float32 / bfloat16 / float16.
    k: static int in [1, D].
    interpret: run the kernel in interpret mode (True; for the TPU kernel also a
      `pltpu.InterpretParams`), for testing on CPU.
    return_threshold: also return per-row int32 `(t, c)` with which `apply_threshold`
      rebuilds the mask (lets a consumer matmul apply the mask itself).
    backend: "tpu" (Mosaic) or "gpu" (Triton); default by `jax.default_backend()`
      (TPU kernel unless the default backend is a GPU).
    num_warps, num_stages: Triton compiler parameters (GPU kernel only; see `gpu.py`).

  Returns:
    y[R, D], or (y, t, c). Only y is differentiable: ∂L/∂x = ∂L/∂y.
  """
  x2d = jnp.asarray(x2d)
  backend = default_backend() if backend is None else backend
  k = static_int(k, "k")
  _check(x2d, k, backend)
  fwd = functools.partial(_forward, k=k, interpret=interpret,
                          return_threshold=return_threshold, backend=backend,
                          num_warps=num_warps, num_stages=num_stages)

  @jax.custom_vjp
  def op(x):
    return fwd(x)

  def op_fwd(x):
    return fwd(x), None

  def op_bwd(_, g):
    return (g[0] if return_threshold else g,)

  op.defvjp(op_fwd, op_bwd)
  return op(x2d)


def threshold_keys(x: jax.Array) -> jax.Array:
  """The int32 ordering keys of the kernels: bitcast(f32(|x|), int32)."""
  return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF


def apply_threshold(x2d: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
  """Rebuilds the top-k mask from a kernel's per-row `(t, c)`: bool[R, D].

  Entry j of row i is kept iff key_ij > t_i, or key_ij == t_i and j ≤ c_i.
  """
  key = threshold_keys(x2d)
  col = lax.broadcasted_iota(jnp.int32, x2d.shape, 1)
  t, c = t[:, None], c[:, None]
  return (key > t) | ((key == t) & (col <= c))


__all__ = ["topk_sparsify_kernel", "topk_sparsify_tpu", "topk_sparsify_gpu",
           "apply_threshold", "threshold_keys", "kernel_unmet", "BACKENDS"]
