"""Compressed N:M and block-sparse export: round trips equal the masked weights, the
stored layout is the documented one, byte counts, and the bad-input errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sparsity.compress import (compress_blocks, compress_nm, decompress_blocks,
                                         decompress_nm, export_compressed, load_compressed)
from sparsejax.sparsity.posttrain import magnitude_mask


def _nm_weight(rng, shape, n, m, dtype=np.float32):
  w = rng.normal(size=shape).astype(dtype)
  mask = np.asarray(magnitude_mask(jnp.asarray(w, jnp.float32), 1 - n / m, nm=(n, m)))
  return np.where(mask, w, 0).astype(dtype)


@pytest.mark.parametrize("n,m,dtype", [(2, 4, np.float32), (4, 8, np.float32),
                                       (1, 4, np.float16), (3, 3, np.float32)])
def test_nm_round_trip_and_layout(n, m, dtype):
  rng = np.random.default_rng(n * 10 + m)
  w = _nm_weight(rng, (8 * m, 6), n, m, dtype)
  w[:m, 0] = 0                                    # a group with fewer than n nonzeros
  c = compress_nm(w, n, m)
  np.testing.assert_array_equal(decompress_nm(c), w)
  assert c.values.shape == c.indices.shape == (8 * n, 6) and c.indices.dtype == np.uint8
  for g in range(8):                              # W[g·m + idx, o] = value (loop check)
    for j in range(n):
      for o in range(6):
        assert w[g * m + c.indices[g * n + j, o], o] == c.values[g * n + j, o]
  assert c.nbytes == 8 * n * 6 * (np.dtype(dtype).itemsize + 1)


def test_nm_rejects_denser_groups_and_bad_m():
  w = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="q_proj: not 2:4 sparse"):
    compress_nm(w, 2, 4, name="q_proj")
  with pytest.raises(ValueError, match="m dividing the input size 8"):
    compress_nm(w, 2, 3)


@pytest.mark.parametrize("block", [(2, 2), (4, 1), (1, 3)])
def test_blocks_round_trip_and_layout(block):
  rng = np.random.default_rng(sum(block))
  bh, bw = block
  keep = rng.random((12 // bh, 12 // bw)) < 0.3
  w = rng.normal(size=(12, 12)).astype(np.float32) * np.kron(keep, np.ones(block))
  c = compress_blocks(w, block)
  np.testing.assert_array_equal(decompress_blocks(c), w)
  rows, cols = np.nonzero(keep)
  np.testing.assert_array_equal(c.block_index, np.stack([rows, cols], 1))
  for (r, k), blk in zip(c.block_index, c.w_blocks):
    np.testing.assert_array_equal(blk, w[r * bh:(r + 1) * bh, k * bw:(k + 1) * bw])
  empty = compress_blocks(np.zeros((4, 4), np.float32), (2, 2))
  np.testing.assert_array_equal(decompress_blocks(empty), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="must tile"):
    compress_blocks(w, (5, 5))


def test_export_file_round_trips_and_reports_bytes(tmp_path):
  rng = np.random.default_rng(3)
  q = _nm_weight(rng, (16, 8), 2, 4).reshape(16, 2, 4)   # a q_proj-like [D, H, Dh]
  experts = np.stack([_nm_weight(rng, (16, 8), 2, 4) for _ in range(3)])
  norm = rng.normal(size=(16,)).astype(np.float32)
  params = {"block_0": {"attention": {"q_proj": {"kernel": q}},
                        "ffn": {"w_gate": experts}, "attn_norm": {"scale": norm}}}
  matrices = {"block_0/attention/q_proj": (16, 8),
              **{f"block_0/ffn/w_gate[{e}]": (16, 8) for e in range(3)}}
  path = str(tmp_path / "model.npz")
  report = export_compressed(path, params, matrices, nm=(2, 4))
  dense = 4 * 16 * 8 * 4
  assert report["dense_bytes"] == dense
  assert report["compressed_bytes"] == 4 * 8 * 8 * (4 + 1)
  assert report["saved_bytes"] == dense - report["compressed_bytes"]
  loaded = load_compressed(path)
  np.testing.assert_array_equal(loaded["block_0/attention/q_proj"], q.reshape(16, 8))
  for e in range(3):
    np.testing.assert_array_equal(loaded[f"block_0/ffn/w_gate[{e}]"], experts[e])
  np.testing.assert_array_equal(loaded["block_0/attn_norm/scale"], norm)
  assert not any(k.startswith("block_0/ffn/w_gate") and "[" not in k for k in loaded)
  blocks = export_compressed(str(tmp_path / "b.npz"), params,
                             {"block_0/attention/q_proj": (16, 8)}, block=(4, 4))
  assert blocks["compressed_bytes"] > 0
  np.testing.assert_array_equal(load_compressed(str(tmp_path / "b.npz"))[
      "block_0/attention/q_proj"], q.reshape(16, 8))
