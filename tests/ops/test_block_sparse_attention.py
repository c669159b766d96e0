"""block_sparse_attention: the "xla" block-gather path equals the dense masked reference
forward and in its grads w.r.t. q, k, v for every mask type (per-head masks, GQA, block
shapes 8/16, stored-tile masks), skips empty blocks, gives exactly 0 and zero grads for
fully masked rows, matches `jax.nn.dot_product_attention(is_causal=True)` as an
independent peer, dispatches (auto -> xla on CPU; "interpret" runs the Pallas kernel
and matches the reference; "pallas" on CPU is a clear error) and rejects bad shapes
and scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.ops import sparse_attention as bsa_lib
from sparsejax.ops import masks as M
from sparsejax.ops import dispatch
from sparsejax.ops.sparse_attention import block_sparse_attention, reference_attention


def inputs(seed, b, t, s, hq, hkv, d, dv):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return f(b, t, hq, d), f(b, s, hkv, d), f(b, s, hkv, dv), f(b, t, hq, dv)


def run_both(q, k, v, cot, mask, **kw):
  """(out, (dq, dk, dv)) of impl="xla" and of the reference, in one jit."""
  @jax.jit
  def both(q, k, v, cot):
    res = []
    for fn in (lambda *a: block_sparse_attention(*a, mask, impl="xla", **kw),
               lambda *a: reference_attention(*a, mask, scale=kw.get("scale"))):
      out, vjp = jax.vjp(fn, q, k, v)
      res.append((out, vjp(cot)))
    return res
  return both(q, k, v, cot)


def assert_close(x, y, tol=2e-5):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  assert np.all(np.isfinite(x))
  scale = max(1.0, float(np.abs(y).max()))
  np.testing.assert_allclose(x, y, atol=tol * scale, rtol=tol)


T, S = 32, 48
CASES = {
    "causal": (M.CausalMask(), dict(t=32, s=32)),
    "causal_offset_rect": (M.CausalMask(16), {}),
    "causal_local": (M.CausalMask() & M.LocalMask(9), dict(t=48, s=48)),
    "local_bidirectional": (M.LocalMask(5, 11), {}),
    "chunked": (M.ChunkedCausalMask(12), dict(t=48, s=48)),
    "strided": (M.StridedMask(7, 3), dict(t=48, s=48)),
    "local_or_global": (M.LocalMask(6) | M.GlobalMask(3), {}),
    "document": (M.DocumentMask((0,) * 13 + (1,) * 20 + (2,) * 15), {}),
    "document_causal": (M.DocumentMask((0,) * 9 + (1,) * 30 + (2,) * 9) & M.CausalMask(),
                        dict(t=48, s=48)),
    "per_head_gqa": (M.MultiHeadMask((M.CausalMask(), M.LocalMask(4), M.StridedMask(5, 2),
                                      M.ChunkedCausalMask(8))), dict(hq=4, hkv=2)),
    "per_head_stored": (M.MultiHeadMask((M.CausalMask(), M.DocumentMask((0,) * 20 + (1,) * 28),
                                         M.LocalMask(3) | M.GlobalMask(2),
                                         M.CausalMask(-10))), dict(hq=4, hkv=1, bq=16)),
    "gqa_mqa_causal_local": (M.CausalMask() & M.LocalMask(14), dict(t=48, s=48, hq=6,
                                                                    hkv=1, bkv=16)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_xla_matches_reference(name, rng_seed):
  mask, kw = CASES[name]
  t, s, hq, hkv = kw.get("t", T), kw.get("s", S), kw.get("hq", 4), kw.get("hkv", 2)
  bq, bkv = kw.get("bq", 8), kw.get("bkv", 8)
  q, k, v, cot = inputs(rng_seed, 2, t, s, hq, hkv, 8, 4)
  (out, grads), (ref, ref_grads) = run_both(q, k, v, cot, mask, block_q=bq, block_kv=bkv)
  assert out.shape == (2, t, hq, 4) and out.dtype == jnp.float32
  assert_close(out, ref)
  for g, rg in zip(grads, ref_grads):
    assert_close(g, rg)


def test_skips_empty_blocks():
  """The XLA path gathers only the union of non-empty kv blocks per q block."""
  mask = M.CausalMask() & M.LocalMask(8)
  tables = bsa_lib._gather_tables(mask, 64, 64, 8, 8, 2)
  info = M.mask_info(mask, 64, 64, 8, 8)
  assert tables["idx"].shape == (1, 8, 2)                  # 2 of 8 kv blocks per q block
  np.testing.assert_array_equal(tables["idx"], info.kv_blocks)
  per_head = M.MultiHeadMask((M.LocalMask(3), M.CausalMask() & M.LocalMask(12)))
  tables = bsa_lib._gather_tables(per_head, 64, 64, 8, 8, 1)
  assert tables["idx"].shape == (1, 8, 3)                  # union over the group's heads
  assert tables["kind"].shape == (1, 2, 8, 3)
  assert (tables["kind"][0, 0, 2:, 0] == 0).all()          # block i-2 is empty for head 0


def test_fully_masked_rows_give_zero(rng_seed):
  mask = M.CausalMask(-8) | M.MultiHeadMask((M.GlobalMask(1) & M.CausalMask(-12),
                                               M.LocalMask(2, 2)))
  q, k, v, cot = inputs(rng_seed, 1, 16, 16, 2, 1, 8, 8)
  (out, grads), (ref, ref_grads) = run_both(q, k, v, cot, mask, block_q=8, block_kv=8)
  assert (np.asarray(out)[:, :8, 0] == 0).all() and (np.asarray(ref)[:, :8, 0] == 0).all()
  assert (np.asarray(grads[0])[:, :8, 0] == 0).all()       # dq of empty rows
  assert np.abs(np.asarray(out)[:, :, 1]).min() > 0
  assert_close(out, ref)
  for g, rg in zip(grads, ref_grads):
    assert_close(g, rg)


def test_causal_matches_jax_dot_product_attention(rng_seed):
  q, k, v, _ = inputs(rng_seed, 2, 32, 32, 4, 2, 8, 8)
  f = jax.jit(lambda q, k, v: (
      block_sparse_attention(q, k, v, M.CausalMask(), block_q=8, block_kv=16, impl="xla"),
      jax.nn.dot_product_attention(q, k, v, is_causal=True)))
  out, peer = f(q, k, v)
  assert_close(out, peer)


def test_scale_and_dtype(rng_seed):
  q, k, v, _ = inputs(rng_seed, 1, 16, 16, 2, 2, 8, 8)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  f = jax.jit(lambda q, k, v: [
      block_sparse_attention(q, k, v, M.CausalMask(), scale=0.3, block_q=8, block_kv=8),
      reference_attention(q, k, v, M.CausalMask(), scale=0.3)])
  out, ref = f(q16, k16, v16)
  assert out.dtype == jnp.bfloat16
  assert_close(out.astype(jnp.float32), ref.astype(jnp.float32), tol=1e-2)
  peer = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3)
  assert_close(f(q, k, v)[0], peer)


def test_kernel_impls(rng_seed):
  """impl="interpret" runs the Pallas TPU kernel in interpret mode and equals the
  reference (forward and grads); impl="pallas" on a CPU backend is a clear error."""
  q, k, v, cot = inputs(rng_seed, 1, 32, 32, 2, 1, 16, 16)
  mask = M.CausalMask() & M.LocalMask(12)

  @jax.jit
  def both(q, k, v, cot):
    res = []
    for fn in (lambda *a: block_sparse_attention(*a, mask, block_q=16, block_kv=16,
                                                 impl="interpret"),
               lambda *a: reference_attention(*a, mask)):
      out, vjp = jax.vjp(fn, q, k, v)
      res.append((out,) + vjp(cot))
    return res

  got, want = both(q, k, v, cot)
  for x, y in zip(got, want):
    assert_close(x, y)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
      block_sparse_attention(q, k, v, mask, block_q=16, block_kv=16, impl="pallas")


@pytest.mark.parametrize("shapes, kw, match", [
    (((1, 16, 3, 8), (1, 16, 2, 8), (1, 16, 2, 8)), {}, "Hq=3 must be a multiple of kv heads"),
    (((1, 16, 2, 8), (1, 16, 2, 4), (1, 16, 2, 8)), {}, "k head dim 4 must equal q head dim 8"),
    (((1, 16, 2, 8), (1, 16, 2, 8), (1, 12, 2, 8)), {}, "v shape"),
    (((1, 20, 2, 8), (1, 16, 2, 8), (1, 16, 2, 8)), dict(block_q=8), "T=20 must be a multiple"),
    (((1, 16, 2, 8), (1, 24, 2, 8), (1, 24, 2, 8)), dict(block_kv=16), "S=24 must be a "
     "multiple of block_kv=16"),
    (((1, 16, 2, 8), (1, 16, 2, 8), (1, 16, 2, 8)), dict(scale=0.0), "scale=0.0 must be"),
    (((1, 16, 2, 8), (1, 16, 2, 8), (1, 16, 2, 8)), dict(scale=-1.0), "scale=-1.0 must be"),
    (((1, 16, 2), (1, 16, 2, 8), (1, 16, 2, 8)), {}, "must be 4-D"),
    (((1, 16, 2, 8), (1, 16, 2, 8), (1, 16, 2, 8)), dict(mask=M.MultiHeadMask(
        (M.CausalMask(),) * 3)), "MultiHeadMask has 3 heads"),
    (((1, 16, 2, 8), (1, 16, 2, 8), (1, 16, 2, 8)), dict(mask="causal"), "mask must be"),
    (((1, 16, 2, 8), (1, 16, 2, 8), (1, 16, 2, 8)), dict(impl="cuda"), "impl='cuda'"),
])
def test_errors(shapes, kw, match):
  q, k, v = (jnp.ones(s, jnp.float32) for s in shapes)
  kw = dict(kw)
  mask = kw.pop("mask", M.CausalMask())
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, mask, block_q=kw.pop("block_q", 8),
                           block_kv=kw.pop("block_kv", 8), **kw)


def test_empty_sequences_give_empty_or_zero_output(rng_seed):
  """T = 0 gives [B, 0, Hq, Dv]; S = 0 (no key) gives zeros, with zero grads."""
  q, k, v, _ = inputs(rng_seed, 2, 8, 8, 4, 2, 8, 4)
  out = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, M.CausalMask()))(
      q[:, :0], k, v)
  assert out.shape == (2, 0, 4, 4) and out.dtype == q.dtype
  f = lambda q: block_sparse_attention(q, k[:, :0], v[:, :0], M.CausalMask(),
                                       block_q=8).sum()
  assert float(jnp.abs(jax.grad(f)(q)).max()) == 0.0
  assert (np.asarray(block_sparse_attention(q, k[:, :0], v[:, :0], M.LocalMask(3)))
          == 0).all()


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_integer_inputs_are_refused(name):
  args = dict(q=jnp.ones((1, 8, 2, 8)), k=jnp.ones((1, 8, 2, 8)), v=jnp.ones((1, 8, 2, 8)))
  args[name] = args[name].astype(jnp.int32)
  with pytest.raises(TypeError, match=rf"^{name} has dtype int32"):
    block_sparse_attention(args["q"], args["k"], args["v"], M.CausalMask(), block_q=8)


def test_auto_falls_back_to_xla_when_the_kernel_cannot_run(rng_seed):
  """On GPU the Triton kernel needs power-of-two blocks >= 16: block 8 (T = 40) is
  traced with the XLA path under impl="auto" (one warning) and refused by "pallas"."""
  q, k, v, _ = inputs(rng_seed, 1, 40, 40, 2, 1, 16, 16)
  reason = bsa_lib.kernel_unmet(q, k, v, 8, 8, "gpu")
  assert reason.startswith("block_q=8 is not a power of two")
  assert bsa_lib.kernel_unmet(q, k, v, 8, 8, "tpu") is None
  assert "multiple of 16" in bsa_lib.kernel_unmet(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)), 8, 8, "tpu")
  f = lambda impl: block_sparse_attention(q, k, v, M.CausalMask(), block_q=8, block_kv=8,
                                          impl=impl)
  with dispatch.target_platform("gpu"):
    with pytest.warns(UserWarning, match="block_sparse_attention: the Pallas kernel does "
                      "not apply"):
      dispatch._warned.discard(("block_sparse_attention", reason))
      jaxpr = str(jax.make_jaxpr(lambda: f("auto"))())
    assert "pallas_call" not in jaxpr
    with pytest.raises(ValueError, match="block_sparse_attention: impl='pallas' cannot "
                       "run these inputs: block_q=8"):
      f("pallas")


@pytest.mark.parametrize("platform,t,dtype,want,given", [
    ("tpu", 1024, jnp.bfloat16, (512, 512), 32), ("gpu", 1024, jnp.bfloat16, (128, 64), 32),
    ("tpu", 40, jnp.float32, (40, 40), 8)])
def test_kernel_blocks_default_by_platform(platform, t, dtype, want, given, monkeypatch):
  """block_q / block_kv None: `default_blocks` of the kernel platform in context picks
  the kernel's blocks (seen by the kernel call they are handed to); a given one stays."""
  seen = []
  monkeypatch.setattr(bsa_lib, "_kernel_attention",
                      lambda q, k, v, mask, **kw: seen.append(kw) or q)
  q = jnp.zeros((1, t, 2, 32), dtype)
  with dispatch.target_platform(platform):
    block_sparse_attention(q, q, q, M.CausalMask(), impl="interpret")
    block_sparse_attention(q, q, q, M.CausalMask(), block_kv=given, impl="interpret")
  assert [(kw["block_q"], kw["block_kv"]) for kw in seen] == [want, (want[0], given)]


def test_xla_blocks_default_to_128(monkeypatch):
  """The XLA path's default blocks are the largest divisors <= 128 (it gathers M·bkv
  keys per row): also when impl="auto" falls back from a kernel that cannot take the
  kernel's default (GPU, T = 40: 8-blocks), with one warning."""
  seen = []
  monkeypatch.setattr(bsa_lib, "_xla_attention",
                      lambda q, k, v, **kw: seen.append(kw) or q)
  q = jnp.zeros((1, 1024, 2, 32))
  block_sparse_attention(q, q, q, M.CausalMask(), impl="xla")
  q40 = q[:, :40]
  with dispatch.target_platform("gpu"):
    reason = bsa_lib.kernel_unmet(q40, q40, q40, 8, 8)
    dispatch._warned.discard(("block_sparse_attention", reason))
    with pytest.warns(UserWarning, match="block_q=8 is not a power of two"):
      block_sparse_attention(q40, q40, q40, M.CausalMask())
  assert [(kw["block_q"], kw["block_kv"]) for kw in seen] == [(128, 128), (40, 40)]
