"""Block-sparse weight matmul: y = x · W with W stored as its nonzero blocks.

Format (W [K, N] in Flax layout, inputs × outputs, tiled into (bh × bw) blocks on a
(K/bh) × (N/bw) block grid):

    w_blocks     [nnz, bh, bw]  the stored blocks (x's dtype);
    block_index  int [nnz, 2]   (row block, column block) of each stored block;

    W = Σ_b  E(block_index[b]) ⊗ w_blocks[b]         y[..., :] = x[..., :] · W

`to_block_sparse(w, mask, block)` builds it from a dense weight and an element or block
mask (blocks ordered by column block, then row block); `from_block_sparse` rebuilds
the dense W. Blocks stored twice at one position add up. Gradients: ∂L/∂x = ∂L/∂y · Wᵀ
and ∂L/∂w_blocks[b] = x[..., row(b)]ᵀ · ∂L/∂y[..., col(b)] — the stored blocks only
(a `jax.custom_vjp` in every impl). Invalid indices follow the library's rule: a block
whose row or column block is outside the grid contributes exactly zero and gets a zero
gradient (`check_indices=True` adds a `checkify` check instead). No tokens or no stored
block give zeros.

The impls gather by index tables (`block_tables`): per output column block the stored
blocks of that column (width Mc, padded), and per input row block those of that row
(width Mr, for dx). With a concrete `block_index` (NumPy, or a constant jax array) Mc,
Mr are the exact maxima; a traced one (inside jit) takes `max_blocks_per_col` /
`max_blocks_per_row`, default the whole grid (K/bh, N/bw: correct but as slow as dense
for the kernels' padded grid steps). Blocks past a too small bound would be dropped:
`check_indices=True` checks the bounds too.

impl: "xla" (gathers x's row blocks per column block and runs one batched matmul over
the column blocks, FLOPs = density × dense; backward the same over the row table and
per stored block), "pallas" / "interpret" (`pallas_kernels.block_sparse_matmul`: TPU
grid over token tiles × column blocks × the column's stored blocks via scalar-prefetched
tables; GPU Triton loops over the same tables), "auto" (`resolve_impl`: the kernel on
TPU/GPU when `kernel_unmet` finds nothing unmet, else XLA with one warning). Under a
multi-device mesh the kernel runs inside `jax.shard_map` with tokens split over the
batch axes and the weight replicated (`shard_kernel`).

Roofline: FLOPs 2·M·nnz·bh·bw per pass (density × dense); bytes nnz·bh·bw·b (stored
blocks) + M·K·b (x) + M·N·b (y).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from sparsejax.ops.dispatch import check_impl, kernel_platform, resolve_impl
from sparsejax.ops.sparse_attention import shard_kernel
from sparsejax.ops.topk import static_int

TABLE_FIELDS = ("col_rows", "col_slots", "col_counts", "row_cols", "row_slots",
                "row_counts", "block_rows", "block_cols", "block_valid")


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
  """(K/bh, N/bw) for a [K, N] weight tiled by `block` = (bh, bw); ValueError when a
  block size is < 1 or does not divide its dim."""
  if len(shape) != 2 or len(block) != 2:
    raise ValueError(f"shape {shape} and block {block} must be (rows, cols) pairs")
  for name, b, d in (("bh", block[0], shape[0]), ("bw", block[1], shape[1])):
    b = static_int(b, name)
    if b < 1 or d % b:
      raise ValueError(f"block {name}={b} must be >= 1 and divide the weight dim {d} "
                       f"(weight [{shape[0]}, {shape[1]}])")
  return shape[0] // block[0], shape[1] // block[1]


def to_block_sparse(w, mask, block: tuple[int, int]):
  """(w_blocks [nnz, bh, bw], block_index int32 [nnz, 2]) of a dense W [K, N].

  `mask` (concrete, NumPy-convertible) is bool [K, N] (kept elements: a block is
  stored when any of its elements is kept, and its dropped elements are stored as 0)
  or bool [K/bh, N/bw] (kept blocks). Blocks are ordered by column block, then row
  block. `w` may be traced.
  """
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"w must be 2-D [in, out], got shape {w.shape}")
  nbr, nbc = block_grid(w.shape, block)
  bh, bw = block
  mask = np.asarray(mask, bool)
  if mask.shape == w.shape:
    w = jnp.where(mask, w, jnp.zeros((), w.dtype))
    mask = mask.reshape(nbr, bh, nbc, bw).any(axis=(1, 3))
  elif mask.shape != (nbr, nbc):
    raise ValueError(f"mask has shape {mask.shape}; expected the weight's {w.shape} or "
                     f"the block grid's ({nbr}, {nbc})")
  cols, rows = np.nonzero(mask.T)                      # column-major order
  index = np.stack([rows, cols], axis=1).astype(np.int32)
  tiles = w.reshape(nbr, bh, nbc, bw).transpose(0, 2, 1, 3)
  return tiles[rows, cols], index


def from_block_sparse(w_blocks, block_index, shape: tuple[int, int]) -> jax.Array:
  """The dense W [K, N] (w_blocks' dtype): stored blocks placed on the grid, blocks at
  one position added, invalid positions dropped."""
  w_blocks, block_index = _check_format(w_blocks, block_index)
  nbr, nbc = block_grid(shape, w_blocks.shape[1:])
  bh, bw = w_blocks.shape[1:]
  r, c = block_index[:, 0], block_index[:, 1]
  ok = (r >= 0) & (r < nbr) & (c >= 0) & (c < nbc)
  flat = jnp.where(ok, r * nbc + c, nbr * nbc)
  grid = jnp.zeros((nbr * nbc, bh, bw), w_blocks.dtype).at[flat].add(w_blocks,
                                                                    mode="drop")
  return grid.reshape(nbr, nbc, bh, bw).transpose(0, 2, 1, 3).reshape(shape)


def _check_format(w_blocks, block_index):
  """(w_blocks, int32 block_index), the index kept NumPy when it is concrete (a jnp
  op inside jit would make it a tracer)."""
  w_blocks = jnp.asarray(w_blocks)
  known = _concrete(block_index)
  block_index = jnp.asarray(block_index) if known is None else known
  if w_blocks.ndim != 3:
    raise ValueError(f"w_blocks must be 3-D [nnz, bh, bw], got shape {w_blocks.shape}")
  if not jnp.issubdtype(block_index.dtype, jnp.integer):
    raise TypeError(f"block_index must be integers, got dtype {block_index.dtype}")
  if block_index.shape != (w_blocks.shape[0], 2):
    raise ValueError(f"block_index has shape {block_index.shape}; expected "
                     f"({w_blocks.shape[0]}, 2) (row block, column block per stored "
                     "block)")
  return w_blocks, block_index.astype(np.int32)


def _concrete(a) -> np.ndarray | None:
  try:
    return np.asarray(a)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _bound(given, counts: np.ndarray | None, worst: int, name: str) -> int:
  """Table width: `given` (checked against concrete counts), the concrete maximum,
  else the worst case."""
  if given is not None:
    given = static_int(given, name)
    if given < 1:
      raise ValueError(f"{name}={given} must be >= 1")
    if counts is not None and counts.size and counts.max() > given:
      raise ValueError(f"{name}={given} is below the {counts.max()} stored blocks of "
                       "one block line")
    return given
  if counts is None:
    return worst
  return max(1, int(counts.max()) if counts.size else 1)


def _csr(major, minor, valid, n_major: int, n_minor: int, width: int):
  """(minor [n_major, width], slot [n_major, width], counts [n_major]) of the valid
  (major, minor) pairs sorted by major then minor; padded slots repeat the last valid
  one (0 for an empty line); counts are clipped to `width`."""
  nnz = major.shape[0]
  key = jnp.where(valid, major * n_minor + minor, n_major * n_minor)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  line = jnp.where(valid, major, n_major)
  counts = jnp.zeros((n_major,), jnp.int32).at[line].add(1, mode="drop")
  starts = jnp.cumsum(counts) - counts
  sline = line[order]
  pos = jnp.arange(nnz, dtype=jnp.int32) - starts[jnp.minimum(sline, n_major - 1)]
  table = jnp.full((n_major, width), -1, jnp.int32).at[sline, pos].set(order,
                                                                       mode="drop")
  slot = jnp.arange(width, dtype=jnp.int32)
  last = jnp.clip(jnp.minimum(slot[None], counts[:, None] - 1), 0, width - 1)
  slots = jnp.maximum(jnp.take_along_axis(table, last, axis=1), 0)
  return minor[slots], slots, jnp.minimum(counts, width)


def _csr_numpy(major, minor, valid, n_major: int, n_minor: int, width: int):
  """`_csr` for concrete (NumPy) inputs, evaluated here: the tables become constants
  of the program (no device op runs, so it also works under a compile-only mesh)."""
  del n_minor
  order = np.lexsort((minor, np.where(valid, major, n_major)))
  order = order[valid[order]].astype(np.int32)                  # the valid, sorted
  counts = np.bincount(major[order], minlength=n_major).astype(np.int32)
  pos = np.arange(order.size) - (np.cumsum(counts) - counts)[major[order]]
  table = np.zeros((n_major, width), np.int32)
  fits = pos < width
  table[major[order][fits], pos[fits]] = order[fits]
  last = np.clip(np.minimum(np.arange(width)[None], counts[:, None] - 1), 0, None)
  slots = np.take_along_axis(table, last, axis=1)
  return minor[slots], slots, np.minimum(counts, width)


def block_tables(block_index, shape: tuple[int, int], block: tuple[int, int], *,
                 max_blocks_per_col: int | None = None,
                 max_blocks_per_row: int | None = None) -> dict[str, jax.Array]:
  """The index tables of the kernels and the XLA path (`TABLE_FIELDS`, int32):
  col_rows / col_slots [nbc, Mc], col_counts [nbc]; row_cols / row_slots [nbr, Mr],
  row_counts [nbr]; block_rows / block_cols (clamped into the grid) and block_valid
  [nnz]. Widths: see the module docstring."""
  nbr, nbc = block_grid(shape, block)
  known = _concrete(block_index)
  xp, csr = (jnp, _csr) if known is None else (np, _csr_numpy)
  block_index = xp.asarray(block_index if known is None else known).astype(xp.int32)
  r, c = block_index[:, 0], block_index[:, 1]
  valid = (r >= 0) & (r < nbr) & (c >= 0) & (c < nbc)
  col_counts = row_counts = None
  if known is not None:
    col_counts = np.bincount(c[valid], minlength=nbc)
    row_counts = np.bincount(r[valid], minlength=nbr)
  mc = _bound(max_blocks_per_col, col_counts, nbr, "max_blocks_per_col")
  mr = _bound(max_blocks_per_row, row_counts, nbc, "max_blocks_per_row")
  rows, cols = xp.clip(r, 0, nbr - 1), xp.clip(c, 0, nbc - 1)
  col_rows, col_slots, col_n = csr(cols, rows, valid, nbc, nbr, mc)
  row_cols, row_slots, row_n = csr(rows, cols, valid, nbr, nbc, mr)
  return dict(col_rows=col_rows, col_slots=col_slots, col_counts=col_n,
              row_cols=row_cols, row_slots=row_slots, row_counts=row_n,
              block_rows=rows, block_cols=cols, block_valid=valid.astype(xp.int32))


def check_block_index(block_index, shape, block, max_blocks_per_col=None,
                      max_blocks_per_row=None) -> None:
  """`checkify.check`s that every block is inside the grid and that no column (row)
  block holds more than max_blocks_per_col (max_blocks_per_row) of them."""
  nbr, nbc = block_grid(shape, block)
  r, c = block_index[:, 0], block_index[:, 1]
  if block_index.shape[0]:
    checkify.check(jnp.all((r >= 0) & (r < nbr) & (c >= 0) & (c < nbc)),
                   f"block_sparse_matmul: block_index must be in [0, {nbr}) x [0, {nbc}) "
                   "(row, column blocks); got rows in [{rlo}, {rhi}], columns in "
                   "[{clo}, {chi}]", rlo=jnp.min(r), rhi=jnp.max(r), clo=jnp.min(c),
                   chi=jnp.max(c))
  for name, bound, line, n in (("max_blocks_per_col", max_blocks_per_col, c, nbc),
                               ("max_blocks_per_row", max_blocks_per_row, r, nbr)):
    if bound is not None:
      most = jnp.max(jnp.zeros((n,), jnp.int32).at[line].add(1, mode="drop"))
      checkify.check(most <= bound, f"block_sparse_matmul: a block line holds {{most}} "
                     f"stored blocks, over {name}={bound}", most=most)


def _tables(block_index, shape, block, max_per_col, max_per_row):
  """`block_tables`: NumPy constants of the program for a concrete index; behind an
  optimization barrier for a traced one, so that XLA does not fuse (and recompute per
  gathered element) the sort and scatters that build them."""
  t = block_tables(block_index, shape, block, max_blocks_per_col=max_per_col,
                   max_blocks_per_row=max_per_row)
  return t if _concrete(block_index) is not None else lax.optimization_barrier(t)


# ----------------------------------------------------------------------------- XLA path

def _dot(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _gather_blocks(w_blocks, slots, counts):
  """w_blocks[slots] [L, width, bh, bw] with the padded slots (>= count) zeroed."""
  live = jnp.arange(slots.shape[1])[None] < counts[:, None]
  return jnp.where(live[..., None, None], w_blocks[slots], jnp.zeros((), w_blocks.dtype))


def _lines(a, n: int, b: int):
  """a [M, n·b] -> [n, M, b]: one [M, b] slab per block line (gathers whole slabs)."""
  return a.reshape(a.shape[0], n, b).transpose(1, 0, 2)


def _xla_forward(x, w_blocks, t):
  m, (bh, bw) = x.shape[0], w_blocks.shape[1:]
  nbr, nbc = t["row_counts"].shape[0], t["col_counts"].shape[0]
  xg = _lines(x, nbr, bh)[t["col_rows"]]                        # [nbc, Mc, M, bh]
  wg = _gather_blocks(w_blocks, t["col_slots"], t["col_counts"])  # [nbc, Mc, bh, bw]
  y = _dot("jsmk,jskc->jmc", xg, wg).astype(x.dtype)            # batched over columns
  return y.transpose(1, 0, 2).reshape(m, nbc * bw)


@jax.custom_vjp
def _xla_matmul(x, w_blocks, t):
  return _xla_forward(x, w_blocks, t)


def _xla_fwd(x, w_blocks, t):
  return _xla_forward(x, w_blocks, t), (x, w_blocks, t)


def _xla_bwd(res, dy):
  x, w_blocks, t = res
  m, (bh, bw) = x.shape[0], w_blocks.shape[1:]
  nbr, nbc = t["row_counts"].shape[0], t["col_counts"].shape[0]
  dyl = _lines(dy.astype(x.dtype), nbc, bw)                       # [nbc, M, bw]
  wg = _gather_blocks(w_blocks, t["row_slots"], t["row_counts"])  # [nbr, Mr, bh, bw]
  dx = _dot("rsmc,rskc->rmk", dyl[t["row_cols"]], wg).astype(x.dtype)
  dw = _dot("bmk,bmc->bkc", _lines(x, nbr, bh)[t["block_rows"]], dyl[t["block_cols"]])
  dw = jnp.where(t["block_valid"][:, None, None] != 0, dw, 0.0).astype(w_blocks.dtype)
  return dx.transpose(1, 0, 2).reshape(m, nbr * bh), dw, None


_xla_matmul.defvjp(_xla_fwd, _xla_bwd)


# --------------------------------------------------------------------------------- op

def _kernel_matmul(x, w_blocks, t, interpret: bool):
  from pallas_kernels.block_sparse_matmul import (BlockSparseTables,  # lazy: optional
                                                  block_sparse_matmul_kernel)
  backend = kernel_platform()

  def run(x, w_blocks, *fields):
    return block_sparse_matmul_kernel(x, w_blocks, BlockSparseTables(*fields),
                                      interpret=interpret, backend=backend)

  fields = [t[f] for f in TABLE_FIELDS]
  return shard_kernel(run, (x, w_blocks, *fields),
                      ((0, None), (None, None), *[(None, None)] * len(fields)),
                      (0, None), heads=())


def block_sparse_matmul(x: jax.Array, w_blocks: jax.Array, block_index, *,
                        out_features: int, max_blocks_per_col: int | None = None,
                        max_blocks_per_row: int | None = None, impl: str = "auto",
                        check_indices: bool = False) -> jax.Array:
  """y = x · W for W [K, N] stored as blocks (see the module docstring).

  Args:
    x: [..., K] float32 / bfloat16 (other float dtypes run the XLA path).
    w_blocks: [nnz, bh, bw], x's dtype; bh divides K and bw divides N.
    block_index: int [nnz, 2] (row block in [0, K/bh), column block in [0, N/bw)).
    out_features: N (static).
    max_blocks_per_col, max_blocks_per_row: static table widths for a traced
      block_index (a concrete one gives the exact widths; given ones are checked).
    impl: "auto" | "xla" | "pallas" | "interpret" (`sparsejax.ops.dispatch`).
    check_indices: `checkify.check` the indices (and the bounds) instead of zeroing
      invalid blocks silently.

  Returns:
    y [..., N] in x.dtype; differentiable in x and w_blocks.
  """
  x = jnp.asarray(x)
  w_blocks, block_index = _check_format(w_blocks, block_index)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"block_sparse_matmul: x must be floating point, got {x.dtype}")
  if w_blocks.dtype != x.dtype:
    raise TypeError(f"block_sparse_matmul: w_blocks dtype {w_blocks.dtype} must equal "
                    f"x's dtype {x.dtype} (cast one of them)")
  if x.ndim < 1:
    raise ValueError("block_sparse_matmul: x must have at least one axis [..., K]")
  n = static_int(out_features, "out_features")
  k = x.shape[-1]
  block = w_blocks.shape[1:]
  block_grid((k, n), block)
  if check_indices:
    check_block_index(block_index, (k, n), block, max_blocks_per_col,
                      max_blocks_per_row)
  lead = x.shape[:-1]
  if x.size == 0 or w_blocks.shape[0] == 0:
    check_impl(impl)
    return jnp.zeros((*lead, n), x.dtype)
  t = _tables(block_index, (k, n), block, max_blocks_per_col, max_blocks_per_row)
  unmet = None
  if impl != "xla":
    from pallas_kernels.block_sparse_matmul import kernel_unmet  # lazy: optional
    unmet = kernel_unmet(k, n, block, x.dtype, w_blocks.dtype, kernel_platform(),
                         (t["col_rows"].shape[1], t["row_cols"].shape[1]))
  impl = resolve_impl(impl, op="block_sparse_matmul", unmet=unmet)
  x2d = x.reshape(-1, k)
  if impl == "xla":
    y = _xla_matmul(x2d, w_blocks, t)
  else:
    y = _kernel_matmul(x2d, w_blocks, t, impl == "interpret")
  return y.reshape(*lead, n)


__all__ = ["block_sparse_matmul", "to_block_sparse", "from_block_sparse", "block_tables",
           "block_grid", "check_block_index"]
