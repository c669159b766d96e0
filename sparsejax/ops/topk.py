"""Top-K activation sparsification (Q-Sparse) and N:M (block Q-Sparse).

    M = TopK_mask(|x|, k) per row along `axis`;   y = x ⊙ M
    optional rescale:  y ← y · ‖x‖₂ / ‖y‖₂   (per row; a row with ‖y‖₂ = 0 is left as is)

Backward is the straight-through estimator: ∂L/∂x = ∂L/∂y for every element (also the
zeroed ones, and also with `rescale=True`), implemented with `jax.custom_vjp`.

Ordering and special values (the same in the XLA reference and the Pallas kernels):
  * entries are ranked by |x| in IEEE total order, i.e. by the bits of |x| — exactly
    what `lax.top_k(jnp.abs(x), k)` does: NaN (of either sign) ranks ABOVE +inf, so
    NaNs are kept first (several NaNs in a row are ordered by payload, as lax.top_k);
  * -0.0 has magnitude 0 and ties with +0.0;
  * ties keep the lowest index along `axis` (as `lax.top_k`), so exactly k per row;
  * unselected entries are +0.0 (a select, not a multiply: inf/NaN do not leak);
  * with `rescale=True` a row containing NaN or inf becomes NaN (its norm is).
Bad arguments raise at trace time: TypeError for a non-floating x, ValueError for k out
of range or n:m not dividing the axis. Empty inputs (no rows; an axis of size 0 with
k = 0) return x.

Kernels (`impl`, see `sparsejax.ops.dispatch`): "auto" runs the Pallas kernel on
TPU/GPU when it takes the input (`pallas_kernels.topk.kernel_unmet`: dtype
f32/bf16/f16, row length within the kernel's VMEM / block limits), else XLA. A Pallas
call cannot be partitioned by XLA, so when a mesh of more than one device is in
context (`jax.set_mesh`) the kernel runs inside `jax.shard_map`: rows are independent,
so the flattened rows are split over the batch axes ("data", "fsdp", "expert", those
of size > 1 whose product divides the row count — the layout of activations whose
batch dim is sharded that way) and replicated over the other axes.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparsejax.ops.dispatch import kernel_platform, resolve_impl

BATCH_AXES = ("data", "fsdp", "expert")   # as sparsejax.sharding.BATCH_AXES


def static_int(v, name: str) -> int:
  if isinstance(v, bool):
    raise ValueError(f"{name}={v!r} must be a static Python int")
  try:
    return operator.index(v)
  except TypeError:
    raise ValueError(f"{name}={v!r} must be a static Python int") from None


def _check_float(x, fn: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: x must be a floating-point array, got dtype {x.dtype}")


def _axis(x, axis: int) -> int:
  if x.ndim == 0:
    raise ValueError("top-k sparsification needs an input with at least one axis")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis={axis} is out of range for an input of rank {x.ndim}")
  return axis % x.ndim


def _check_k(k, d: int) -> int:
  """k in [1, d] (k = 0 only for an empty axis, d = 0)."""
  k = static_int(k, "k")
  lo = min(1, d)
  if not lo <= k <= d:
    raise ValueError(f"k={k} must be in [{lo}, {d}] for axis of size {d}")
  return k


def _topk_mask_last(x, k: int):
  """bool mask of the k largest |x| along the last axis (lax.top_k tie rule).

  Half-precision keys are upcast to float32 (exact, order-preserving): XLA:CPU lowers
  bf16 `top_k` to a full sort, 2-4x slower (benchmarks/RESULTS.md).
  """
  key = jnp.abs(x)
  if jnp.finfo(x.dtype).bits < 32:
    key = key.astype(jnp.float32)
  _, idx = lax.top_k(key, k)
  return jnp.put_along_axis(jnp.zeros(x.shape, jnp.bool_), idx, True, axis=-1,
                            inplace=False)


def topk_mask(x: jax.Array, k: int, *, axis: int = -1) -> jax.Array:
  """The Q-Sparse mask: True at the k largest-|x| entries of each row along `axis`.

  Reference implementation (`lax.top_k` on |x| + scatter); not differentiable.
  """
  x = jnp.asarray(x)
  _check_float(x, "topk_mask")
  axis = _axis(x, axis)
  k = _check_k(k, x.shape[axis])
  return jnp.moveaxis(_topk_mask_last(jnp.moveaxis(x, axis, -1), k), -1, axis)


def nm_mask(x: jax.Array, n: int, m: int, *, axis: int = -1) -> jax.Array:
  """True at the n largest-|x| entries of every m consecutive entries along `axis`."""
  x = jnp.asarray(x)
  _check_float(x, "nm_mask")
  axis = _axis(x, axis)
  n, m = _check_nm(n, m, x.shape[axis])
  xm = jnp.moveaxis(x, axis, -1)
  groups = xm.reshape(*xm.shape[:-1], xm.shape[-1] // m, m)
  mask = _topk_mask_last(groups, n).reshape(xm.shape)
  return jnp.moveaxis(mask, -1, axis)


def _check_nm(n, m, d: int) -> tuple[int, int]:
  n, m = static_int(n, "n"), static_int(m, "m")
  if m < 1 or d % m:
    raise ValueError(f"m={m} must be a positive divisor of the axis size {d}")
  if not 1 <= n <= m:
    raise ValueError(f"n={n} must be in [1, {m}] (m={m})")
  return n, m


def _rescale_last(x, y):
  """y · ‖x‖₂/‖y‖₂ per row of the last axis; rows with ‖y‖₂ = 0 are returned as is."""
  dt = jnp.promote_types(x.dtype, jnp.float32)
  xf, yf = x.astype(dt), y.astype(dt)
  amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
  a = jnp.where(amax > 0, amax, 1.0)          # overflow-safe norms
  nx = jnp.sqrt(jnp.sum(jnp.square(xf / a), axis=-1, keepdims=True))
  ny = jnp.sqrt(jnp.sum(jnp.square(yf / a), axis=-1, keepdims=True))
  scale = jnp.where(ny > 0, nx / jnp.where(ny > 0, ny, 1.0), 1.0)
  scale = jnp.where(jnp.isnan(ny), ny, scale)
  return (yf * scale).astype(x.dtype)


def _free_axes(mesh) -> tuple[str, ...]:
  """The axes of `mesh` not already manual (i.e. outside any enclosing shard_map)."""
  if mesh.empty:
    return ()
  return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
               if t != jax.sharding.AxisType.Manual)


def _row_axes(mesh, free: tuple[str, ...], rows: int) -> tuple[str, ...]:
  """The BATCH_AXES among `free` (of size > 1) whose cumulative product divides
  `rows`, in order."""
  axes, n = [], 1
  for a in BATCH_AXES:
    if a in free and mesh.shape[a] > 1 and rows % (n * mesh.shape[a]) == 0:
      axes.append(a)
      n *= mesh.shape[a]
  return tuple(axes)


def _kernel_sparsify_last(x, k: int, impl: str):
  """The Pallas kernel on the rows of x [..., d]; inside `jax.shard_map` over the
  mesh's free axes when a multi-device mesh is in context (see the module doc)."""
  from pallas_kernels.topk import topk_sparsify_kernel  # lazy: kernels are optional
  x2d = x.reshape(-1, x.shape[-1])
  run = functools.partial(topk_sparsify_kernel, k=k, interpret=impl == "interpret",
                          backend=kernel_platform())
  mesh = jax.sharding.get_abstract_mesh()
  free = _free_axes(mesh)
  if math.prod(mesh.shape[a] for a in free) > 1:
    # Manual over every free axis, size-1 ones too: neither Mosaic nor the interpreter's
    # callbacks accept a partially auto-partitioned region. check_vma=False: a
    # pallas_call output has no varying-axes type; it is replicated over the axes the
    # rows are not split on (every replica computes the same rows).
    spec = P(_row_axes(mesh, free, x2d.shape[0]) or None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=spec, out_specs=spec,
                        axis_names=set(free), check_vma=False)
  return run(x2d).reshape(x.shape)


def _sparsify_last(x, k: int, rescale: bool, impl: str):
  if x.size == 0:
    return x
  if impl == "xla":
    y = jnp.where(_topk_mask_last(x, k), x, jnp.zeros_like(x))
  else:
    y = _kernel_sparsify_last(x, k, impl)
  return _rescale_last(x, y) if rescale else y


def _ste(fn, x):
  """fn(x) in the forward pass, identity in the backward pass."""
  @jax.custom_vjp
  def op(x):
    return fn(x)

  op.defvjp(lambda x: (fn(x), None), lambda _, g: (g,))
  return op(x)


def topk_sparsify(x: jax.Array, k: int, *, axis: int = -1, rescale: bool = False,
                  impl: str = "auto") -> jax.Array:
  """Q-Sparse top-k sparsification with a straight-through (identity) gradient.

  Keeps, for every row along `axis`, the k entries of largest |x| and sets the rest to
  +0.0; ties keep the lowest index (like `lax.top_k`). NaN ranks above +inf (kept
  first), -0.0 counts as magnitude 0 — see the module docstring.

  Args:
    x: floating-point array (an integer x raises TypeError).
    k: static int in [1, x.shape[axis]] (0 when that axis is empty).
    axis: the axis to sparsify along (default: last).
    rescale: multiply each row by ‖x‖₂/‖y‖₂ (rows with ‖y‖₂ = 0 are left unscaled).
    impl: "auto" | "xla" | "pallas" | "interpret" (see `sparsejax.ops.dispatch`; on a
      multi-device mesh the kernel runs per shard, see the module docstring).

  Returns:
    y with x's shape and dtype. Gradient: ∂L/∂x = ∂L/∂y.
  """
  x = jnp.asarray(x)
  _check_float(x, "topk_sparsify")
  axis = _axis(x, axis)
  k = _check_k(k, x.shape[axis])
  unmet = None
  if impl != "xla":
    from pallas_kernels.topk import kernel_unmet  # lazy: kernels are optional
    unmet = kernel_unmet(x.shape[axis], x.dtype, kernel_platform())
  impl = resolve_impl(impl, op="topk_sparsify", unmet=unmet)

  def fn(x):
    xm = jnp.moveaxis(x, axis, -1)
    return jnp.moveaxis(_sparsify_last(xm, k, rescale, impl), -1, axis)

  return _ste(fn, x)


def nm_sparsify(x: jax.Array, n: int, m: int, *, axis: int = -1) -> jax.Array:
  """Block Q-Sparse / N:M: keep the n largest-|x| of every m consecutive entries.

  Same ordering, tie and NaN rules as `topk_sparsify`; the axis size must be a multiple
  of m and 1 ≤ n ≤ m. Gradient: straight-through identity.
  """
  x = jnp.asarray(x)
  _check_float(x, "nm_sparsify")
  axis = _axis(x, axis)
  n, m = _check_nm(n, m, x.shape[axis])

  def fn(x):
    return jnp.where(nm_mask(x, n, m, axis=axis), x, jnp.zeros_like(x))

  return _ste(fn, x)


__all__ = ["topk_sparsify", "nm_sparsify", "topk_mask", "nm_mask"]
