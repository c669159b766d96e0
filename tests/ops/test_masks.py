"""Static attention masks: dense semantics (incl. DESIGN's LocalMask), predicate on iota
(NumPy and jax.numpy) equals dense, hashability, `&`/`|` incl. per-head distribution,
and property tests of `mask_info` on random sizes for every mask type: block kinds agree
with the dense mask, CSR and transposed CSR list exactly the non-empty blocks in order
(padding repeats the last one), stored partial tiles reproduce the dense tiles, nnz and
block efficiency; argument errors."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.ops import masks as M


def random_mask(rng, kind, length):
  """A random instance of mask `kind` for sequences up to `length`."""
  r = lambda lo, hi: int(rng.integers(lo, hi + 1))
  if kind == "causal":
    return M.CausalMask(r(-3, 3))
  if kind == "local":
    return M.LocalMask(r(0, 12), r(0, 5))
  if kind == "chunked":
    return M.ChunkedCausalMask(r(1, 12))
  if kind == "strided":
    return M.StridedMask(r(1, 7), r(0, 6))
  if kind == "global":
    return M.GlobalMask(r(1, 6))
  if kind == "document":
    return M.DocumentMask(np.sort(rng.integers(0, 4, length)))
  if kind == "causal_local":
    return M.CausalMask() & M.LocalMask(r(0, 12), r(0, 4))
  if kind == "local_or_global":
    return M.LocalMask(r(0, 8)) | M.GlobalMask(r(1, 4))
  if kind == "document_causal":
    return M.DocumentMask(np.sort(rng.integers(0, 3, length))) & M.CausalMask()
  if kind == "strided_or_global":
    return M.Or(M.StridedMask(r(2, 6), r(1, 4)), M.GlobalMask(r(1, 3)))
  if kind == "multihead":
    return M.MultiHeadMask(tuple(random_mask(rng, k, length) for k in
                                 ("causal", "local", "document", "strided")))
  if kind == "multihead_and":
    return M.MultiHeadMask((M.CausalMask(), M.ChunkedCausalMask(r(1, 9)))) & M.LocalMask(
        r(0, 10), r(0, 3))
  raise ValueError(kind)


KINDS = ["causal", "local", "chunked", "strided", "global", "document", "causal_local",
         "local_or_global", "document_causal", "strided_or_global", "multihead",
         "multihead_and"]


def reference_dense(mask, t, s):
  """Python loops over the definitions in the module docstring."""
  if isinstance(mask, M.MultiHeadMask):
    return np.stack([reference_dense(m, t, s) for m in mask.masks])
  out = np.zeros((t, s), bool)
  for q in range(t):
    for k in range(s):
      if isinstance(mask, M.CausalMask):
        out[q, k] = k <= q + mask.offset
      elif isinstance(mask, M.LocalMask):
        out[q, k] = q - mask.left <= k <= q + mask.right
      elif isinstance(mask, M.ChunkedCausalMask):
        out[q, k] = k <= q and q // mask.chunk == k // mask.chunk
      elif isinstance(mask, M.StridedMask):
        out[q, k] = k <= q and ((q - k) < mask.local or (q - k) % mask.stride == 0)
      elif isinstance(mask, M.GlobalMask):
        out[q, k] = k < mask.num_global
      elif isinstance(mask, M.DocumentMask):
        out[q, k] = mask.segment_ids[q] == mask.segment_ids[k]
  if isinstance(mask, M.And):
    out = reference_dense(mask.a, t, s) & reference_dense(mask.b, t, s)
  if isinstance(mask, M.Or):
    out = reference_dense(mask.a, t, s) | reference_dense(mask.b, t, s)
  return out


def check_info(mask, t, s, bq, bkv):
  dense = mask.dense(t, s)
  dense = dense if dense.ndim == 3 else dense[None]
  info = M.mask_info(mask, t, s, bq, bkv)
  h, nq, nkv = dense.shape[0], t // bq, s // bkv
  assert info.block_kind.shape == (h, nq, nkv) and info.block_kind.dtype == np.int8
  tiles = dense.reshape(h, nq, bq, nkv, bkv).transpose(0, 1, 3, 2, 4)
  anyb, allb = tiles.any((-1, -2)), tiles.all((-1, -2))
  np.testing.assert_array_equal(info.block_kind == M.EMPTY, ~anyb)
  np.testing.assert_array_equal(info.block_kind == M.FULL, allb)
  np.testing.assert_array_equal(info.block_kind == M.PARTIAL, anyb & ~allb)
  # CSR rows and the transposed CSR list exactly the non-empty blocks, increasing,
  # padded by repeating the last valid entry (0 for an empty row).
  for blocks, counts, nonempty in ((info.kv_blocks, info.kv_counts, anyb),
                                   (info.q_blocks, info.q_counts, anyb.swapaxes(1, 2))):
    assert blocks.dtype == np.int32 and counts.dtype == np.int32
    assert blocks.shape[-1] == max(1, nonempty.sum(-1).max())
    for hh in range(h):
      for row in range(nonempty.shape[1]):
        want = np.flatnonzero(nonempty[hh, row])
        c = counts[hh, row]
        assert c == len(want)
        np.testing.assert_array_equal(blocks[hh, row, :c], want)
        np.testing.assert_array_equal(blocks[hh, row, c:], want[-1] if c else 0)
  # Stored partial tiles reproduce the dense ones, deduplicated; -1 elsewhere.
  partial = info.block_kind == M.PARTIAL
  assert ((info.partial_index >= 0) == partial).all()
  np.testing.assert_array_equal(info.partial_masks[info.partial_index[partial]],
                                tiles[partial])
  flat = info.partial_masks.reshape(len(info.partial_masks), -1)
  assert len(np.unique(flat, axis=0)) == len(flat)
  np.testing.assert_array_equal(info.nnz, dense.sum((1, 2)))
  visited = info.kv_counts.sum()
  if visited:
    assert info.block_efficiency == pytest.approx(dense.sum() / (visited * bq * bkv))
  assert not info.block_kind.flags.writeable
  return info


@pytest.mark.parametrize("kind", KINDS)
def test_mask_properties(kind, rng_seed):
  rng = np.random.default_rng(rng_seed)
  for trial in range(6):
    bq, bkv = (int(x) for x in rng.choice([1, 2, 4, 8], 2))
    t, s = bq * int(rng.integers(1, 7)), bkv * int(rng.integers(1, 7))
    mask = random_mask(rng, kind, max(t, s))
    dense = mask.dense(t, s)
    assert dense.dtype == bool
    np.testing.assert_array_equal(dense, reference_dense(mask, t, s))
    twin = copy.deepcopy(mask)
    assert twin == mask and hash(twin) == hash(mask)
    check_info(mask, t, s, bq, bkv)
    if mask.has_predicate:
      for h, m in enumerate(M.head_masks(mask)):
        want = dense[h] if dense.ndim == 3 else dense
        qi, ki = np.arange(t)[:, None], np.arange(s)[None, :]
        np.testing.assert_array_equal(np.broadcast_to(m.predicate(qi, ki), (t, s)), want)
        if trial == 0:                   # jax.numpy too (once: eager ops compile per shape)
          got = m.predicate(jnp.arange(t)[:, None], jnp.arange(s)[None, :])
          np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (t, s)), want)


def test_local_mask_matches_design():
  """DESIGN: a query at i sees keys in [i-left, i+right], intersected with causal when
  combined; right defaults to 0."""
  d = M.LocalMask(2).dense(6, 6)
  for i in range(6):
    np.testing.assert_array_equal(np.flatnonzero(d[i]), np.arange(max(0, i - 2), i + 1))
  d = M.LocalMask(1, 2).dense(6, 6)
  np.testing.assert_array_equal(np.flatnonzero(d[2]), [1, 2, 3, 4])
  both = (M.CausalMask() & M.LocalMask(1, 2)).dense(6, 6)
  np.testing.assert_array_equal(np.flatnonzero(both[2]), [1, 2])
  np.testing.assert_array_equal(M.CausalMask().dense(3, 5), np.tril(np.ones((3, 5), bool)))


def test_hashable_and_combinators():
  a = M.CausalMask() & M.LocalMask(4)
  assert a == M.And(M.CausalMask(), M.LocalMask(4)) and hash(a) == hash(
      M.And(M.CausalMask(), M.LocalMask(4)))
  assert isinstance(M.LocalMask(3) | M.GlobalMask(2), M.Or)
  assert M.DocumentMask([0, 0, 1]) == M.DocumentMask((0, 0, 1))
  assert hash(M.DocumentMask(np.array([0, 1]))) == hash(M.DocumentMask((0, 1)))
  assert M.CausalMask() != M.CausalMask(1)
  mh = M.MultiHeadMask((M.CausalMask(), M.LocalMask(1))) | M.GlobalMask(1)
  assert isinstance(mh, M.MultiHeadMask) and mh.num_heads == 2
  assert mh.masks[1] == M.Or(M.LocalMask(1), M.GlobalMask(1))
  assert mh.dense(4, 4).shape == (2, 4, 4)
  assert not (M.DocumentMask([0, 1]) & M.CausalMask()).has_predicate
  info = M.mask_info(M.CausalMask(), 8, 8, 4, 4)
  assert M.mask_info(M.CausalMask(), 8, 8, 4, 4) is info          # cached


def test_kernel_tables_are_one_pytree():
  """MaskInfo.kernel_tables() hands the kernels its seven tables as one BlockTables,
  whose tile shape gives the block sizes and which crosses jit as a pytree."""
  import jax
  from pallas_kernels.block_sparse_attention import BlockTables
  mask = M.MultiHeadMask((M.CausalMask(), M.LocalMask(3) | M.GlobalMask(2)))
  info = M.mask_info(mask, 16, 24, 4, 8)
  tabs = info.kernel_tables()
  assert isinstance(tabs, BlockTables)
  assert (tabs.block_q, tabs.block_kv, tabs.num_heads) == (4, 8, 2)
  for name in BlockTables._fields:
    assert getattr(tabs, name) is getattr(info, name)
  tabs.check(hq=2, t=16, s=24)
  with pytest.raises(ValueError, match=r"block_kind has shape \(2, 4, 3\), expected "
                     r"\(2, 2, 3\) for T=8"):
    tabs.check(hq=2, t=8, s=24)
  leaves = jax.tree.leaves(tabs)
  assert len(leaves) == 7
  doubled = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(np.int32) * 2, t))(tabs)
  assert isinstance(doubled, BlockTables)
  np.testing.assert_array_equal(doubled.kv_blocks, 2 * info.kv_blocks)


def test_fully_empty_mask_info():
  info = check_info(M.CausalMask(-100), 8, 8, 4, 4)
  assert info.kv_blocks.shape == (1, 2, 1) and (info.kv_counts == 0).all()
  assert info.partial_masks.shape == (1, 4, 4) and info.block_efficiency == 1.0


@pytest.mark.parametrize("make, match", [
    (lambda: M.LocalMask(-1), "left=-1 must be >= 0"),
    (lambda: M.LocalMask(2, -3), "right=-3 must be >= 0"),
    (lambda: M.StridedMask(0, 2), "stride=0 must be >= 1"),
    (lambda: M.StridedMask(2, -1), "local=-1 must be >= 0"),
    (lambda: M.ChunkedCausalMask(0), "chunk=0 must be >= 1"),
    (lambda: M.GlobalMask(0), "num_global=0 must be >= 1"),
    (lambda: M.CausalMask(1.5), "offset=1.5 must be an int"),
    (lambda: M.DocumentMask([]), "segment_ids must be a non-empty"),
    (lambda: M.DocumentMask([0.5, 1.0]), "segment_ids must be a non-empty"),
    (lambda: M.And(M.CausalMask(), 3), "And.b must be a Mask"),
    (lambda: M.Or(M.MultiHeadMask((M.CausalMask(),)), M.CausalMask()), "single-head"),
    (lambda: M.MultiHeadMask(()), "at least one mask"),
    (lambda: M.MultiHeadMask((M.CausalMask(), "x")), r"masks\[1\] must be"),
    (lambda: M.MultiHeadMask((M.CausalMask(),)) & M.MultiHeadMask(
        (M.CausalMask(),) * 2), "1 and 2 heads"),
    (lambda: M.mask_info(M.CausalMask(), 10, 8, 4, 4), "q_len=10 must be a multiple of "
     "block_q=4"),
    (lambda: M.mask_info(M.CausalMask(), 8, 12, 4, 8), "kv_len=12 must be a multiple"),
    (lambda: M.mask_info(M.CausalMask(), 8, 8, 0, 4), "block_q=0 must be >= 1"),
    (lambda: M.mask_info("causal", 8, 8, 4, 4), "mask must be a"),
    (lambda: M.DocumentMask([0, 1]).dense(3, 2), "2 segment_ids but q_len=3"),
])
def test_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_no_predicate_errors():
  with pytest.raises(TypeError, match="no predicate"):
    M.DocumentMask([0, 1]).predicate(np.arange(2), np.arange(2))
  with pytest.raises(TypeError, match="no single predicate"):
    M.MultiHeadMask((M.CausalMask(),)).predicate(np.arange(2), np.arange(2))


def test_band_masks_block_info_equals_the_element_wise_path(rng_seed):
  """Causal, local, chunked masks and their `&` take the row-bounds path of
  `mask_info`; the same mask behind an `|` with itself (no bounds) takes the
  element-wise path: every field agrees, on random shapes and parameters."""
  rng = np.random.default_rng(rng_seed)
  for _ in range(12):
    bq, bkv = (int(b) for b in rng.choice([1, 4, 8, 16], 2))
    t, s = bq * int(rng.integers(1, 9)), bkv * int(rng.integers(1, 9))
    left, right = (int(v) for v in rng.integers(0, 40, 2))
    offset = int(rng.integers(-20, 20))
    chunk = int(rng.integers(1, 30))
    for mask in (M.CausalMask(offset), M.LocalMask(left, right), M.ChunkedCausalMask(chunk),
                 M.CausalMask(offset) & M.LocalMask(left, right),
                 M.CausalMask(-9) & M.LocalMask(2)):                  # every row empty
      assert mask.row_bounds(np.arange(t)) is not None
      fast, slow = M.mask_info(mask, t, s, bq, bkv), M.mask_info(mask | mask, t, s, bq, bkv)
      for name, a, b in zip(fast._fields, fast, slow):
        np.testing.assert_array_equal(a, b, err_msg=f"{mask} {t}x{s} {bq}x{bkv}: {name}")
      assert fast.nnz.sum() == mask.dense(t, s).sum()
