"""Top-K sparsification kernels (Q-Sparse): TPU (Mosaic) and GPU (Triton).

`topk_sparsify_kernel(x2d, k)` keeps, per row of `x2d[R, D]`, the `k` entries of
largest magnitude and zeroes the rest, bit-for-bit like `lax.top_k(|x|, k)` + scatter:
ordering is the integer order of bitcast(f32(|x|)), so NaN (either sign) ranks above
+inf, -0.0 ties with +0.0, and ties keep the lowest column. Unselected entries are
exactly +0.0. The backward pass is the straight-through identity (∂L/∂x = ∂L/∂y).
See `tpu.py` / `gpu.py` for the algorithms and rooflines.
"""

from __future__ import annotations

import functools
import operator

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels._common import BACKENDS, default_backend
from pallas_kernels.topk.gpu import topk_sparsify_gpu
from pallas_kernels.topk.tpu import SUPPORTED_DTYPES, topk_sparsify_tpu



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


def _forward(x2d, k, interpret, return_threshold, backend, num_warps):
  if backend == "tpu":
    return topk_sparsify_tpu(x2d, k, interpret=interpret,
                             return_threshold=return_threshold)
  return topk_sparsify_gpu(x2d, k, interpret=bool(interpret),
                           return_threshold=return_threshold, num_warps=num_warps)


def topk_sparsify_kernel(x2d: jax.Array, k: int, *, interpret=False,
                         return_threshold: bool = False, backend: str | None = None,
                         num_warps: int | None = None):
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
    num_warps: Triton warps (GPU kernel only).

  Returns:
    y[R, D], or (y, t, c). Only y is differentiable: ∂L/∂x = ∂L/∂y.
  """
  x2d = jnp.asarray(x2d)
  backend = default_backend() if backend is None else backend
  k = static_int(k, "k")
  _check(x2d, k, backend)
  fwd = functools.partial(_forward, k=k, interpret=interpret,
                          return_threshold=return_threshold, backend=backend,
                          num_warps=num_warps)

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
           "apply_threshold", "threshold_keys", "BACKENDS"]
