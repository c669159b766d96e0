"""Helpers shared by the kernel packages: mask values, matmuls, interpret/compile params.

Kernels import these instead of each other's private names, so one kernel package
can change without breaking another.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("tpu", "gpu")
NUM_LANES = 128              # TPU vreg lanes: per-row f32 statistics are stored this wide
# Scalar-prefetch budget per pallas_call: TPU SMEM is ~1 MiB per core (v4/v5e/v5p/v6e)
# and Mosaic keeps its own scalars there too, so kernels split their tables (grid
# chunks, one call per chunk inside `map_chunks`) to stay below a quarter of it.
SMEM_TABLE_BYTES = 256 * 1024
# Finite "minus infinity" for masked scores: exp(MASK_VALUE - m) underflows to 0 without
# the inf - inf = NaN of a fully masked row (as sparsejax.ops.sparse_attention's).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
EMPTY_LSE = -MASK_VALUE      # log-sum-exp of a row with no allowed key: exp(s - lse) = 0
HIGHEST = lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))   # contract the last axes: a · bᵀ
_TN = (((0,), (0,)), ((), ()))   # contract the first axes: aᵀ · b


def default_backend() -> str:
  """"gpu" (Triton kernels) on a GPU mesh/backend, else "tpu" (Mosaic; interpreted on
  CPU). The mesh in context (`jax.set_mesh`, e.g. over AOT TPU devices) wins."""
  mesh = jax.sharding.get_abstract_mesh()
  name = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  return "gpu" if name in ("gpu", "cuda", "rocm") else "tpu"


def interpret_params(interpret):
  """`interpret=` for a TPU pallas_call: True -> `pltpu.InterpretParams()`, else as is."""
  return pltpu.InterpretParams() if interpret is True else interpret


def triton_params(num_warps: int, num_stages: int = 1) -> pltriton.CompilerParams:
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def precision(a: jax.Array, b: jax.Array, f32=HIGHEST):
  """`f32` (default HIGHEST: full-precision f32 matmul) for float32 operands, None (the
  MXU's / tensor cores' native pass) when either is narrower: Mosaic rejects HIGHEST on
  bfloat16 ("Bad lhs type"). f32=lax.Precision.DEFAULT asks for the fast f32 pass (TF32
  on Triton, one bf16 pass on the MXU)."""
  return f32 if min(a.dtype.itemsize, b.dtype.itemsize) >= 4 else None


def dot(a: jax.Array, b: jax.Array, f32_precision=HIGHEST) -> jax.Array:
  """a @ b with float32 accumulation (`f32_precision` for f32 operands)."""
  return jnp.dot(a, b, precision=precision(a, b, f32_precision),
                 preferred_element_type=jnp.float32)


def dot_nt(a: jax.Array, b: jax.Array, f32_precision=HIGHEST) -> jax.Array:
  """a @ bᵀ with float32 accumulation (`f32_precision` for f32 operands), no explicit
  transpose."""
  return lax.dot_general(a, b, _NT, precision=precision(a, b, f32_precision),
                         preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array, f32_precision=HIGHEST) -> jax.Array:
  """aᵀ @ b with float32 accumulation (`f32_precision` for f32 operands), no explicit
  transpose (as Pallas TPU flash attention's `trans_a` backward matmuls)."""
  return lax.dot_general(a, b, _TN, precision=precision(a, b, f32_precision),
                         preferred_element_type=jnp.float32)


def largest_divisor(n: int, limit: int) -> int:
  """The largest divisor of n that is <= max(1, limit)."""
  return max(d for d in range(1, min(n, max(1, limit)) + 1) if n % d == 0)


def map_chunks(fn, num_chunks: int):
  """fn(i) for i < num_chunks stacked on a new leading axis (pytree): `lax.map`, so
  the program holds one kernel launched num_chunks times; fn(0) directly (with the
  leading axis added) when num_chunks == 1."""
  if num_chunks == 1:
    return jax.tree.map(lambda x: x[None], fn(jnp.int32(0)))
  return lax.map(fn, jnp.arange(num_chunks, dtype=jnp.int32))


def take(x: jax.Array, axis: int, index, size: int) -> jax.Array:
  """x[..., index·size : (index + 1)·size, ...] along `axis` (index may be traced)."""
  return lax.dynamic_slice_in_dim(x, index * size, size, axis)


def match_vma(*xs):
  """xs, each marked varying (`lax.pcast`) over every mesh axis any of them varies over
  inside a `jax.shard_map`: a custom_vjp's cotangents must have its inputs' types, so
  an input replicated over the axes its partners vary over (a table shared by sharded
  tokens) is marked varying before it, and its pcast's transpose sums the gradient."""
  varying = frozenset().union(*(jax.typeof(x).mat.varying for x in xs))
  return tuple(x if varying <= jax.typeof(x).mat.varying else
               lax.pcast(x, tuple(sorted(varying - jax.typeof(x).mat.varying)),
                         to="varying") for x in xs)


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
  """A pallas_call `out_shape` that varies over every mesh axis any of `operands` does:
  inside a `jax.shard_map` with check_vma=True a kernel output must state it (outside
  one the set is empty and ignored)."""
  varying = frozenset().union(*(jax.typeof(x).mat.varying for x in operands))
  return jax.ShapeDtypeStruct(shape, dtype,
                              manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
