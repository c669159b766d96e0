"""Tests of pallas_kernels.nsa (NSA selection branch): interpret mode vs the XLA reference
`sparsejax.ops.nsa.selected_attention` (forward and dq, dk, dv), rows with no valid block,
decode offsets, the op's impl dispatch, and lowering for ("tpu",) and ("cuda",).

The TPU (Mosaic) kernels run with `interpret=pltpu.InterpretParams()` (~20 ms per grid
step on CPU, and each case costs a few seconds of compilation), so the cases are few and
tiny (T, S ≤ 64, l' = 16, n = 2..3, G = 2, D = 16); kernel and reference run in one jit.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.nsa import (csr_from_bool, inverse_csr, nsa_selection_kernel,
                                union_stats, union_tables)
from sparsejax.ops.nsa import select_blocks, selected_attention  # tests only

L_SEL = 16


def interpret_for(backend):
  return pltpu.InterpretParams() if backend == "tpu" else True


def inputs(seed, b, t, s, hq, hkv, d, dv, n, positions=None, drop=0.25):
  """Random q, k, v, cotangent and NSA-style (idx, valid): top-n of random scores with
  the current block forced (so tokens of one tile select different blocks), some slots
  invalidated, and tokens 0..3 of every batch row with no valid block at all (their
  output must be 0)."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  ns = -(-s // L_SEL)
  pos = (np.broadcast_to(np.arange(t), (b, t)) if positions is None
         else np.asarray(positions))
  scores = jnp.asarray(rng.random((b, t, hkv, ns)), jnp.float32)
  idx, valid = select_blocks(scores, jnp.asarray(pos, jnp.int32), n, L_SEL,
                             num_initial=0, num_local=1)
  keep = rng.random(valid.shape) > drop
  keep[:, :4] = False
  valid = np.asarray(valid) & keep
  qp = None if positions is None else jnp.asarray(pos, jnp.int32)
  return (f(b, t, hq, d), f(b, s, hkv, d), f(b, s, hkv, dv), f(b, t, hq, dv),
          np.asarray(idx), valid, qp)


def run_both(q, k, v, cot, idx, valid, qp, kernel_fn):
  """((out, dq, dk, dv) of kernel_fn, same of the XLA reference), in one jit."""
  @jax.jit
  def both(q, k, v, cot):
    res = []
    ref = lambda q, k, v: selected_attention(q, k, v, idx, valid, L_SEL, q_positions=qp,
                                             impl="xla")
    for fn in (kernel_fn, ref):
      out, vjp = jax.vjp(fn, q, k, v)
      res.append((out.astype(jnp.float32),) + vjp(cot))
    return res
  return both(q, k, v, cot)


def assert_close(x, y, tol=2e-5):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  assert x.shape == y.shape and np.all(np.isfinite(x))
  scale = max(1.0, float(np.abs(y).max()))
  np.testing.assert_allclose(x, y, atol=tol * scale, rtol=tol)


# backend -> (B, T, S, n, block_q, decode positions or None). GPU: a decode chunk
# (T = 16 tokens at positions 40..55 of a 64-key cache) with B = 2; TPU: training
# (T = S = 48, three query tiles of 16 so the union tables have several rows).
CASES = {
    "gpu": (2, 16, 64, 3, None, np.broadcast_to(np.arange(40, 56), (2, 16))),
    "tpu": (1, 48, 48, 2, 16, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(CASES))
def test_matches_reference(backend, rng_seed):
  b, t, s, n, bq, positions = CASES[backend]
  q, k, v, cot, idx, valid, qp = inputs(rng_seed, b, t, s, 4, 2, 16, 16, n, positions)
  kern = lambda q, k, v: nsa_selection_kernel(
      q, k, v, idx, valid, select_block=L_SEL, q_positions=qp, block_q=bq,
      backend=backend, interpret=interpret_for(backend))
  got, want = run_both(q, k, v, cot, idx, valid, qp, kern)
  for x, y in zip(got, want):
    assert_close(x, y)
  out, dq = np.asarray(got[0]), np.asarray(got[1])
  assert (out[:, :4] == 0).all() and (dq[:, :4] == 0).all()    # no valid block -> 0
  # A valid selected block always holds a key <= t (select_blocks never picks a
  # future block), so exactly the rows with no valid slot are 0.
  empty = np.repeat(~np.asarray(valid).any(-1), 2, axis=2)      # [B, T, Hq]
  assert ((np.abs(out).max(-1) == 0) == empty).all()
  assert (np.asarray(valid).sum(-1) < n).any()                  # some slots invalid
  if backend == "tpu":   # tiles share blocks, but not every row of a tile uses each one
    stats = union_stats(idx, valid, L_SEL, s, bq)
    assert stats["reuse"] > 1 and stats["row_efficiency"] < 1


def test_op_interpret_dispatch(rng_seed):
  """selected_attention(impl="interpret") (TPU kernel on CPU, default tile, S not a
  multiple of l') equals impl="xla" (forward: the grads are the kernel's custom_vjp,
  tested above); impl="pallas" on CPU raises."""
  q, k, v, _, idx, valid, _ = inputs(rng_seed, 1, 24, 24, 2, 1, 16, 16, 2)
  run = jax.jit(lambda q, k, v: [selected_attention(q, k, v, idx, valid, L_SEL, impl=i)
                                 for i in ("interpret", "xla")])
  got, want = run(q, k, v)
  assert got.dtype == jnp.float32
  assert_close(got, want)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
      selected_attention(q, k, v, idx, valid, L_SEL, impl="pallas")


def test_tables():
  hit = jnp.asarray([[True, False, True, False], [False] * 4, [False, True, False, False]])
  ids, counts = jax.jit(csr_from_bool, static_argnums=1)(hit, 3)
  np.testing.assert_array_equal(counts, [2, 0, 1])
  np.testing.assert_array_equal(ids[0], [0, 2, 2])              # padded with the last id
  np.testing.assert_array_equal(ids[2], [1, 1, 1])
  sel = jnp.asarray([[[[0, 1], [0, -1], [2, 0], [-1, -1]]]], jnp.int32)   # [B,Hkv,T,n]
  hit, (blocks, bcounts), (vblocks, vtiles, total) = jax.jit(
      union_tables, static_argnums=(1, 2))(sel, 3, 2)
  np.testing.assert_array_equal(hit[0, 0], [[True, True, False], [True, False, True]])
  np.testing.assert_array_equal(bcounts[0, 0], [2, 2])
  np.testing.assert_array_equal(blocks[0, 0], [[0, 1, 1], [0, 2, 2]])
  # dk/dv visits in (kv block, tile) order; width = nT · M = 2 · 3
  assert total == 4 and vblocks.shape == vtiles.shape == (6,)    # past 4: the last visit
  np.testing.assert_array_equal(vblocks, [0, 0, 1, 2, 2, 2])
  np.testing.assert_array_equal(vtiles, [0, 1, 0, 1, 1, 1])
  offsets, tokens = jax.jit(inverse_csr, static_argnums=1)(jnp.swapaxes(sel, 1, 2), 3)
  np.testing.assert_array_equal(offsets[0, 0], [0, 3, 4, 5])
  np.testing.assert_array_equal(tokens[0, 0, :5], [0, 1, 2, 0, 2])
  stats = union_stats(np.asarray(sel[:, 0, :, :])[:, :, None], np.ones((1, 4, 1, 2)),
                      L_SEL, 3 * L_SEL, 2)
  assert stats["selected"] == 5 and stats["visited"] == 4


def test_errors():
  q, k, v = jnp.ones((1, 32, 2, 16)), jnp.ones((1, 32, 1, 16)), jnp.ones((1, 32, 1, 16))
  idx, valid = jnp.zeros((1, 32, 1, 2), jnp.int32), jnp.ones((1, 32, 1, 2), bool)
  kw = dict(select_block=16, interpret=True)
  with pytest.raises(ValueError, match="backend='cpu'"):
    nsa_selection_kernel(q, k, v, idx, valid, backend="cpu", **kw)
  with pytest.raises(ValueError, match="power of two >= 16"):
    nsa_selection_kernel(q, k, v, idx, valid, backend="gpu", **dict(kw, select_block=8))
  with pytest.raises(ValueError, match="block_idx shape"):
    nsa_selection_kernel(q, k, v, idx[:, :16], valid[:, :16], backend="tpu", **kw)
  with pytest.raises(ValueError, match="block_q=5"):
    nsa_selection_kernel(q, k, v, idx, valid, backend="tpu", block_q=5, **kw)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    nsa_selection_kernel(q.astype(jnp.float16), k, v, idx, valid, backend="tpu", **kw)
  with pytest.raises(ValueError, match="chunk_tokens=48 must be a power of two"):
    nsa_selection_kernel(q, k, v, idx, valid, backend="gpu", chunk_tokens=48, **kw)
  with pytest.raises(ValueError, match="tile_rows=8 must be a power of two >= 16"):
    nsa_selection_kernel(q, k, v, idx, valid, backend="gpu", tile_rows=8, **kw)


def _custom_call_targets(lowered):
  return set(re.findall(r"custom_call @([^\s(]+)\(", lowered.as_text()))


def _lowered(backend, dtype, t=256, hq=8, hkv=2, d=128, lsel=64, n=4):
  @jax.jit
  def f(q, k, v, d_out, idx, valid):
    fn = lambda q, k, v: nsa_selection_kernel(q, k, v, idx, valid, select_block=lsel,
                                              backend=backend)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(d_out)

  sd = jax.ShapeDtypeStruct
  args = (sd((1, t, hq, d), dtype), sd((1, t, hkv, d), dtype), sd((1, t, hkv, d), dtype),
          sd((1, t, hq, d), dtype), sd((1, t, hkv, n), jnp.int32),
          sd((1, t, hkv, n), jnp.bool_))
  platform = "tpu" if backend == "tpu" else "cuda"
  return f.trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_lowering(dtype):
  lowered = _lowered("tpu", dtype)
  assert "tpu_custom_call" in _custom_call_targets(lowered)
  text = lowered.as_text()
  for name in ("fwd", "dq", "dkv"):
    assert f"nsa_selection_{name}_tpu" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_lowering(dtype):
  assert pltriton.CompilerParams(num_warps=4).num_warps == 4
  lowered = _lowered("gpu", dtype)
  assert "__gpu$xla.gpu.triton" in _custom_call_targets(lowered)
  text = lowered.as_text()
  assert "num_warps = 4" in text and "num_warps = 8" in text     # dk/dv chunks: 8
  for name in ("fwd", "dq", "dkv", "dkv_sum"):
    assert f"nsa_selection_{name}_gpu" in text



def long_list_inputs(seed, b, t, s, hq, hkv, n, dtype):
  """Every token selects kv block 0 (its list holds all T tokens of a (b, c) pair);
  the other n − 1 slots distinct random blocks in 1..t // l' except block 2 (never
  selected: an empty block between non-empty ones), −1 where too few exist or at
  random (30%, so list lengths are not all multiples of the chunk size); with S > T
  the blocks past the last query position are empty too. q, k, v, cot in `dtype`."""
  rng = np.random.default_rng(seed)
  idx = np.full((b, t, hkv, n), -1, np.int32)
  idx[..., 0] = 0
  for bi, ti, ci in np.ndindex(b, t, hkv):
    cand = [x for x in range(1, ti // L_SEL + 1) if x != 2]
    pick = rng.permutation(cand)[:n - 1]
    idx[bi, ti, ci, 1:1 + len(pick)] = np.where(rng.random(len(pick)) < 0.3, -1, pick)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  q, k, v, cot = f(b, t, hq, 32), f(b, s, hkv, 32), f(b, s, hkv, 16), f(b, t, hq, 16)
  return (q, k, v, cot), idx, idx >= 0


# (B, T, S, Hq, Hkv, n, chunk_tokens, tile_rows, dtype): G = 2 with one 8-token tile per
# chunk (block 0's 64 entries = exactly 8 chunks); G = 3 (rows of head 3 masked), B = 2,
# bf16 with the default tile rows, 4-token chunks; G = 1 with 16-token tiles, two per
# 32-token chunk.
LONG_LIST_CASES = [
    (1, 64, 80, 4, 2, 3, 8, 16, jnp.float32),
    pytest.param(2, 48, 64, 6, 2, 2, 4, None, jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param(1, 64, 64, 2, 2, 2, 32, 16, jnp.float32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("b,t,s,hq,hkv,n,chunk,rows,dtype", LONG_LIST_CASES)
def test_gpu_dkv_long_lists_in_chunks(b, t, s, hq, hkv, n, chunk, rows, dtype, rng_seed):
  """GPU dk/dv with each block's token list cut into chunks of `chunk` entries (block
  0: all T tokens), partial sums per chunk added per block: forward and grads equal
  the XLA reference on the same (rounded) inputs in f32; blocks nobody selected get
  exactly zero dk/dv."""
  xs, idx, valid = long_list_inputs(rng_seed, b, t, s, hq, hkv, n, dtype)
  kern = lambda q, k, v: nsa_selection_kernel(
      q, k, v, idx, valid, select_block=L_SEL, backend="gpu", interpret=True,
      chunk_tokens=chunk, tile_rows=rows)
  x32 = [x.astype(jnp.float32) for x in xs]
  got = jax.jit(lambda q, k, v, cot: (lambda o, f: (o,) + f(cot))(
      *jax.vjp(kern, q, k, v)))(*xs)
  want = run_both(*x32, idx, valid, None,
                  lambda q, k, v: selected_attention(q, k, v, idx, valid, L_SEL,
                                                     impl="xla"))[1]
  for x, y in zip(got, want):
    assert x.dtype == dtype
    assert_close(x.astype(jnp.float32), y, tol=2e-5 if dtype == jnp.float32 else 2e-2)
  empty = np.ones(-(-s // L_SEL), bool)
  empty[np.unique(idx[idx >= 0])] = False
  assert empty[2] and empty.sum() >= 1 + (s > t)
  for g in got[2:]:
    blocks = np.asarray(g, np.float32).reshape(b, -1, L_SEL, hkv, g.shape[-1])
    assert (blocks[:, empty] == 0).all() and (np.abs(blocks[:, ~empty]).max() > 0)
    assert np.abs(blocks[:, 0]).max() > 0


def test_chunk_list(rng_seed):
  """chunk_list over inverse_csr's offsets against a NumPy walk: the items of each
  block cover its list entries [offsets[j], offsets[j + 1]) in order, C at a time,
  exactly once; items past the total are (−1, empty); the static width bounds the
  total. Three (batch, kv head) pairs of T = 40 tokens × n = 3 distinct random blocks
  of ns = 7 (some slots invalid): block 2 never selected in pair 0, pair 1 with every
  token on block 0 only (a list of 40: exactly 5 chunks of 8, 10 of 4)."""
  from pallas_kernels.nsa import chunk_list, chunk_width
  rng = np.random.default_rng(rng_seed)
  t, n, ns, pairs = 40, 3, 7, 3
  sel = np.stack([np.stack([rng.permutation(ns)[:n] for _ in range(t)])
                  for _ in range(pairs)], axis=1)[None]            # [1, T, pairs, n]
  sel = np.where(rng.random(sel.shape) < 0.2, -1, sel)
  sel[0, :, 0] = np.where(sel[0, :, 0] == 2, -1, sel[0, :, 0])
  sel[0, :, 1] = [0, -1, -1]
  offsets = jax.jit(inverse_csr, static_argnums=1)(jnp.asarray(sel, jnp.int32), ns)[0][0]
  offsets = np.asarray(offsets)
  for c in (1, 4, 8, 64):
    width = chunk_width(t, n, ns, c)
    blocks, begins, ends, bounds = map(np.asarray, jax.jit(
        chunk_list, static_argnums=(1, 2))(jnp.asarray(offsets), c, width))
    for p in range(pairs):
      want = [(j, e, min(e + c, offsets[p, j + 1])) for j in range(ns)
              for e in range(offsets[p, j], offsets[p, j + 1], c)]
      assert len(want) <= width
      got = list(zip(blocks[p], begins[p], ends[p]))
      assert got[:len(want)] == want
      assert all(x == (-1, 0, 0) for x in got[len(want):])
      np.testing.assert_array_equal(
          np.diff(bounds[p]), [sum(1 for x in want if x[0] == j) for j in range(ns)])
  assert offsets[0, 3] == offsets[0, 2] and offsets[1, 1] == t


@pytest.mark.slow
def test_gpu_dkv_longest_walk():
  """GPU dk/dv at paper sizes (T = 32k, l' 64, n 16 with 1 initial + 2 local blocks
  forced, NSA's causal selection of random scores, one (batch, kv head) pair; G = 16,
  the bf16 defaults C = 256 and 128-row tiles, so 8 tokens per step): the former kernel
  walked block 0's whole list, 32,768 tokens one by one, in one program; the chunk
  list gives 2,262 programs per pair (static width 2,558) of at most 32 steps, and
  the sum kernel's longest walk is 128 partials."""
  from pallas_kernels.nsa import chunk_list, chunk_width
  from pallas_kernels.nsa.gpu import dkv_tile
  t, lsel, n, c = 32768, 64, 16, 256
  ns = t // lsel
  scores = jax.random.uniform(jax.random.key(0), (1, t, 1, ns))
  idx, valid = select_blocks(scores, jnp.arange(t)[None], n, lsel)
  sel = jnp.where(valid, idx, -1).astype(jnp.int32)
  offsets, _ = jax.jit(inverse_csr, static_argnums=1)(sel, ns)
  width = chunk_width(t, n, ns, c)
  blocks, begins, ends, bounds = jax.jit(chunk_list, static_argnums=(1, 2))(
      offsets[0], c, width)
  longest_list = int(jnp.max(jnp.diff(offsets[0, 0])))
  programs = int(bounds[0, -1])
  tile, gq = dkv_tile(16, 128, c)
  steps = -(-int(jnp.max(ends - begins)) // tile)
  assert longest_list == t and (tile, gq) == (8, 16) and width == 2558
  assert programs == 2262 and steps == 32
  assert int(jnp.max(jnp.diff(bounds[0]))) == t // c


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_invalid_block_ids_contribute_nothing(backend, rng_seed):
  """Through the op (impl="interpret", each platform's kernel): valid slots holding -1
  or an id >= ceil(S/l') give exactly the result of marking them invalid, forward and
  backward (the XLA path is the reference)."""
  from sparsejax.ops import dispatch
  q, k, v, cot, idx, valid, _ = inputs(rng_seed, 1, 32, 32, 4, 2, 16, 16, 2, drop=0.0)
  rng = np.random.default_rng(rng_seed)
  bad = rng.random(idx.shape) < 0.3
  bad[:, 4] = True
  bad_idx = np.where(bad, np.where(np.arange(2) % 2, -1, 2), idx)

  def op(idx, valid, impl):
    return lambda q, k, v: selected_attention(q, k, v, idx, valid, L_SEL, impl=impl)

  with dispatch.target_platform(backend):
    got, want = run_both(q, k, v, cot, bad_idx, valid | bad, None,
                         op(bad_idx, valid | bad, "interpret"))
  clean = run_both(q, k, v, cot, idx, valid & ~bad, None, op(idx, valid & ~bad, "xla"))[0]
  for x, y, z in zip(got, want, clean):
    assert_close(x, z)
    assert_close(y, z)
  assert (np.asarray(got[0])[:, 4] == 0).all()


@pytest.mark.slow
def test_tpu_tables_split_into_chunks(rng_seed):
  """A tiny SMEM budget splits the TPU calls: forward / dq into (pair, row) chunks (6
  calls here, inside lax.map), dk/dv into calls of 2 visits each (a kv block's visits
  straddle calls, summed in f32 across them); results equal the reference."""
  from pallas_kernels.nsa import tpu_chunks
  b, t, s, n, bq, _ = CASES["tpu"]
  assert tpu_chunks(b * 2, t // bq, 3, 16) == (1, 1)
  q, k, v, cot, idx, valid, qp = inputs(rng_seed, b, t, s, 4, 2, 16, 16, n)
  kern = lambda q, k, v: nsa_selection_kernel(
      q, k, v, idx, valid, select_block=L_SEL, block_q=bq, backend="tpu",
      interpret=interpret_for("tpu"), smem_table_bytes=16)
  got, want = run_both(q, k, v, cot, idx, valid, qp, kern)
  for x, y in zip(got, want):
    assert_close(x, y)


@pytest.mark.parametrize("t", [32768, 131072])
def test_tpu_footprint_fits_long_context(t):
  """Hq 64, Hkv 4, n 16, l' 64, D 128 bf16: unsplit tables would take 8 MiB (forward)
  and 32 MiB (dk/dv) at 32k; per call they stay within the SMEM budget, VMEM within
  v5e's 16 MiB default scoped limit."""
  from pallas_kernels._common import SMEM_TABLE_BYTES
  from pallas_kernels.nsa import default_block_q, tpu_footprint
  fp = tpu_footprint(b=2, t=t, s=t, hq=64, hkv=4, n=16, d=128, dv=128, select_block=64,
                     itemsize=2)
  nt = t // default_block_q(t, 16, 16)
  assert 4 * 2 * 4 * nt * (128 + 1) > 8 * 2 ** 20              # unsplit forward tables
  assert max(fp["smem_fwd"], fp["smem_dkv"]) <= SMEM_TABLE_BYTES
  assert max(fp["vmem_fwd"], fp["vmem_dq"], fp["vmem_dkv"]) <= 16 * 2 ** 20


@pytest.mark.slow
@pytest.mark.parametrize("t,slots,min_ratio", [(8192, 131072, 2), (32768, 2097152, 5)])
def test_tpu_dkv_steps_only_the_visited_pairs(t, slots, min_ratio):
  """TPU dk/dv grid steps per (batch, kv head) pair, paper sizes (l' 64, n 16 with 1
  initial and 2 local blocks, G 16 bf16 so Tq 8), NSA's causal selection of random
  scores. The transposed-union grid stepped every one of the ns·nT (kv block, tile)
  slots and skipped the empty ones; the visit list has one step per visited pair,
  U = the union's visited count. Measured: 8k 131,072 -> 50,246 steps (2.6x fewer),
  32k 2,097,152 -> 331,558 (6.3x)."""
  from pallas_kernels.nsa import default_block_q
  tq, ns = default_block_q(t, 16, 16), t // 64
  assert ns * (t // tq) == slots
  scores = jax.random.uniform(jax.random.key(0), (1, t, 1, ns))
  idx, valid = select_blocks(scores, jnp.arange(t)[None], 16, 64)
  sel = jnp.swapaxes(jnp.where(valid, idx, -1), 1, 2)
  _, _, (_, _, steps) = jax.jit(union_tables, static_argnums=(1, 2))(sel, ns, tq)
  assert int(steps) == union_stats(idx, valid, 64, t, tq)["visited"]
  assert int(steps) * min_ratio < slots


@pytest.mark.slow
def test_tpu_dkv_calls_in_lock_step_inside_shard_map(rng_seed):
  """Inside a checked `jax.shard_map` (4 devices: batch and kv heads split) the
  interpret-mode dk/dv calls run in lock step on every device — static grids of 2
  visits here, a kv block's visits straddling calls, devices with fewer visits making
  calls of none — and the grads equal the XLA path's."""
  q, k, v, cot, idx, valid, _ = inputs(rng_seed, 2, 32, 32, 4, 2, 16, 16, 2)
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = jax.sharding.PartitionSpec("data", None, "tensor", None)
  kern = lambda q, k, v, idx, ok: nsa_selection_kernel(
      q, k, v, idx, ok, select_block=L_SEL, block_q=8, backend="tpu",
      interpret=interpret_for("tpu"), smem_table_bytes=16).astype(jnp.float32)
  ref = lambda q, k, v, idx, ok: selected_attention(q, k, v, idx, ok, L_SEL, impl="xla")

  def grads(fn):
    run = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
    loss = lambda q, k, v: jnp.sum(run(q, k, v, jnp.asarray(idx), jnp.asarray(valid))
                                   * cot)
    with jax.set_mesh(mesh):
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for x, y in zip(grads(kern), grads(ref)):
    assert_close(x, y)
