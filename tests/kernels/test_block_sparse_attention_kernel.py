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
  info = M.mask_info(mask, t, s, bq, bkv)
  return (info.kv_blocks, info.kv_counts, info.block_kind, info.partial_masks,
          info.partial_index, info.q_blocks, info.q_counts)


def kernel_attention(q, k, v, mask, *, bq, bkv, backend, interpret=None, **kernel_kw):
  """The kernel on [B, T, H, D] inputs (the op's layout), default scale 1/√D."""
  hm = lambda x: jnp.swapaxes(x, 1, 2)
  out = block_sparse_attention_kernel(
      hm(q), hm(k), hm(v), *tables(mask, q.shape[1], k.shape[1], bq, bkv),
      scale=q.shape[-1] ** -0.5, block_q=bq, block_kv=bkv, backend=backend,
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
  kw = dict(scale=0.25, block_q=16, block_kv=16, interpret=True)
  with pytest.raises(ValueError, match="backend='cpu'"):
    block_sparse_attention_kernel(q, k, v, *tabs, backend="cpu", **kw)
  with pytest.raises(ValueError, match="power of two >= 16"):
    block_sparse_attention_kernel(q, k, v, *tables(M.CausalMask(), 32, 32, 8, 8),
                                  backend="gpu", **dict(kw, block_q=8, block_kv=8))
  with pytest.raises(ValueError, match="block_kind has shape"):
    block_sparse_attention_kernel(q, k, v, *tables(M.CausalMask(), 32, 32, 8, 16),
                                  backend="tpu", **kw)
  with pytest.raises(ValueError, match="mask tables have 3 heads"):
    block_sparse_attention_kernel(
        q, k, v, *tables(M.MultiHeadMask((M.CausalMask(),) * 3), 32, 32, 16, 16),
        backend="tpu", **kw)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    block_sparse_attention_kernel(q.astype(jnp.float16), k, v, *tabs, backend="tpu", **kw)


def _custom_call_targets(lowered):
  return set(re.findall(r"custom_call @([^\s(]+)\(", lowered.as_text()))


def _lowered(backend, dtype, mask, t=256, hq=4, hkv=2, d=128, blk=128):
  tabs = tables(mask, t, t, blk, blk)

  @jax.jit
  def f(q, k, v, d_out):
    fn = lambda q, k, v: block_sparse_attention_kernel(
        q, k, v, *tabs, scale=d ** -0.5, block_q=blk, block_kv=blk, backend=backend)
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
  assert "num_warps = 4" in text
  for name in ("fwd", "dq", "dkv"):
    assert f"block_sparse_attention_{name}_gpu" in text


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


@pytest.mark.parametrize("t", [32768, 131072])
@pytest.mark.parametrize("per_head", [False, True])
def test_tpu_footprint_fits_long_context(t, per_head):
  """Causal mask, 128-blocks (M = nq kv blocks per q block), Hq 64, Hkv 8, D 128 bf16:
  unsplit tables take 768 KiB (shared mask) at 32k and 48 MiB (per-head) at 128k;
  per call they stay within the SMEM budget and VMEM within v5e's 16 MiB."""
  from pallas_kernels._common import SMEM_TABLE_BYTES
  from pallas_kernels.block_sparse_attention import tpu_footprint
  nq = t // 128
  hm = 64 if per_head else 1
  assert 12 * hm * nq * nq >= 768 * 1024
  fp = tpu_footprint(hq=64, hkv=8, hm=hm, nq=nq, nkv=nq, m=nq, mt=nq, block_q=128,
                     block_kv=128, d=128, dv=128, itemsize=2)
  assert max(fp["smem_fwd"], fp["smem_dkv"]) <= SMEM_TABLE_BYTES
  assert max(fp["vmem_fwd"], fp["vmem_dq"], fp["vmem_dkv"]) <= 16 * 2 ** 20
