"""Static structured attention masks and their block-level info for block-sparse kernels.

A mask decides which (query q, key k) pairs may attend; positions are 0-based token
indices (queries and keys share the origin: CausalMask is top-left aligned). Masks are
frozen, hashable dataclasses, so they can be static arguments of `jax.jit`.

Every mask has
  `dense(q_len, kv_len)`   NumPy bool [q_len, kv_len] ([H, q_len, kv_len] per-head);
  `predicate(q_idx, kv_idx)` the mask elementwise on broadcastable int arrays (NumPy or
      jax.numpy, e.g. iota tiles inside a kernel) — every mask whose definition is a
      formula (`has_predicate`); `DocumentMask` (stored segment ids) has none;
  `a & b`, `a | b`         -> `And(a, b)`, `Or(a, b)` (distributed over per-head masks).

    CausalMask(offset=0)        k <= q + offset
    LocalMask(left, right=0)    q - left <= k <= q + right   (with right=0 also causal)
    ChunkedCausalMask(chunk)    q // chunk == k // chunk and k <= q
    StridedMask(stride, local)  k <= q and ((q - k) < local or (q - k) % stride == 0)
                                (Sparse Transformer "strided" pattern)
    GlobalMask(num_global)      k < num_global (sink tokens; combine with `|`)
    DocumentMask(segment_ids)   segment_ids[q] == segment_ids[k] (block diagonal)
    And(a, b), Or(a, b)         a ∧ b, a ∨ b
    MultiHeadMask(masks)        head h uses masks[h]

`mask_info(mask, q_len, kv_len, block_q, block_kv)` turns a mask into the trace-time
NumPy tables a block-sparse kernel needs (block kinds, CSR of non-empty blocks and its
transpose, deduplicated partial tiles), in the spirit of splash attention's MaskInfo.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, NamedTuple

import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def _int(name: str, value: Any, low: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}={value!r} must be an int")
  if low is not None and value < low:
    raise ValueError(f"{name}={value} must be >= {low}")
  return int(value)


class Mask:
  """Base class. Subclasses define `_eval` (NumPy, any mask) and, when the mask is a
  formula, `predicate` (NumPy or jax.numpy)."""

  has_predicate: bool = True
  num_heads: int | None = None           # None: the same mask for every head

  def predicate(self, q_idx, kv_idx):
    """bool array (broadcast of q_idx and kv_idx): may query q_idx attend to kv_idx."""
    raise NotImplementedError

  def _eval(self, q_idx: np.ndarray, kv_idx: np.ndarray) -> np.ndarray:
    return self.predicate(q_idx, kv_idx)

  def _check_lengths(self, q_len: int, kv_len: int) -> None:
    pass

  def row_bounds(self, q_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, hi) int64 like q_idx if each query row attends to exactly the keys
    lo <= k <= hi (a band: causal, local, chunked and their `&`), else None. Lets
    `mask_info` find block kinds without evaluating every element."""
    return None

  def dense(self, q_len: int, kv_len: int) -> np.ndarray:
    """The mask as NumPy bool [q_len, kv_len] (row q, column k)."""
    q_len = _int("q_len", q_len, 1)
    kv_len = _int("kv_len", kv_len, 1)
    self._check_lengths(q_len, kv_len)
    q = np.arange(q_len, dtype=np.int64)[:, None]
    k = np.arange(kv_len, dtype=np.int64)[None, :]
    return np.broadcast_to(self._eval(q, k), (q_len, kv_len)).astype(bool)

  def __and__(self, other: Mask) -> Mask:
    return _combine(And, self, other)

  def __or__(self, other: Mask) -> Mask:
    return _combine(Or, self, other)


def _combine(cls, a, b) -> Mask:
  if not isinstance(b, Mask):
    return NotImplemented
  if isinstance(a, MultiHeadMask) or isinstance(b, MultiHeadMask):
    ha = a.masks if isinstance(a, MultiHeadMask) else None
    hb = b.masks if isinstance(b, MultiHeadMask) else None
    if ha is not None and hb is not None and len(ha) != len(hb):
      raise ValueError(f"cannot combine per-head masks with {len(ha)} and {len(hb)} heads")
    n = len(ha if ha is not None else hb)
    return MultiHeadMask(tuple(cls(ha[h] if ha else a, hb[h] if hb else b)
                               for h in range(n)))
  return cls(a, b)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  """k <= q + offset (offset = kv_len - q_len aligns the last query with the last key)."""
  offset: int = 0

  def __post_init__(self):
    object.__setattr__(self, "offset", _int("offset", self.offset))

  def predicate(self, q_idx, kv_idx):
    return kv_idx <= q_idx + self.offset

  def row_bounds(self, q_idx):
    return np.zeros_like(q_idx), q_idx + self.offset


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
  """Sliding window: q - left <= k <= q + right (left, right >= 0)."""
  left: int
  right: int = 0

  def __post_init__(self):
    object.__setattr__(self, "left", _int("left", self.left, 0))
    object.__setattr__(self, "right", _int("right", self.right, 0))

  def predicate(self, q_idx, kv_idx):
    return (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)

  def row_bounds(self, q_idx):
    return q_idx - self.left, q_idx + self.right


@dataclasses.dataclass(frozen=True)
class ChunkedCausalMask(Mask):
  """Causal within chunks of `chunk` tokens: q // chunk == k // chunk and k <= q."""
  chunk: int

  def __post_init__(self):
    object.__setattr__(self, "chunk", _int("chunk", self.chunk, 1))

  def predicate(self, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx // self.chunk == kv_idx // self.chunk)

  def row_bounds(self, q_idx):
    return q_idx // self.chunk * self.chunk, q_idx


@dataclasses.dataclass(frozen=True)
class StridedMask(Mask):
  """Sparse Transformer strided: k <= q and ((q - k) < local or (q - k) % stride == 0)."""
  stride: int
  local: int

  def __post_init__(self):
    object.__setattr__(self, "stride", _int("stride", self.stride, 1))
    object.__setattr__(self, "local", _int("local", self.local, 0))

  def predicate(self, q_idx, kv_idx):
    d = q_idx - kv_idx
    return (d >= 0) & ((d < self.local) | (d % self.stride == 0))


@dataclasses.dataclass(frozen=True)
class GlobalMask(Mask):
  """Keys k < num_global are visible to every query (attention sinks); use with `|`."""
  num_global: int

  def __post_init__(self):
    object.__setattr__(self, "num_global", _int("num_global", self.num_global, 1))

  def predicate(self, q_idx, kv_idx):
    return (q_idx >= 0) & (kv_idx < self.num_global)


@dataclasses.dataclass(frozen=True)
class DocumentMask(Mask):
  """Block-diagonal document mask: segment_ids[q] == segment_ids[k].

  segment_ids: static ints (tuple; lists and 1-D arrays are converted), one per
  position, covering both the queries and the keys (len >= max(q_len, kv_len)).
  Defined by stored data, so it has no `predicate` (kernels use stored partial tiles).
  """
  segment_ids: tuple[int, ...]
  has_predicate = False

  def __post_init__(self):
    ids = np.asarray(self.segment_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"segment_ids must be a non-empty 1-D sequence of ints, got "
                       f"{ids.dtype}{list(ids.shape)}")
    object.__setattr__(self, "segment_ids", tuple(int(i) for i in ids))

  def predicate(self, q_idx, kv_idx):
    raise TypeError("DocumentMask is defined by stored segment ids and has no predicate; "
                    "use dense() or mask_info(...).partial_masks")

  def _check_lengths(self, q_len, kv_len):
    if max(q_len, kv_len) > len(self.segment_ids):
      raise ValueError(f"DocumentMask has {len(self.segment_ids)} segment_ids but "
                       f"q_len={q_len}, kv_len={kv_len} need max(q_len, kv_len)")

  def _eval(self, q_idx, kv_idx):
    ids = np.asarray(self.segment_ids)
    return ids[q_idx] == ids[kv_idx]


class _Binary(Mask):
  _op: Any = None

  def __post_init__(self):
    for name in ("a", "b"):
      m = getattr(self, name)
      if not isinstance(m, Mask):
        raise ValueError(f"{type(self).__name__}.{name} must be a Mask, got {m!r}")
      if isinstance(m, MultiHeadMask):
        raise ValueError(f"{type(self).__name__} takes single-head masks; combine a "
                         "MultiHeadMask with `&` / `|`, which apply per head")
    object.__setattr__(self, "has_predicate", self.a.has_predicate and self.b.has_predicate)

  def predicate(self, q_idx, kv_idx):
    return self._op(self.a.predicate(q_idx, kv_idx), self.b.predicate(q_idx, kv_idx))

  def _eval(self, q_idx, kv_idx):
    return self._op(self.a._eval(q_idx, kv_idx), self.b._eval(q_idx, kv_idx))

  def _check_lengths(self, q_len, kv_len):
    self.a._check_lengths(q_len, kv_len)
    self.b._check_lengths(q_len, kv_len)


@dataclasses.dataclass(frozen=True)
class And(_Binary):
  """a ∧ b (e.g. `CausalMask() & LocalMask(128)`)."""
  a: Mask
  b: Mask
  _op = staticmethod(operator.and_)

  def row_bounds(self, q_idx):
    a, b = self.a.row_bounds(q_idx), self.b.row_bounds(q_idx)
    if a is None or b is None:
      return None
    return np.maximum(a[0], b[0]), np.minimum(a[1], b[1])


@dataclasses.dataclass(frozen=True)
class Or(_Binary):
  """a ∨ b (e.g. `LocalMask(128) | GlobalMask(4)`)."""
  a: Mask
  b: Mask
  _op = staticmethod(operator.or_)


@dataclasses.dataclass(frozen=True)
class MultiHeadMask(Mask):
  """Per-head masks: head h uses masks[h]; `dense` -> [H, q_len, kv_len]."""
  masks: tuple[Mask, ...]

  def __post_init__(self):
    masks = tuple(self.masks)
    if not masks:
      raise ValueError("MultiHeadMask needs at least one mask")
    for h, m in enumerate(masks):
      if not isinstance(m, Mask) or isinstance(m, MultiHeadMask):
        raise ValueError(f"masks[{h}] must be a single-head Mask, got {m!r}")
    object.__setattr__(self, "masks", masks)
    object.__setattr__(self, "has_predicate", all(m.has_predicate for m in masks))
    object.__setattr__(self, "num_heads", len(masks))

  def predicate(self, q_idx, kv_idx):
    raise TypeError("MultiHeadMask has no single predicate; use .masks[h].predicate")

  def _check_lengths(self, q_len, kv_len):
    for m in self.masks:
      m._check_lengths(q_len, kv_len)

  def dense(self, q_len: int, kv_len: int) -> np.ndarray:
    """NumPy bool [H, q_len, kv_len]."""
    return np.stack([m.dense(q_len, kv_len) for m in self.masks])


def head_masks(mask: Mask) -> tuple[Mask, ...]:
  """The per-head masks of `mask` (a 1-tuple for a head-independent mask)."""
  return mask.masks if isinstance(mask, MultiHeadMask) else (mask,)


class MaskInfo(NamedTuple):
  """Block-level description of a mask for block-sparse kernels (NumPy, read-only).

  H is the number of per-head masks (1 for a head-independent mask), nq = q_len/block_q,
  nkv = kv_len/block_kv.
    block_kind     int8 [H, nq, nkv]: 0 empty (skip), 1 partial (apply mask), 2 full.
    kv_blocks      int32 [H, nq, max_nnz]: non-empty kv blocks of each q block in
                   increasing order, padded by repeating the row's last valid index (so a
                   kernel prefetching the "next" block never loads a new one for padding;
                   0 for a row with no block). max_nnz >= 1.
    kv_counts      int32 [H, nq]: number of valid entries per row of kv_blocks.
    q_blocks       int32 [H, nkv, max_nnz_t]: the transpose (non-empty q blocks of each
                   kv block, for dk/dv kernels), padded the same way.
    q_counts       int32 [H, nkv].
    partial_masks  bool [P, block_q, block_kv]: the distinct partial tiles (P >= 1; an
                   all-False tile if there are none).
    partial_index  int32 [H, nq, nkv]: index into partial_masks, -1 where not partial.
    nnz            int64 [H]: allowed (q, k) pairs per head.
    block_efficiency  float: Σ nnz / (Σ visited blocks · block_q · block_kv) (1.0 if no
                   block is visited).
  """
  block_kind: np.ndarray
  kv_blocks: np.ndarray
  kv_counts: np.ndarray
  q_blocks: np.ndarray
  q_counts: np.ndarray
  partial_masks: np.ndarray
  partial_index: np.ndarray
  nnz: np.ndarray
  block_efficiency: float
  block_q: int
  block_kv: int

  def kernel_tables(self):
    """The tables the block-sparse kernels take, as one
    `pallas_kernels.block_sparse_attention.BlockTables` (NumPy arrays; a pytree)."""
    from pallas_kernels.block_sparse_attention.tables import BlockTables  # lazy
    return BlockTables(self.kv_blocks, self.kv_counts, self.block_kind,
                       self.partial_masks, self.partial_index, self.q_blocks,
                       self.q_counts)


def block_csr(nonempty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """nonempty bool [H, R, C] -> (indices int32 [H, R, max(1, max count)], counts [H, R])."""
  counts = nonempty.sum(-1).astype(np.int32)
  width = max(1, int(counts.max(initial=0)))
  # Stable sort puts the non-empty columns first, in increasing order.
  order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :width]
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], -1)
  last = np.where(counts[..., None] > 0, last, 0)
  idx = np.where(np.arange(width) < counts[..., None], order, last)
  return idx.astype(np.int32), counts


@functools.lru_cache(maxsize=64)
def _head_blocks(mask: Mask, q_len: int, kv_len: int, bq: int, bkv: int):
  """(block_kind [nq, nkv], tiles {(i, j): bool tile} of partial blocks, nnz)."""
  q = np.arange(q_len, dtype=np.int64)
  bounds = mask.row_bounds(q)
  if bounds is not None:
    return _band_blocks(mask, *bounds, kv_len, bq, bkv)
  nq, nkv = q_len // bq, kv_len // bkv
  kind = np.zeros((nq, nkv), np.int8)
  tiles = {}
  nnz = 0
  k = np.arange(kv_len, dtype=np.int64)[None, :]
  for i in range(nq):
    q = np.arange(i * bq, (i + 1) * bq, dtype=np.int64)[:, None]
    rows = np.broadcast_to(mask._eval(q, k), (bq, kv_len)).astype(bool)
    nnz += int(rows.sum())
    blocks = rows.reshape(bq, nkv, bkv)
    anyb, allb = blocks.any((0, 2)), blocks.all((0, 2))
    kind[i] = np.where(allb, FULL, np.where(anyb, PARTIAL, EMPTY))
    for j in np.flatnonzero(anyb & ~allb):
      tiles[(i, int(j))] = blocks[:, j, :]
  return kind, tiles, nnz


def _band_blocks(mask: Mask, lo: np.ndarray, hi: np.ndarray, kv_len: int, bq: int,
                 bkv: int):
  """`_head_blocks` of a band mask (row q attends to lo[q] <= k <= hi[q]): block kinds
  from the bounds in O(q_len · nkv), elements evaluated only in partial blocks."""
  lo, hi = np.maximum(lo, 0), np.minimum(hi, kv_len - 1)     # empty row: lo > hi
  nq, nkv = len(lo) // bq, kv_len // bkv
  c0 = np.arange(nkv, dtype=np.int64) * bkv                  # block columns [c0, c1]
  c1 = c0 + bkv - 1
  rlo, rhi = lo.reshape(nq, bq, 1), hi.reshape(nq, bq, 1)
  anyb = ((rlo <= c1) & (rhi >= c0) & (rlo <= rhi)).any(1)   # some row meets the block
  allb = (lo.reshape(nq, bq).max(1)[:, None] <= c0) & (hi.reshape(nq, bq).min(1)[:, None] >= c1)
  kind = np.where(allb, FULL, np.where(anyb, PARTIAL, EMPTY)).astype(np.int8)
  tiles = {}
  for i, j in zip(*np.nonzero(anyb & ~allb)):
    qi = np.arange(i * bq, (i + 1) * bq, dtype=np.int64)[:, None]
    kj = np.arange(j * bkv, (j + 1) * bkv, dtype=np.int64)[None, :]
    tiles[(int(i), int(j))] = np.broadcast_to(mask._eval(qi, kj), (bq, bkv)).astype(bool)
  return kind, tiles, int(np.maximum(hi - lo + 1, 0).sum())


def mask_info(mask: Mask, q_len: int, kv_len: int, block_q: int,
              block_kv: int) -> MaskInfo:
  """Block info of `mask` for a [q_len, kv_len] attention tiled [block_q, block_kv].

  Trace-time NumPy (cached); q_len and kv_len must be multiples of block_q and
  block_kv. Cost, once per (mask, shape): O(H · q_len · kv_len) NumPy work, or for band
  masks (`Mask.row_bounds`: causal, local, chunked and their `&`) O(q_len · kv_len /
  block_kv) plus the elements of the partial blocks (32k causal: 0.03 s instead of 9 s).
  """
  if not isinstance(mask, Mask):
    raise ValueError(f"mask must be a sparsejax.ops.masks.Mask, got {mask!r}")
  q_len = _int("q_len", q_len, 1)
  kv_len = _int("kv_len", kv_len, 1)
  block_q = _int("block_q", block_q, 1)
  block_kv = _int("block_kv", block_kv, 1)
  if q_len % block_q:
    raise ValueError(f"q_len={q_len} must be a multiple of block_q={block_q}")
  if kv_len % block_kv:
    raise ValueError(f"kv_len={kv_len} must be a multiple of block_kv={block_kv}")
  mask._check_lengths(q_len, kv_len)
  return _mask_info(mask, q_len, kv_len, block_q, block_kv)


@functools.lru_cache(maxsize=64)
def _mask_info(mask: Mask, q_len: int, kv_len: int, block_q: int,
               block_kv: int) -> MaskInfo:
  heads = [_head_blocks(m, q_len, kv_len, block_q, block_kv) for m in head_masks(mask)]
  kind = np.stack([h[0] for h in heads])
  partial_index = np.full(kind.shape, -1, np.int32)
  unique: dict[bytes, int] = {}
  stored = []
  for h, (_, tiles, _) in enumerate(heads):
    for (i, j), tile in tiles.items():
      key = np.packbits(tile).tobytes()
      if key not in unique:
        unique[key] = len(stored)
        stored.append(tile)
      partial_index[h, i, j] = unique[key]
  if not stored:
    stored.append(np.zeros((block_q, block_kv), bool))
  kv_blocks, kv_counts = block_csr(kind > 0)
  q_blocks, q_counts = block_csr(np.swapaxes(kind, 1, 2) > 0)
  nnz = np.array([h[2] for h in heads], np.int64)
  visited = int(kv_counts.sum())
  eff = float(nnz.sum()) / (visited * block_q * block_kv) if visited else 1.0
  info = MaskInfo(kind, kv_blocks, kv_counts, q_blocks, q_counts,
                  np.stack(stored), partial_index, nnz, eff, block_q, block_kv)
  for a in info:
    if isinstance(a, np.ndarray):
      a.setflags(write=False)
  return info
