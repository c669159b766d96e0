"""Tests of pallas_kernels.block_sparse_attention: interpret mode vs the dense reference
(forward and dq, dk, dv), fully masked rows, splash attention as a peer, lowering.

The TPU (Mosaic) kernels run with `interpret=pltpu.InterpretParams()` (~20-50 ms per
grid step on CPU, so cases are few and tiny: the per-head case puts local, strided,
global|local and document masks on four query heads of one GQA call), the GPU (Triton)
kernels with `interpret=True`.
Lowering tests lower forward + backward for ("tpu",) and ("cuda",) on CPU.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.block_sparse_attention import block_sparse_attention_kernel
from sparsejax.ops import masks as M
from sparsejax.ops.sparse_attention import (block_sparse_attention,
                                                  reference_attention)  # tests only


def interpret_for(backend):
  return pltpu.InterpretParams() if backend == "tpu" else True


def tables(mask, t, s, bq, bkv):
  return M.mask_info(mask, t, s, bq, bkv).kernel_tables()


def kernel_attention(q, k, v, mask, *, bq, bkv, backend, interpret=None, **kernel_kw):
  """The kernel on [B, T, H, D] inputs (the op's layout), default scale 1/√D."""
  hm = lambda x: jnp.swapaxes(x, 1, 2)
  out = block_sparse_attention_kernel(
      hm(q), hm(k), hm(v), tables(mask, q.shape[1], k.shape[1], bq, bkv),
      scale=q.shape[-1] ** -0.5, backend=backend,
      interpret=interpret_for(backend) if interpret is None else interpret, **kernel_kw)
  return hm(out)


def inputs(seed, b, t, s, hq, hkv, d, dv, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  return f(b, t, hq, d), f(b, s, hkv, d), f(b, s, hkv, dv), f(b, t, hq, dv)


def run_both(q, k, v, cot, mask, **kw):
  """((out, dq, dk, dv) of the kernel, same of the reference), in one jit."""
  @jax.jit
  def both(q, k, v, cot):
    res = []
    for fn in (lambda *a: kernel_attention(*a, mask, **kw),
               lambda *a: reference_attention(*a, mask)):
      out, vjp = jax.vjp(fn, q, k, v)
      res.append((out,) + vjp(cot))
    return res
  return both(q, k, v, cot)


def assert_close(x, y, tol=2e-5):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  assert x.shape == y.shape and np.all(np.isfinite(x))
  scale = max(1.0, float(np.abs(y).max()))
  np.testing.assert_allclose(x, y, atol=tol * scale, rtol=tol)


DOC = M.DocumentMask((0,) * 13 + (1,) * 27 + (2,) * 24)
# Four mask types on four query heads, G = 2 (each head is compared on its own).
PER_HEAD = M.MultiHeadMask((M.LocalMask(20, 4), M.StridedMask(16, 3),
                            M.LocalMask(5) | M.GlobalMask(3), DOC))
# name -> (mask, T, S, Hq, Hkv) with 16-blocks. Together the cases cover causal,
# local (bidirectional), strided, global|local and document masks on both backends:
# shared-mask tables (Hm = 1) in "causal*"/"document", per-head tables in "per_head_gqa".
GPU_CASES = {
    "causal": (M.CausalMask(), 64, 64, 2, 1),
    "document": (DOC & M.CausalMask(), 64, 64, 2, 2),
    "per_head_gqa": (PER_HEAD, 64, 64, 4, 2),
}
TPU_CASES = {
    "causal_rect_gqa": (M.CausalMask(16), 32, 48, 2, 1),
    "per_head_gqa": (PER_HEAD, 64, 64, 4, 2),
}
CASES = [("gpu", n) for n in GPU_CASES] + [("tpu", n) for n in TPU_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("backend,name", CASES, ids=[f"{b}-{n}" for b, n in CASES])
def test_matches_reference(backend, name, rng_seed):
  mask, t, s, hq, hkv = (GPU_CASES if backend == "gpu" else TPU_CASES)[name]
  q, k, v, cot = inputs(rng_seed, 1, t, s, hq, hkv, 16, 32)
  got, want = run_both(q, k, v, cot, mask, bq=16, bkv=16, backend=backend)
  for x, y in zip(got, want):
    assert_close(x, y)
  info = M.mask_info(mask, t, s, 16, 16)
  if name != "causal_rect_gqa":
    assert (info.block_kind == M.EMPTY).any()      # the case really skips blocks


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_fully_masked_rows_give_zero(backend, rng_seed):
  """Rows 0..19 see no key: q block 0 visits no block at all, q block 1 has rows
  16..19 masked inside a partial block. Output and dq are exactly 0 there."""
  mask = M.CausalMask(-20)
  q, k, v, cot = inputs(rng_seed, 1, 32, 32, 2, 1, 16, 16)
  got, want = run_both(q, k, v, cot, mask, bq=16, bkv=16, backend=backend)
  out, dq = np.asarray(got[0]), np.asarray(got[1])
  assert (out[:, :20] == 0).all() and (dq[:, :20] == 0).all()
  assert np.abs(out[:, 20:]).min() > 0
  for x, y in zip(got, want):
    assert_close(x, y)


def test_gpu_bf16_forward(rng_seed):
  q, k, v, _ = inputs(rng_seed, 1, 32, 32, 2, 1, 16, 16, jnp.bfloat16)
  mask = M.CausalMask() & M.LocalMask(12)
  f = jax.jit(lambda q, k, v: (kernel_attention(q, k, v, mask, bq=16, bkv=16,
                                                backend="gpu"),
                               reference_attention(q, k, v, mask)))
  out, ref = f(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert_close(out.astype(jnp.float32), ref.astype(jnp.float32), tol=2e-2)


@pytest.mark.slow
def test_matches_splash_attention(rng_seed):
  """JAX's splash attention (TPU kernel, interpret mode) as a peer on causal and local
  masks, forward; splash needs 128-multiples for its blocks, so T = S = 256."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  t, h, d = 256, 2, 32
  q, k, v, _ = inputs(rng_seed, 1, t, t, h, h, d, d)
  ours = M.MultiHeadMask((M.CausalMask(), M.LocalMask(40)))
  theirs = splash.MultiHeadMask([splash.CausalMask((t, t)),
                                 splash.LocalMask((t, t), window_size=(40, 0), offset=0)])
  kernel = splash.make_splash_mha_single_device(
      theirs, block_sizes=splash.BlockSizes(block_q=128, block_kv=128,
                                            block_kv_compute=128),
      interpret=True)

  @jax.jit
  def both(q, k, v):
    peer = kernel(q[0].swapaxes(0, 1) * d ** -0.5, k[0].swapaxes(0, 1),
                  v[0].swapaxes(0, 1))
    return kernel_attention(q, k, v, ours, bq=128, bkv=128, backend="tpu"), peer

  out, peer = both(q, k, v)
  assert_close(out[0].swapaxes(0, 1), peer, tol=1e-4)


def test_op_interpret_dispatch_gpu(rng_seed, monkeypatch):
  """sparsejax.ops.sparse_attention(impl="interpret") runs the GPU kernel when the
  default backend is a GPU, and equals impl="xla" with grads (the TPU-kernel dispatch is
  tested in tests/ops/test_block_sparse_attention.py)."""
  import sparsejax.ops.sparse_attention as bsa_ops
  monkeypatch.setattr(bsa_ops.jax, "default_backend", lambda: "gpu")
  q, k, v, cot = inputs(rng_seed, 1, 32, 32, 2, 1, 16, 16)
  mask = M.CausalMask() & M.LocalMask(10)

  @functools.partial(jax.jit, static_argnums=0)
  def run(impl):
    f = lambda *a: block_sparse_attention(*a, mask, block_q=16, block_kv=16, impl=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(cot)

  for x, y in zip(run("interpret"), run("xla")):
    assert_close(x, y)


def test_errors():
  q, k, v = jnp.ones((1, 2, 32, 16)), jnp.ones((1, 1, 32, 16)), jnp.ones((1, 1, 32, 16))
  tabs = tables(M.CausalMask(), 32, 32, 16, 16)
  kw = dict(scale=0.25, interpret=True)
  with pytest.raises(ValueError, match="backend='cpu'"):
    block_sparse_attention_kernel(q, k, v, tabs, backend="cpu", **kw)
  with pytest.raises(ValueError, match="block_q=8 must be a power of two >= 16"):
    block_sparse_attention_kernel(q, k, v, tables(M.CausalMask(), 32, 32, 8, 8),
                                  backend="gpu", **kw)
  with pytest.raises(ValueError, match=r"block_kind has shape \(1, 4, 4\), expected "
                     r"\(1, 2, 2\) for T=32, S=32, block_q=16"):
    block_sparse_attention_kernel(q, k, v, tables(M.CausalMask(), 64, 64, 16, 16)._replace(
        partial_masks=tabs.partial_masks), backend="tpu", **kw)
  with pytest.raises(ValueError, match="block_kv=24 .* must be >= 1 and divide the "
                     "sequence length 32"):
    block_sparse_attention_kernel(q, k, v, tables(M.CausalMask(), 48, 48, 16, 24),
                                  backend="tpu", **kw)
  with pytest.raises(ValueError, match="mask tables have 3 heads"):
    block_sparse_attention_kernel(
        q, k, v, tables(M.MultiHeadMask((M.CausalMask(),) * 3), 32, 32, 16, 16),
        backend="tpu", **kw)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    block_sparse_attention_kernel(q.astype(jnp.float16), k, v, tabs, backend="tpu", **kw)
  with pytest.raises(TypeError, match="tables must be a BlockTables"):
    block_sparse_attention_kernel(q, k, v, tuple(tabs)[:6], backend="tpu", **kw)


def _custom_call_targets(lowered):
  return set(re.findall(r"custom_call @([^\s(]+)\(", lowered.as_text()))


def _lowered(backend, dtype, mask, t=256, hq=4, hkv=2, d=128, blk=128, **kernel_kw):
  tabs = tables(mask, t, t, blk, blk)

  @jax.jit
  def f(q, k, v, d_out):
    fn = lambda q, k, v: block_sparse_attention_kernel(
        q, k, v, tabs, scale=d ** -0.5, backend=backend, **kernel_kw)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(d_out)

  sd = jax.ShapeDtypeStruct
  args = (sd((1, hq, t, d), dtype), sd((1, hkv, t, d), dtype), sd((1, hkv, t, d), dtype),
          sd((1, hq, t, d), dtype))
  platform = "tpu" if backend == "tpu" else "cuda"
  return f.trace(*args).lower(lowering_platforms=(platform,))


LOWERING_MASKS = {
    "shared": M.CausalMask() & M.LocalMask(100),
    "per_head": M.MultiHeadMask((M.CausalMask(), M.LocalMask(50), M.StridedMask(64, 8),
                                 M.DocumentMask((0,) * 100 + (1,) * 156) & M.CausalMask())),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask_name", list(LOWERING_MASKS))
def test_tpu_lowering(dtype, mask_name):
  lowered = _lowered("tpu", dtype, LOWERING_MASKS[mask_name])
  assert "tpu_custom_call" in _custom_call_targets(lowered)
  text = lowered.as_text()
  for name in ("fwd", "dq", "dkv"):
    assert f"block_sparse_attention_{name}_tpu" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask_name", list(LOWERING_MASKS))
def test_gpu_lowering(dtype, mask_name):
  assert pltriton.CompilerParams(num_warps=4).num_warps == 4
  lowered = _lowered("gpu", dtype, LOWERING_MASKS[mask_name], blk=64)
  assert "__gpu$xla.gpu.triton" in _custom_call_targets(lowered)
  text = lowered.as_text()
  assert "num_warps = 4" in text and "num_stages = 2" in text    # pipelined by default
  for name in ("fwd", "dq", "dkv"):
    assert f"block_sparse_attention_{name}_gpu" in text


@pytest.mark.slow
def test_tpu_tables_split_into_chunks(rng_seed):
  """A tiny SMEM budget splits the TPU calls over GQA head groups and table rows
  (2 × 4 chunks here, inside lax.map); forward and grads equal the reference."""
  from pallas_kernels.block_sparse_attention import tpu_chunks
  m = M.mask_info(PER_HEAD, 64, 64, 16, 16).kv_blocks.shape[2]
  assert tpu_chunks(4, 2, 4, 4, m, 12 * 2 * m) == (2, 1)
  q, k, v, cot = inputs(rng_seed, 1, 64, 64, 4, 2, 16, 16)
  got, want = run_both(q, k, v, cot, PER_HEAD, bq=16, bkv=16, backend="tpu",
                       smem_table_bytes=12 * 2 * m)
  for x, y in zip(got, want):
    assert_close(x, y)


@pytest.mark.parametrize("block", [128, None])
@pytest.mark.parametrize("t", [32768, 131072])
@pytest.mark.parametrize("per_head", [False, True])
def test_tpu_footprint_fits_long_context(t, per_head, block):
  """Causal mask (M = nq kv blocks per q block), Hq 64, Hkv 8, D 128 bf16, at 128-blocks
  and at the default (512) blocks: unsplit tables take 768 KiB (shared mask, 128-blocks)
  at 32k and 48 MiB (per-head) at 128k; per call they stay within the SMEM budget and
  VMEM within the default blocks' budget (below v5e's 16 MiB scoped VMEM)."""
  from pallas_kernels._common import SMEM_TABLE_BYTES
  from pallas_kernels.block_sparse_attention import default_blocks, tpu_footprint
  from pallas_kernels.block_sparse_attention.sizing import TPU_VMEM_BUDGET
  block = block or default_blocks("tpu", t, t, 128, jnp.bfloat16)[0]
  nq = t // block
  hm = 64 if per_head else 1
  assert 12 * hm * nq * nq >= (48 * 1024 if block == 512 else 768 * 1024)
  fp = tpu_footprint(hq=64, hkv=8, hm=hm, nq=nq, nkv=nq, m=nq, mt=nq, block_q=block,
                     block_kv=block, d=128, dv=128, itemsize=2)
  assert max(fp["smem_fwd"], fp["smem_dkv"]) <= SMEM_TABLE_BYTES
  assert max(fp["vmem_fwd"], fp["vmem_dq"], fp["vmem_dkv"]) <= TPU_VMEM_BUDGET


@pytest.mark.parametrize("backend,t,s,d,dtype,want", [
    ("tpu", 32768, 32768, 128, jnp.bfloat16, (512, 512)),
    ("tpu", 1536, 640, 128, jnp.float32, (512, 128)),      # 128-multiples dividing T, S
    ("tpu", 300, 1000, 64, jnp.float32, (300, 200)),       # whole T; 8-row multiple of S
    ("tpu", 4096, 4096, 256, jnp.float32, (256, 256)),     # 512 would exceed the budget
    ("tpu", 4096, 4096, 512, jnp.float32, (256, 256)),
    ("gpu", 32768, 32768, 128, jnp.bfloat16, (128, 64)),
    ("gpu", 48, 96, 64, jnp.float32, (16, 32)),            # largest powers of two
    ("gpu", 4096, 4096, 256, jnp.bfloat16, (64, 32)),      # shared memory at D 256
    ("xla", 1000, 300, 64, jnp.float32, (125, 100)),       # the op's XLA path: <= 128
])
def test_default_blocks(backend, t, s, d, dtype, want):
  from pallas_kernels.block_sparse_attention import default_blocks, tpu_vmem
  from pallas_kernels.block_sparse_attention.sizing import TPU_VMEM_BUDGET
  bq, bkv = default_blocks(backend, t, s, d, dtype)
  assert (bq, bkv) == want and t % bq == 0 and s % bkv == 0
  if backend == "tpu":
    assert max(tpu_vmem(bq, bkv, d, d, jnp.dtype(dtype).itemsize).values()) \
        <= TPU_VMEM_BUDGET
  with pytest.raises(ValueError, match="backend='cuda'"):
    default_blocks("cuda", t, s, d, dtype)


def test_grid_steps_causal_8k():
  """Causal T = S = 8k, B 1, Hq 8, Hkv 2: the TPU kernels take 16× fewer grid steps at
  the default 512-blocks than at 128 (64× fewer than at the layer's former 64); every
  CSR slot is a step (M = nq for causal). GPU loop iterations halve from 64 × 64 to the
  default 128 × 64. (The ratios hold at any multiple of 512; 32k costs ~10 s of NumPy
  mask info.)"""
  from pallas_kernels.block_sparse_attention import default_blocks, grid_steps
  t, hq, hkv = 8192, 8, 2
  steps = {}
  for backend in ("tpu", "gpu"):
    bq, bkv = default_blocks(backend, t, t, 128, jnp.bfloat16)
    steps[backend] = grid_steps(tables(M.CausalMask(), t, t, bq, bkv), backend=backend,
                                batch=1, hq=hq, hkv=hkv)
  per_head = (t // 512) ** 2                                        # nq · M at 512
  assert steps["tpu"] == dict(fwd=hq * per_head, dq=hq * per_head, dkv=hq * per_head)
  before = {blk: hq * (t // blk) ** 2 for blk in (64, 128)}         # causal: M = nq
  assert before[128] // steps["tpu"]["fwd"] == 16 and before[64] // steps["tpu"]["fwd"] == 64
  gpu_64x64 = hq * sum(i + 1 for i in range(t // 64))               # Σ visited blocks
  gpu_128x64 = hq * sum(2 * (i + 1) for i in range(t // 128))
  assert steps["gpu"]["fwd"] == steps["gpu"]["dkv"] == gpu_128x64
  assert 1.98 < gpu_64x64 / gpu_128x64 < 2.0                      # about half


def test_gpu_launch_and_precision_knobs(rng_seed):
  """num_warps / num_stages reach the Triton call; precision reaches the f32 matmuls
  of all three kernels (DEFAULT = TF32 on GPU) and not the bf16 ones; interpret mode
  with the knobs still matches the reference."""
  mask = M.CausalMask() & M.LocalMask(100)
  text = _lowered("gpu", jnp.float32, mask, blk=64, num_warps=8, num_stages=3).as_text()
  assert text.count("num_warps = 8") == 3 and text.count("num_stages = 3") == 3
  tabs = tables(mask, 64, 64, 16, 16)
  for dtype in (jnp.float32, jnp.bfloat16):
    q, k, v, cot = inputs(rng_seed, 1, 64, 64, 2, 1, 16, 16, dtype)
    fn = lambda q, k, v: block_sparse_attention_kernel(
        q, k, v, tabs, scale=0.25, backend="gpu", interpret=True,
        precision=jax.lax.Precision.DEFAULT)
    jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1](cot.swapaxes(1, 2)))(
        *(x.swapaxes(1, 2) for x in (q, k, v))))
    dots = jaxpr.count("dot_general[")                   # fwd 2 + dq 3 + dk/dv 4
    fast = jaxpr.count("precision=(Precision.DEFAULT, Precision.DEFAULT)")
    assert dots == 9 and fast == (9 if dtype == jnp.float32 else 0)
    assert "HIGHEST" not in jaxpr
  q, k, v, cot = inputs(rng_seed, 1, 64, 64, 2, 1, 16, 16)
  got, want = run_both(q, k, v, cot, mask, bq=16, bkv=16, backend="gpu", num_stages=3,
                       num_warps=8, precision=jax.lax.Precision.DEFAULT)
  for x, y in zip(got, want):
    assert_close(x, y)


@pytest.mark.slow
def test_tpu_forward_lse_rows(rng_seed):
  """bsa_fwd_tpu's LSE (kept as lane-dense (1, bq) rows) equals the dense masked
  log-sum-exp, and +0.7·f32max on rows with no allowed key (rows 0..19)."""
  from pallas_kernels._common import EMPTY_LSE
  from pallas_kernels.block_sparse_attention import bsa_fwd_tpu
  from pallas_kernels.block_sparse_attention.tables import slot_tables
  mask, t, hq, d = M.CausalMask(-20) | M.GlobalMask(3) & M.CausalMask(-28), 64, 2, 16
  q, k, v, _ = inputs(rng_seed, 1, t, t, hq, 1, d, d)
  tabs = tables(mask, t, t, 16, 16)
  kind, tile = slot_tables(*(jnp.asarray(x, jnp.int32) for x in (
      tabs.kv_blocks, tabs.kv_counts, tabs.block_kind, tabs.partial_index)))
  hm = lambda x: jnp.swapaxes(x, 1, 2)
  _, lse = bsa_fwd_tpu(hm(q), hm(k), hm(v), jnp.asarray(tabs.kv_blocks), None, kind, tile,
                       jnp.asarray(tabs.partial_masks, jnp.int32), scale=d ** -0.5,
                       block_q=16, block_kv=16, interpret=pltpu.InterpretParams())
  assert lse.shape == (1, hq, t) and lse.dtype == jnp.float32
  dense = mask.dense(t, t)
  logits = np.einsum("bthd,bshd->bhts", np.float64(q), np.float64(k)) * d ** -0.5
  empty = ~dense.any(-1)
  want = np.log(np.sum(np.exp(logits), axis=-1, where=dense[None, None]) + empty)
  assert empty[:20].all() and not empty[20:].any()
  assert (np.asarray(lse)[:, :, empty] == np.float32(EMPTY_LSE)).all()
  np.testing.assert_allclose(np.asarray(lse)[:, :, ~empty], want[:, :, ~empty],
                             rtol=1e-5, atol=1e-5)



# name -> (mask, T, (block_q, block_kv), dtype, f32 precision): the real Mosaic compiler
# (libtpu AOT) on what the op's own compile tests (tests/kernels/test_tpu_compile.py:
# shared causal / local masks at default blocks) do not reach: per-head tables with
# stored partial tiles at 512-blocks, a whole-sequence block that is no multiple of 128
# (lane-dense LSE rows), a 64-row block and the fast f32 precision.
TPU_COMPILE = {
    "per_head_512_bf16": (M.MultiHeadMask((
        M.CausalMask(), M.LocalMask(700), M.StridedMask(640, 100),
        M.DocumentMask((0,) * 900 + (1,) * 1148) & M.CausalMask())), 2048, (512, 512),
        jnp.bfloat16, None),
    "whole_sequence_48": (M.CausalMask() & M.LocalMask(20), 48, (48, 48), jnp.float32,
                          None),
    "blocks_64x128_f32_default": (M.LocalMask(300), 1024, (64, 128), jnp.float32,
                                  jax.lax.Precision.DEFAULT),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TPU_COMPILE))
def test_tpu_compiles_forward_and_backward(name):
  """Forward and grads (dq and dk/dv kernels) compile for v5e, GQA 4 / 2 heads."""
  import tpu_aot
  from jax.sharding import PartitionSpec as P
  mask, t, (bq, bkv), dtype, prec = TPU_COMPILE[name]
  tabs = tables(mask, t, t, bq, bkv)
  kw = {} if prec is None else dict(precision=prec)
  mesh = tpu_aot.tpu_mesh("v5e:2x2")

  def loss(q, k, v):
    out = block_sparse_attention_kernel(q, k, v, tabs, scale=0.1, backend="tpu", **kw)
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  fn = jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh, in_specs=P(),
                     out_specs=P(), check_vma=False)
  sd = jax.ShapeDtypeStruct
  compiled = tpu_aot.compile_for_tpu(fn, sd((1, 4, t, 128), dtype),
                                     sd((1, 2, t, 128), dtype), sd((1, 2, t, 128), dtype),
                                     mesh=mesh)
  assert compiled.hlo.count('custom_call_target="tpu_custom_call"') == 3
