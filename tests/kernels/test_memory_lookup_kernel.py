"""Tests of pallas_kernels.memory_lookup: interpret mode vs the XLA reference, lowering.

The TPU (Mosaic) kernels run with `interpret=pltpu.InterpretParams()`, the GPU (Triton)
kernels with `interpret=True`. Shapes stay tiny: TPU interpret mode simulates every
row DMA. Lowering tests lower forward and backward for ("tpu",) and ("cuda",) on a
CPU-only jaxlib, which rejects unsupported primitives.
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

from pallas_kernels.memory_lookup import kernel_unmet, memory_lookup_kernel
from pallas_kernels.memory_lookup.gpu import (lookup_dvalues_gpu, lookup_dweights_gpu,
                                              lookup_fwd_gpu)
from pallas_kernels.memory_lookup.tpu import (CHUNK, META_WINDOW, ROW_TILE, VMEM_BUDGET,
                                              token_tile, vmem_bytes)
from sparsejax.ops.memory import (lookup_backward_reference, lookup_reference,
                                  memory_lookup)   # the XLA reference (tests only)

BACKENDS = ["tpu", "gpu"]


def interpret_for(backend, **kw):
  return pltpu.InterpretParams(**kw) if backend == "tpu" else True


@pytest.fixture
def key(request):
  """A fresh PRNG key for every test and parametrization."""
  return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


def make_inputs(key, n, v, l, k, g, vdtype, wdtype, kind="normal"):
  kv, ki, kw, kg, kd, kh = jax.random.split(key, 6)
  values = jax.random.normal(kv, (n, v), jnp.float32).astype(vdtype)
  indices = jax.random.randint(ki, (l, k), 0, n, jnp.int32)
  if kind == "dups":        # every token repeats rows: few distinct rows per token
    base = jax.random.randint(kh, (l, 1), 0, n - 2, jnp.int32)
    indices = base + jax.random.randint(ki, (l, k), 0, 3, jnp.int32)
  elif kind == "hot":       # ~3/4 of all lookups hit one row (several d_values chunks)
    hot = jax.random.bernoulli(kh, 0.75, (l, k))
    indices = jnp.where(hot, 7, indices)
  weights = jax.random.normal(kw, (l, k), jnp.float32).astype(wdtype)
  groups = jax.random.randint(kg, (l, k), 0, g, jnp.int32)
  out_dtype = jnp.result_type(vdtype, wdtype)
  d_out = jax.random.normal(kd, (l, g, v), jnp.float32).astype(out_dtype)
  return values, indices, weights, groups, d_out


def tol(dtype):
  return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5,
                                                                        atol=1e-5)


def assert_close(x, y):
  assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
  np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                             **tol(x.dtype))


# (name, N, v, L, K, G, values dtype, weights dtype, kind): G=1 and G>1, f32 and bf16,
# L not a multiple of the token tile (8), v not a multiple of 128 (48, 96), duplicate
# rows within a token, a hot row with more lookups than a d_values chunk (64).
CASES = [
    ("f32_g1", 40, 96, 13, 5, 1, jnp.float32, jnp.float32, "normal"),
    ("bf16_g3_dups", 24, 48, 10, 6, 3, jnp.bfloat16, jnp.bfloat16, "dups"),
    ("f32_g2_hot_row", 64, 128, 24, 8, 2, jnp.float32, jnp.bfloat16, "hot"),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,n,v,l,k,g,vdtype,wdtype,kind", CASES,
                         ids=[c[0] for c in CASES])
def test_matches_xla_reference(key, backend, name, n, v, l, k, g, vdtype, wdtype, kind):
  values, indices, weights, groups, d_out = make_inputs(key, n, v, l, k, g, vdtype,
                                                        wdtype, kind)
  if kind == "hot":
    assert int(jnp.sum(indices == 7)) > CHUNK
  interp = interpret_for(backend)

  @jax.jit
  def run(values, weights, d_out):
    f = lambda vals, w: memory_lookup_kernel(vals, indices, w, groups, g,
                                             interpret=interp, backend=backend)
    out, vjp = jax.vjp(f, values, weights)
    return (out,) + vjp(d_out)

  out, d_values, d_weights = run(values, weights, d_out)
  assert_close(out, lookup_reference(values, indices, weights, groups, g))
  ref_dv, ref_dw = lookup_backward_reference(values, indices, weights, groups, d_out)
  assert_close(d_values, ref_dv)
  assert_close(d_weights, ref_dw)
  # Rows nobody looked up get exactly zero gradient.
  untouched = np.setdiff1d(np.arange(n), np.asarray(indices))
  assert np.all(np.asarray(d_values, np.float32)[untouched] == 0.0)


def _run_fwd_bwd(values, indices, weights, groups, g, d_out, backend):
  @jax.jit
  def run(values, weights, d_out):
    f = lambda vals, w: memory_lookup_kernel(vals, indices, w, groups, g,
                                             interpret=interpret_for(backend),
                                             backend=backend)
    out, vjp = jax.vjp(f, values, weights)
    return (out,) + vjp(d_out)
  return run(values, weights, d_out)


def numpy_lookup(values, indices, weights, groups, g, d_out):
  """Independent float64 loops over the valid lookups only: (out, dV, dw)."""
  values, d_out = np.asarray(values, np.float64), np.asarray(d_out, np.float64)
  weights = np.asarray(weights, np.float64)
  indices, groups = np.asarray(indices), np.asarray(groups)
  n, v = values.shape
  out, dv, dw = (np.zeros((len(indices), g, v)), np.zeros_like(values),
                 np.zeros(weights.shape))
  for l, k in np.ndindex(*indices.shape):
    r, grp = indices[l, k], groups[l, k]
    if 0 <= r < n and 0 <= grp < g:
      out[l, grp] += weights[l, k] * values[r]
      dv[r] += weights[l, k] * d_out[l, grp]
      dw[l, k] = d_out[l, grp] @ values[r]
  return out, dv, dw


def assert_close_to(x, want):
  np.testing.assert_allclose(np.asarray(x, np.float32), want.astype(np.float32),
                             **tol(x.dtype))


# (name, N, v, L, K, G, dtype): bf16 with L·G odd (the d_values row pairs of dY need
# a padding row), more lookups than a metadata window.
INVALID_CASES = [
    ("f32", 40, 64, 11, 6, 2, jnp.float32),
    ("bf16_odd_dy_rows", 24, 32, 7, 5, 1, jnp.bfloat16),
    ("f32_many", 48, 32, 9, 32, 3, jnp.float32),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,n,v,l,k,g,dtype", INVALID_CASES,
                         ids=[c[0] for c in INVALID_CASES])
def test_invalid_lookups_contribute_exactly_zero(key, backend, name, n, v, l, k, g,
                                                 dtype):
  """Negative and past-the-end indices and out-of-range groups: the output and grads
  of the valid lookups only (float64 loops); exactly 0 d_weights for the invalid ones,
  and the rows they name get nothing."""
  values, indices, weights, groups, d_out = make_inputs(key, n, v, l, k, g, dtype, dtype)
  if l * k > META_WINDOW:
    indices = jnp.where(jnp.arange(k) < k // 2, 5, indices)   # > CHUNK on one row
  ki, kg = jax.random.split(jax.random.fold_in(key, 1))
  bad = jax.random.choice(ki, jnp.array([-1, -7, n, n + 2, 2**31 - 1]), (l, k))
  indices = jnp.where(jax.random.bernoulli(ki, 0.3, (l, k)), bad, indices)
  groups = jnp.where(jax.random.bernoulli(kg, 0.15, (l, k)),
                     jax.random.choice(kg, jnp.array([-1, g, g + 3]), (l, k)), groups)
  invalid = np.asarray((indices < 0) | (indices >= n) | (groups < 0) | (groups >= g))
  assert 0 < invalid.sum() < invalid.size
  out, d_values, d_weights = _run_fwd_bwd(values, indices, weights, groups, g, d_out,
                                          backend)
  want_out, want_dv, want_dw = numpy_lookup(values, indices, weights, groups, g, d_out)
  assert_close_to(out, want_out)
  assert_close_to(d_values, want_dv)
  assert_close_to(d_weights, want_dw)
  assert np.all(np.asarray(d_weights)[invalid] == 0)
  # Row 0 and row N-1 (where clamping would send them) get only their valid lookups.
  for row in (0, n - 1):
    assert_close_to(d_values[row], want_dv[row])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("l,k,n", [(0, 4, 16), (5, 0, 16), (3, 2, 0)],
                         ids=["no_tokens", "k0", "empty_table"])
def test_empty_shapes_give_zeros_and_zero_grads(backend, l, k, n):
  values = jnp.ones((n, 8), jnp.float32) * 3
  indices = jnp.zeros((l, k), jnp.int32)
  weights, groups = jnp.ones((l, k), jnp.float32), jnp.zeros((l, k), jnp.int32)
  f = lambda vals, w: jnp.sum(memory_lookup_kernel(vals, indices, w, groups, 2,
                                                   interpret=interpret_for(backend),
                                                   backend=backend) ** 2)
  out = memory_lookup_kernel(values, indices, weights, groups, 2, backend=backend,
                             interpret=interpret_for(backend))
  assert out.shape == (l, 2, 8) and out.dtype == jnp.float32 and not np.any(out)
  d_values, d_weights = jax.grad(f, (0, 1))(values, weights)
  assert d_values.shape == (n, 8) and not np.any(d_values)
  assert d_weights.shape == (l, k)


@pytest.fixture
def small_tiles(monkeypatch):
  """TPU token tiles of 8 tokens (several grid steps per core at tiny L)."""
  from pallas_kernels.memory_lookup import tpu
  monkeypatch.setattr(tpu, "LOOKUPS_PER_STEP", 8)
  assert tpu.token_tile(4) == 8
  return tpu


@pytest.mark.slow
def test_tpu_calls_split_for_smem(key, small_tiles, monkeypatch):
  """Scalar-prefetch tables over the SMEM budget split the call: the forward and
  d_weights over token chunks (8 tokens each here), d_values over touched row tiles
  (1 per call here)."""
  tpu = small_tiles
  values, indices, weights, groups, d_out = make_inputs(key, 64, 32, 19, 4, 2,
                                                        jnp.float32, jnp.float32)
  monkeypatch.setattr(tpu, "SMEM_TABLE_BYTES", 4 * 4 * 8)
  monkeypatch.setattr(tpu, "DVALUES_SLOTS", 1)
  assert len(tpu._token_chunks(19, 4, 8)) == 3
  out, d_values, d_weights = _run_fwd_bwd(values, indices, weights, groups, 2, d_out,
                                          "tpu")
  want_out, want_dv, want_dw = numpy_lookup(values, indices, weights, groups, 2, d_out)
  assert_close_to(out, want_out)
  assert_close_to(d_values, want_dv)
  assert_close_to(d_weights, want_dw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_pipeline_on_two_cores(key, small_tiles, monkeypatch, dtype):
  """Two simulated TensorCores (the "parallel" axis split), race detection and NaN-
  filled uninitialized VMEM: the forward / d_weights cross-step row prefetch over
  5 token tiles (2 cores × 3 steps, one padding tile) and d_values over the touched
  tiles only (3 of 10 touched, 10 slots: padding slots on both cores, 2 calls)."""
  tpu = small_tiles
  monkeypatch.setattr(tpu, "DVALUES_SLOTS", 6)
  n, l, k, g = 320, 37, 4, 2
  values, indices, weights, groups, d_out = make_inputs(key, n, 32, l, k, g, dtype,
                                                        dtype)
  tiles = jnp.array([1, 4, 9]) * ROW_TILE
  indices = tiles[indices % 3] + indices % ROW_TILE          # rows of 3 tiles only
  indices = indices.at[0, 0].set(-1)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                 uninitialized_memory="nan")
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

  @jax.jit
  def run(values, weights, d_out):
    f = lambda vals, w: memory_lookup_kernel(vals, indices, w, groups, g,
                                             interpret=params, backend="tpu")
    out, vjp = jax.vjp(f, values, weights)
    return (out,) + vjp(d_out)

  out, d_values, d_weights = run(values, weights, d_out)
  want_out, want_dv, want_dw = numpy_lookup(values, indices, weights, groups, g, d_out)
  assert_close_to(out, want_out)
  assert_close_to(d_values, want_dv)
  assert_close_to(d_weights, want_dw)
  assert ipc.races is not None and not ipc.races.races_found
  untouched = np.setdiff1d(np.arange(n), np.asarray(indices))
  assert np.all(np.asarray(d_values, np.float32)[untouched] == 0.0)


def test_touched_tiles_lists_nonempty_tiles():
  """touched_tiles against a numpy loop: the non-empty row tiles in order with their
  CSR ranges, then repeats of the last one."""
  from pallas_kernels.memory_lookup.csr import touched_tiles
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 3, 40) * (rng.random(40) < 0.3)          # per row
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  tiles, starts, ends, num = touched_tiles(jnp.asarray(offsets), 10, 4, 12)
  want = [t for t in range(10) if counts[4 * t:4 * t + 4].sum()]
  assert 0 < len(want) < 10 and int(num) == len(want)
  want_all = want + [want[-1]] * (12 - len(want))
  np.testing.assert_array_equal(tiles, want_all)
  np.testing.assert_array_equal(starts, offsets[4 * np.array(want_all)])
  np.testing.assert_array_equal(ends, offsets[4 * np.array(want_all) + 4])
  tiles, starts, ends, num = touched_tiles(jnp.zeros(41, jnp.int32), 10, 4, 3)
  assert int(num) == 0 and not np.any(tiles) and not np.any(ends)


def test_launch_counts_at_realistic_shape():
  """The before → after counts in the tpu.py / gpu.py docstrings, from the kernels'
  own tilings, at T·H = L = 8192, K = 32, v = 256, N = 262144, G = 1, f32."""
  from pallas_kernels.memory_lookup import gpu, tpu
  l, k, v, n = 8192, 32, 256, 262144
  tl = tpu.token_tile(k)
  steps = 0
  for s, e in tpu._token_chunks(l, k, tl):
    cores, per_core = tpu._core_split(-(-(e - s) // tl))
    assert cores == 2
    steps += cores * per_core
  # TPU forward / d_weights: 1024 steps of 8 tokens with one wait per row DMA before;
  # 512 steps of 16 tokens, one wait per step, L·K = 262144 row DMAs either way.
  assert (tl, steps, steps * tl * k) == (16, 512, l * k)
  # TPU d_values: a step per touched row tile (≤ min(N/R, L·K)), all N/R = 8192 before.
  assert min(n // ROW_TILE, l * k) == 8192 and min(n // ROW_TILE, 64 * k) == 2048
  # GPU: KB = 32 rows gathered per load (1 before), one loop step per token.
  bv = gpu.block_v(v)
  assert bv == 256 and gpu.block_k(k, bv, gpu.FWD_ELEMENTS) == 32
  assert gpu.block_k(k, bv, gpu.DW_ELEMENTS) == 32


def test_constraints_and_vmem_footprint():
  """kernel_unmet: dtypes (both), odd bf16 tables and VMEM over budget (TPU)."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert kernel_unmet((64, 128), f32, bf16, 32, 4, "tpu") is None
  assert kernel_unmet((64, 128), bf16, f32, 32, 4, "gpu") is None
  assert "float16" in kernel_unmet((64, 128), jnp.float16, f32, 8, 1, "gpu")
  assert "weights dtype float16" in kernel_unmet((64, 128), f32, jnp.float16, 8, 1,
                                                 "tpu")
  assert "odd number of rows N=63" in kernel_unmet((63, 128), bf16, f32, 8, 1, "tpu")
  assert kernel_unmet((63, 128), bf16, f32, 8, 1, "gpu") is None
  # The released UltraMem layer (K = 2 heads · 80 · 2 cores, v = 384/2) fits; a PKM
  # with 4 heads · 32 rows of 4096 columns does not.
  assert vmem_bytes(192, 320, 8) < VMEM_BUDGET
  assert kernel_unmet((64, 192), bf16, f32, 320, 8, "tpu") is None
  assert vmem_bytes(4096, 128, 1) > VMEM_BUDGET
  assert "VMEM footprint" in kernel_unmet((64, 4096), f32, f32, 128, 1, "tpu")
  # The footprint grows about linearly in K·v (plus the [TL·G, TL·K] one-hots).
  assert vmem_bytes(256, 64, 2) > 1.8 * vmem_bytes(128, 64, 2)
  with pytest.raises(ValueError, match="even number of rows"):
    memory_lookup_kernel(jnp.ones((5, 8), bf16), jnp.zeros((2, 2), jnp.int32),
                         jnp.ones((2, 2), bf16), jnp.zeros((2, 2), jnp.int32), 1,
                         backend="tpu", interpret=True)


def test_tpu_forward_no_races(key, small_tiles):
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  values, indices, weights, groups, _ = make_inputs(key, 20, 64, 3 * 8 + 3, 4,
                                                    2, jnp.float32, jnp.float32)
  out = memory_lookup_kernel(values, indices, weights, groups, 2, backend="tpu",
                             interpret=pltpu.InterpretParams(detect_races=True))
  assert_close(out, lookup_reference(values, indices, weights, groups, 2))
  assert ipc.races is not None and not ipc.races.races_found


def test_gpu_column_chunks_and_lookup_blocks(key, monkeypatch):
  """Several Triton column chunks with a partial last one (v=48, BV=32) and several
  gathered lookup blocks with a partial last one (K=5, KB=2; a row's d_values lookups
  in several blocks)."""
  from pallas_kernels.memory_lookup import gpu
  monkeypatch.setattr(gpu, "MAX_BLOCK_K", 2)
  values, indices, weights, groups, d_out = make_inputs(key, 12, 48, 5, 5, 3,
                                                        jnp.float32, jnp.float32, "dups")
  assert gpu.block_k(5, 32, gpu.FWD_ELEMENTS) == 2
  assert np.bincount(np.asarray(indices).ravel()).max() > 2

  @jax.jit
  def run(values, indices, weights, groups, d_out):
    kw = dict(interpret=True, block=32)
    return (lookup_fwd_gpu(values, indices, weights, groups, 3, **kw),
            lookup_dvalues_gpu(values, indices, weights, groups, d_out, **kw),
            lookup_dweights_gpu(values, indices, groups, d_out, **kw))

  out, d_values, d_weights = run(values, indices, weights, groups, d_out)
  assert_close(out, lookup_reference(values, indices, weights, groups, 3))
  ref_dv, ref_dw = lookup_backward_reference(values, indices, weights, groups, d_out)
  assert_close(d_values, ref_dv)
  assert_close(d_weights, ref_dw)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_memory_lookup_dispatch(key, backend, monkeypatch):
  """sparsejax.ops.memory.memory_lookup(impl="interpret") == impl="xla" on [B, T, K]
  (bf16 values with f32 weights)."""
  import sparsejax.ops.memory as memory_ops
  monkeypatch.setattr(memory_ops.jax, "default_backend",
                      lambda: "gpu" if backend == "gpu" else "cpu")
  kv, ki, kw, kg, kd = jax.random.split(key, 5)
  b, t, k, g, n, v = 2, 5, 4, 3, 30, 64
  values = jax.random.normal(kv, (n, v), jnp.float32).astype(jnp.bfloat16)
  indices = jax.random.randint(ki, (b, t, k), 0, n)
  weights = jax.random.normal(kw, (b, t, k), jnp.float32)
  groups = jax.random.randint(kg, (b, t, k), 0, g)
  d_out = jax.random.normal(kd, (b, t, g, v), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(impl):
    f = lambda vals, w: memory_lookup(vals, indices, w, groups=groups, num_groups=g,
                                      impl=impl)
    out, vjp = jax.vjp(f, values, weights)
    return (out,) + vjp(d_out)

  for got, want in zip(run("interpret"), run("xla")):
    assert_close(got, want)


def test_errors():
  v, i, w, g = jnp.ones((8, 16)), jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2)), \
      jnp.zeros((4, 2), jnp.int32)
  with pytest.raises(ValueError, match="must be 2-D"):
    memory_lookup_kernel(jnp.ones(8), i, w, g, 1, interpret=True)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    memory_lookup_kernel(v.astype(jnp.float16), i, w, g, 1, interpret=True)
  with pytest.raises(ValueError, match="must have the shape of indices"):
    memory_lookup_kernel(v, i, jnp.ones((4, 3)), g, 1, interpret=True)
  with pytest.raises(ValueError, match="num_groups=0"):
    memory_lookup_kernel(v, i, w, g, 0, interpret=True)
  with pytest.raises(ValueError, match="static int"):
    memory_lookup_kernel(v, i, w, g, 1.5, interpret=True)
  with pytest.raises(ValueError, match="indices must be integers"):
    memory_lookup_kernel(v, w, w, g, 1, interpret=True)
  with pytest.raises(ValueError, match="backend='cpu'"):
    memory_lookup_kernel(v, i, w, g, 1, backend="cpu")


def _custom_call_targets(lowered):
  return set(re.findall(r"custom_call @([^\s(]+)\(", lowered.as_text()))


def _fwd_bwd(backend, num_groups):
  def f(values, indices, weights, groups, d_out):
    fn = lambda vals, w: memory_lookup_kernel(vals, indices, w, groups, num_groups,
                                              backend=backend)
    out, vjp = jax.vjp(fn, values, weights)
    return (out,) + vjp(d_out)
  return jax.jit(f)


def _lowering_args(dtype, n=300, v=256, l=40, k=8, g=4):
  s = jax.ShapeDtypeStruct
  return (s((n, v), dtype), s((l, k), jnp.int32), s((l, k), dtype), s((l, k), jnp.int32),
          s((l, g, v), dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_lowering(dtype):
  lowered = _fwd_bwd("tpu", 4).trace(*_lowering_args(dtype)).lower(
      lowering_platforms=("tpu",))
  assert "tpu_custom_call" in _custom_call_targets(lowered)
  text = lowered.as_text()
  for name in ("fwd", "dvalues", "dweights"):
    assert f"memory_lookup_{name}_tpu" in text
  assert ROW_TILE % 16 == 0 and token_tile(8) % 8 == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_lowering(dtype):
  assert pltriton.CompilerParams(num_warps=4).num_warps == 4
  lowered = _fwd_bwd("gpu", 4).trace(*_lowering_args(dtype, v=1000)).lower(
      lowering_platforms=("cuda",))
  assert "__gpu$xla.gpu.triton" in _custom_call_targets(lowered)
  text = lowered.as_text()
  assert "num_warps = 4" in text
  for name in ("fwd", "dvalues", "dweights"):
    assert f"memory_lookup_{name}_gpu" in text


# (N, v, L, K, G): v off the 128-lane grid, odd L·G (bf16 d_values pads dY by a row),
# several token tiles and metadata windows; the released UltraMem layer's K = 320,
# G = 8, v = 192 (the largest VMEM footprint `kernel_unmet` accepts). The lane-aligned
# v = 256, K = 32, G = 1 tables (several 16-token tiles) are compiled through the op in
# tests/kernels/test_tpu_compile.py (memory_lookup: bf16 on v5e and v6e, f32 on v5e).
AOT_SHAPES = [(600, 96, 37, 12, 3), (1024, 192, 16, 320, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", AOT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tpu_kernels_compile_for_v5e(dtype, shape):
  """The real Mosaic compiler (libtpu AOT, one v5e chip): forward, d_values and
  d_weights in f32 and bf16 — tile alignment of the row (pair) and metadata DMAs."""
  from sparsejax import sharding
  from tpu_aot import compile_for_tpu, tpu_devices
  n, v, l, k, g = shape
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), tpu_devices("v5e:2x2")[:1])
  args = (jax.ShapeDtypeStruct((n, v), dtype),) + _lowering_args(dtype, n, v, l, k, g)[1:]
  compiled = compile_for_tpu(_fwd_bwd("tpu", g), *args, mesh=mesh)
  for name in ("fwd", "dvalues", "dweights"):
    assert f"memory_lookup_{name}_tpu" in compiled.hlo
