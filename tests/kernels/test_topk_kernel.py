"""Tests of pallas_kernels.topk: interpret mode vs the XLA reference, and lowering.

The TPU (Mosaic) kernel runs with `interpret=pltpu.InterpretParams()`, the GPU (Triton)
kernel with `interpret=True`. Lowering tests lower both kernels for ("tpu",) and
("cuda",) on a CPU-only jaxlib, which rejects unsupported primitives; with libtpu
(tests/tpu_aot.py) the TPU kernel is compiled by Mosaic for v5e / v6e.
"""

import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.topk import (apply_threshold, kernel_unmet, threshold_keys,
                                 topk_sparsify_kernel)
from pallas_kernels.topk.gpu import MAX_BLOCK, topk_sparsify_gpu
from pallas_kernels.topk.tpu import VMEM_BUDGET, topk_sparsify_tpu, vmem_bytes
from sparsejax.ops.topk import topk_mask   # the XLA reference (tests only)

BACKENDS = ["tpu", "gpu"]


def interpret_for(backend):
  return pltpu.InterpretParams() if backend == "tpu" else True


@pytest.fixture
def key(request):
  """A fresh PRNG key for every test and parametrization."""
  return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


def assert_bits_equal(a, b):
  """Exact equality that tells -0.0 from +0.0 (NaN equals NaN, any payload)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  nan = np.isnan(a.astype(np.float32))
  np.testing.assert_array_equal(nan, np.isnan(b.astype(np.float32)))
  u = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
  np.testing.assert_array_equal(a.view(u)[~nan], b.view(u)[~nan])


def make_input(key, kind, shape, dtype):
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, shape, jnp.float32)
  if kind == "ties":                                       # values from a tiny set
    vals = jnp.array([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0])
    x = vals[jax.random.randint(k2, shape, 0, vals.shape[0])]
  elif kind == "special":                                  # NaN, ±inf, ±0 sprinkled in
    specials = jnp.array([jnp.nan, -jnp.nan, jnp.inf, -jnp.inf, 0.0, -0.0])
    pick = jax.random.randint(k2, shape, -12, specials.shape[0])
    x = jnp.where(pick >= 0, specials[jnp.maximum(pick, 0)], x)
  return x.astype(dtype)


# (name, dtype, rows, D, k, kind): rows not a multiple of the row tile, D not a
# multiple of 128, k=1, k=D, heavy ties (bf16/f16), NaN/inf/-0.0.
CASES = [
    ("f32", jnp.float32, 5, 200, 17, "normal"),
    ("bf16_ties_2tiles", jnp.bfloat16, 20, 130, 40, "ties"),
    ("f32_k1", jnp.float32, 3, 128, 1, "normal"),
    ("bf16_k_eq_d", jnp.bfloat16, 3, 77, 77, "normal"),
    ("f32_nan_inf_negzero", jnp.float32, 4, 24, 5, "special"),
    ("f16_ties", jnp.float16, 3, 50, 9, "ties"),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,dtype,rows,d,k,kind", CASES, ids=[c[0] for c in CASES])
def test_matches_xla_reference(key, backend, name, dtype, rows, d, k, kind):
  x = make_input(key, kind, (rows, d), dtype)
  kernel = topk_sparsify_tpu if backend == "tpu" else topk_sparsify_gpu
  y, t, c = jax.jit(functools.partial(kernel, k=k, interpret=interpret_for(backend),
                                      return_threshold=True))(x)
  mask = np.asarray(topk_mask(x, k))
  assert_bits_equal(y, np.where(mask, np.asarray(x), np.zeros((), x.dtype)))
  np.testing.assert_array_equal(mask.sum(-1), k)
  # The per-row threshold rebuilds the same mask; t is the k-th largest key.
  np.testing.assert_array_equal(np.asarray(apply_threshold(x, t, c)), mask)
  keys = np.asarray(threshold_keys(x))
  np.testing.assert_array_equal(np.asarray(t), -np.sort(-keys, axis=-1)[:, k - 1])
  if kind == "special":
    nan = np.isnan(np.asarray(x, np.float32))
    assert np.all(mask[nan.sum(-1) <= k] >= nan[nan.sum(-1) <= k])   # NaNs kept first
  if name == "f32":  # distinct values: the tie pass is skipped (c stays D-1) even
    np.testing.assert_array_equal(np.asarray(c), d - 1)  # with zero-padded rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_ste_backward_is_identity(key, backend):
  kx, kg = jax.random.split(key)
  x = jax.random.normal(kx, (3, 40)).astype(jnp.bfloat16)
  g = jax.random.normal(kg, x.shape).astype(jnp.bfloat16)
  interp = interpret_for(backend)

  @jax.jit
  def run(x, g):
    f = lambda x: topk_sparsify_kernel(x, 6, interpret=interp, backend=backend)
    y, vjp = jax.vjp(f, x)
    f_thr = lambda x: topk_sparsify_kernel(x, 6, interpret=interp, backend=backend,
                                           return_threshold=True)[0]
    dx_thr = jax.grad(lambda x: jnp.sum(f_thr(x).astype(jnp.float32) * g))(x)
    return y, vjp(g)[0], dx_thr

  y, dx, dx_thr = run(x, g)
  mask = np.asarray(topk_mask(x, 6))
  assert_bits_equal(y, np.where(mask, np.asarray(x), np.zeros((), x.dtype)))
  assert_bits_equal(dx, g)
  assert_bits_equal(dx_thr, g)


def test_errors():
  x = jnp.ones((4, 512))
  with pytest.raises(ValueError, match=r"k=0 must be in \[1, 512\] for axis of size 512"):
    topk_sparsify_kernel(x, 0, interpret=True)
  with pytest.raises(ValueError, match=r"k=600 must be in \[1, 512\]"):
    topk_sparsify_kernel(x, 600, interpret=True)
  with pytest.raises(ValueError, match="static Python int"):
    topk_sparsify_kernel(x, 1.5, interpret=True)
  with pytest.raises(ValueError, match="got int32"):
    topk_sparsify_kernel(x.astype(jnp.int32), 3, interpret=True)
  with pytest.raises(ValueError, match="must be 2-D"):
    topk_sparsify_kernel(jnp.ones(8), 3, interpret=True)
  with pytest.raises(ValueError, match="backend='cpu'"):
    topk_sparsify_kernel(x, 3, backend="cpu")


def _custom_call_targets(lowered):
  return set(re.findall(r"custom_call @([^\s(]+)\(", lowered.as_text()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_lowering(dtype):
  f = jax.jit(functools.partial(topk_sparsify_kernel, k=9, backend="tpu",
                                return_threshold=True))
  lowered = f.trace(jax.ShapeDtypeStruct((20, 300), dtype)).lower(
      lowering_platforms=("tpu",))
  assert "tpu_custom_call" in _custom_call_targets(lowered)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_lowering(dtype):
  assert pltriton.CompilerParams(num_warps=4).num_warps == 4
  f = jax.jit(functools.partial(topk_sparsify_kernel, k=9, backend="gpu", num_warps=4,
                                return_threshold=True))
  lowered = f.trace(jax.ShapeDtypeStruct((20, 300), dtype)).lower(
      lowering_platforms=("cuda",))
  assert "__gpu$xla.gpu.triton" in _custom_call_targets(lowered)
  assert "num_warps = 4" in lowered.as_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
  x = jnp.zeros((0, 24), jnp.float32)
  y, t, c = topk_sparsify_kernel(x, 5, interpret=interpret_for(backend), backend=backend,
                                 return_threshold=True)
  assert y.shape == (0, 24) and t.shape == c.shape == (0,)
  g = jax.grad(lambda x: jnp.sum(topk_sparsify_kernel(
      x, 5, interpret=interpret_for(backend), backend=backend)))(x)
  assert g.shape == (0, 24)


def test_kernel_unmet_names_the_constraint():
  assert kernel_unmet(4096, jnp.bfloat16, "tpu") is None
  assert kernel_unmet(4096, jnp.float32, "gpu") is None
  assert "float64" in kernel_unmet(64, jnp.float64, "tpu")
  assert "int8" in kernel_unmet(64, jnp.int8, "gpu")
  # TPU: the modelled VMEM of one row tile against the v5e scoped limit.
  d_max = {dt: max(d for d in range(128, 1 << 18, 128) if vmem_bytes(d, dt) <= VMEM_BUDGET)
           for dt in (jnp.float32, jnp.bfloat16)}
  assert d_max[jnp.float32] == 74880 and d_max[jnp.bfloat16] == 52352
  assert kernel_unmet(d_max[jnp.float32], jnp.float32, "tpu") is None
  assert "VMEM" in kernel_unmet(d_max[jnp.float32] + 128, jnp.float32, "tpu")
  assert "one-block limit" in kernel_unmet(MAX_BLOCK + 1, jnp.float32, "gpu")
  assert kernel_unmet(MAX_BLOCK, jnp.float32, "gpu") is None


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_compiles_sharded_forward_and_backward(topology, dtype):
  """libtpu AOT: the op with impl="pallas" on a 4-chip mesh (rows split over data, the
  kernel inside shard_map) compiles with Mosaic, forward and STE backward, at a small
  row length and at the longest the VMEM model admits (a too-optimistic model fails
  here with a scoped-VMEM error)."""
  import tpu_aot  # tpu_mesh skips (with its reason) only when libtpu is missing
  from jax.sharding import NamedSharding, PartitionSpec as P
  from sparsejax.ops.topk import topk_sparsify
  mesh = tpu_aot.tpu_mesh(topology, {"data": 4})
  d_max = max(d for d in range(128, 1 << 18, 128) if vmem_bytes(d, dtype) <= VMEM_BUDGET)
  for d in (300, d_max):
    x = jax.ShapeDtypeStruct((64, d), dtype, sharding=NamedSharding(mesh, P("data")))
    fn = jax.value_and_grad(lambda x: jnp.sum(
        topk_sparsify(x, d // 3, impl="pallas").astype(jnp.float32)))
    compiled = tpu_aot.compile_for_tpu(fn, x, mesh=mesh)
    assert "tpu_custom_call" in compiled.hlo
