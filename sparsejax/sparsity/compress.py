"""Compressed storage of pruned weights: N:M (values + in-group positions) and
block-sparse (nonzero blocks + block coordinates), with byte counts.

N:M, for a kernel W [in, out] pruned along its inputs (at most n nonzeros in every
group of m consecutive inputs of an output column, as `posttrain.*(nm=(n, m))` and
2:4 sparse tensor cores use):
    values  [in/m · n, out]  W's dtype: the kept weights of each group, in input order
    indices [in/m · n, out]  uint8: each value's position 0..m−1 inside its group
so W[g·m + indices[g·n + j, o], o] = values[g·n + j, o]. A group with fewer than n
nonzeros stores zeros in its spare slots. Size: n/m of the values plus one byte per
kept value (2:4 float32: 62.5% of dense; bfloat16: 75%).

Block-sparse, blocks of bh × bw of W [in, out]:
    w_blocks    [nnz_blocks, bh, bw]  the blocks holding a nonzero, row-major order
    block_index [nnz_blocks, 2]       int32 (block row, block column)
the layout of a block-sparse weight matmul (a CSR row pointer follows from the sorted
block rows: `np.searchsorted(block_index[:, 0], np.arange(in // bh + 1))`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sparsejax.validation import ConfigError


@dataclasses.dataclass(frozen=True)
class NMWeight:
  values: np.ndarray    # [in/m·n, out]
  indices: np.ndarray   # [in/m·n, out] uint8
  n: int
  m: int
  shape: tuple[int, int]

  @property
  def nbytes(self) -> int:
    return self.values.nbytes + self.indices.nbytes


@dataclasses.dataclass(frozen=True)
class BlockWeight:
  w_blocks: np.ndarray      # [nnz_blocks, bh, bw]
  block_index: np.ndarray   # [nnz_blocks, 2] int32 (block row, block column)
  shape: tuple[int, int]

  @property
  def nbytes(self) -> int:
    return self.w_blocks.nbytes + self.block_index.nbytes


def _matrix(w, name: str) -> np.ndarray:
  w = np.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D [in, out] kernel, got shape {w.shape}")
  return w


def compress_nm(w, n: int, m: int, *, name: str = "kernel") -> NMWeight:
  """N:M-compresses W [in, out]; ValueError (naming `name`) when m does not divide in,
  m > 256, or some group of m inputs holds more than n nonzeros."""
  w = _matrix(w, name)
  d, out = w.shape
  if not 1 <= n <= m <= 256 or d % m:
    raise ValueError(f"{name}: nm={n}:{m} needs 1 <= n <= m <= 256 and m dividing the "
                     f"input size {d}")
  groups = w.reshape(d // m, m, out)
  nonzero = groups != 0
  worst = int(nonzero.sum(axis=1).max(initial=0))
  if worst > n:
    raise ValueError(f"{name}: not {n}:{m} sparse (a group of {m} inputs has {worst} "
                     "nonzeros)")
  # nonzeros first (stable: in input order), then the zero slots to fill up to n
  order = np.argsort(~nonzero, axis=1, kind="stable")[:, :n]       # [G, n, out]
  order = np.sort(order, axis=1)
  values = np.take_along_axis(groups, order, axis=1)
  return NMWeight(values.reshape(-1, out), order.reshape(-1, out).astype(np.uint8),
                  n, m, (d, out))


def decompress_nm(c: NMWeight) -> np.ndarray:
  d, out = c.shape
  groups = np.zeros((d // c.m, c.m, out), c.values.dtype)
  np.put_along_axis(groups, c.indices.reshape(-1, c.n, out).astype(np.int64),
                    c.values.reshape(-1, c.n, out), axis=1)
  return groups.reshape(d, out)


def compress_blocks(w, block: tuple[int, int], *, name: str = "kernel") -> BlockWeight:
  """Keeps the bh × bw blocks of W [in, out] that hold a nonzero (ValueError when the
  blocks do not tile W)."""
  w = _matrix(w, name)
  bh, bw = block
  d, out = w.shape
  if bh < 1 or bw < 1 or d % bh or out % bw:
    raise ValueError(f"{name}: blocks {bh}x{bw} must tile the kernel's shape {w.shape}")
  tiles = w.reshape(d // bh, bh, out // bw, bw).transpose(0, 2, 1, 3)
  rows, cols = np.nonzero(np.any(tiles != 0, axis=(2, 3)))
  return BlockWeight(tiles[rows, cols], np.stack([rows, cols], 1).astype(np.int32),
                     (d, out))


def decompress_blocks(c: BlockWeight) -> np.ndarray:
  d, out = c.shape
  bh, bw = c.w_blocks.shape[1:]
  tiles = np.zeros((d // bh, out // bw, bh, bw), c.w_blocks.dtype)
  tiles[c.block_index[:, 0], c.block_index[:, 1]] = c.w_blocks
  return tiles.transpose(0, 2, 1, 3).reshape(d, out)


def _leaf(params, name: str):
  """(leaf, expert index or None) of a report name like "block_0/attention/q_proj"
  (its "kernel") or "block_0/ffn/w_gate[3]"."""
  expert = None
  if name.endswith("]"):
    name, expert = name[:-1].split("[")
    expert = int(expert)
  node = params
  for key in name.split("/"):
    node = node[key]
  if isinstance(node, dict):
    node = node["kernel"]
  return node, expert


def export_compressed(path: str, params, matrices: dict[str, tuple[int, int]], *,
                      nm: tuple[int, int] | None = None,
                      block: tuple[int, int] | None = None) -> dict:
  """Writes the pruned `matrices` ({report name: [in, out]}, e.g. from
  `PruneResult.layers`) of `params` compressed (N:M with `nm`, else blocks of `block`)
  to the .npz file `path` — "<name>/values" + "<name>/indices" or "<name>/w_blocks" +
  "<name>/block_index" — and every other leaf dense under its "/"-joined path.
  Returns {"dense_bytes", "compressed_bytes", "saved_bytes", "ratio"} over the
  compressed matrices."""
  if (nm is None) == (block is None):
    raise ConfigError("export_compressed: give exactly one of nm=(n, m) and block=(bh, bw)")
  arrays, dense, packed, covered = {}, 0, 0, set()
  for name, (d, out) in matrices.items():
    leaf, expert = _leaf(params, name)
    w = np.asarray(leaf if expert is None else leaf[expert]).reshape(d, out)
    arrays[f"{name}/shape"] = np.asarray([d, out])
    if nm is not None:
      c = compress_nm(w, *nm, name=name)
      arrays[f"{name}/values"], arrays[f"{name}/indices"] = c.values, c.indices
      arrays[f"{name}/nm"] = np.asarray(nm)
    else:
      c = compress_blocks(w, block, name=name)
      arrays[f"{name}/w_blocks"], arrays[f"{name}/block_index"] = c.w_blocks, c.block_index
    dense += w.nbytes
    packed += c.nbytes
    covered.add(name.split("[")[0])
  for keys, leaf in _flatten(params):
    joined = "/".join(keys)
    owner = joined[:-len("/kernel")] if joined.endswith("/kernel") else joined
    if owner not in covered:
      arrays[joined] = np.asarray(leaf)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return {"dense_bytes": dense, "compressed_bytes": packed, "saved_bytes": dense - packed,
          "ratio": packed / dense if dense else math.nan}


def load_compressed(path: str) -> dict[str, np.ndarray]:
  """{name: array} of an `export_compressed` file: compressed matrices decompressed to
  their [in, out] view (under their report name), other leaves as stored."""
  with np.load(path) as z:
    arrays = dict(z)
  out = {}
  for key in [k for k in arrays if k.endswith("/shape")]:
    name = key[:-len("/shape")]
    shape = tuple(int(v) for v in arrays.pop(key))
    if f"{name}/nm" in arrays:
      n, m = (int(v) for v in arrays.pop(f"{name}/nm"))
      out[name] = decompress_nm(NMWeight(arrays.pop(f"{name}/values"),
                                         arrays.pop(f"{name}/indices"), n, m, shape))
    else:
      out[name] = decompress_blocks(BlockWeight(arrays.pop(f"{name}/w_blocks"),
                                                arrays.pop(f"{name}/block_index"), shape))
  return {**arrays, **out}


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree
