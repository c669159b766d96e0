"""Block-sparse linear projections: the "block_sparse" entry of the linear registry.

    config.model.linear = "block_sparse"
    config.model.linear_options = dict(block=(128, 128), density=0.25,
                                       pattern="random", seed=0, impl="auto")

Every projection's weight W [in, out] (in = the flattened contracted dims, out = the
flattened features) is tiled into (bh × bw) blocks and only k = max(1, round(density ·
in/bh)) blocks per output column block are stored: the params hold "w_blocks" [nnz,
bh, bw] (nnz = k · out/bw) and nothing else, and y = x · W runs through
`sparsejax.ops.block_sparse_matmul` (XLA, or the Pallas kernels with `impl`), so
FLOPs and weight bytes scale with the density — the structure block-granular pruning
(e.g. magnitude or Wanda scores summed per block, the same k kept per output block
column, as Wanda keeps the same count per output) leaves behind.

The pattern is fixed and static (NumPy, never stored in the params, so the kernels'
tables are program constants): "random" (seeded by `seed`, the block index and the
projection's name) or "diagonal" (column block j keeps row blocks j·k, ..., j·k + k − 1
mod in/bh) — both balanced: every column block holds k blocks and every row block ⌊·⌋
or ⌈nnz / (in/bh)⌉ — or "file": the fixed patterns of a pruned model, one block_index
per projection path in the .npz `pattern_file` (density unused). `prune_to_block_sparse`
prunes a dense model's projection kernels with block granularity (the k blocks of
largest L1 norm per output column block) into the "w_blocks" params and those patterns;
`save_patterns` writes the file:

    params, patterns = prune_to_block_sparse(dense_params, block=(128, 128), density=0.25)
    save_patterns("run/patterns.npz", patterns, block=(128, 128))
    config.model.linear_options = dict(block=(128, 128), pattern="file",
                                       pattern_file="run/patterns.npz")

`block_pattern` gives a "random" / "diagonal" projection's `block_index`;
`from_block_sparse` of the params and the index is the dense masked weight the layer
computes with. A block larger than a weight dim is clamped to it; a block that does not
divide it raises, naming `config.model.linear_options.block`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.layers import registry
from sparsejax.layers.dense import Dense
from sparsejax.ops.block_sparse_matmul import block_sparse_matmul, to_block_sparse
from sparsejax.ops.dispatch import IMPLS
from sparsejax.validation import ConfigError, check, check_choice

PATTERNS = ("random", "diagonal", "file")
BLOCK_KEY = "__block__"            # the patterns file's (bh, bw) entry
FIELD = "config.model.linear_options"


def blocks_per_column(density: float, row_blocks: int) -> int:
  """k = min(row_blocks, max(1, round(density · row_blocks)))."""
  return min(row_blocks, max(1, round(density * row_blocks)))


def clamp_block(block: tuple[int, int], shape: tuple[int, int],
                where: str = "") -> tuple[int, int]:
  """`block` with each size clamped to its weight dim; ConfigError naming
  config.model.linear_options.block when a size does not divide its dim."""
  out = tuple(min(b, d) for b, d in zip(block, shape))
  for name, b, d in (("bh", out[0], shape[0]), ("bw", out[1], shape[1])):
    if d % b:
      raise ConfigError(f"{FIELD}.block={tuple(block)} is invalid{where}: {name}={b} must "
                        f"divide the weight dim {d} (weight {shape[0]} x {shape[1]})")
  return out


def block_pattern(shape: tuple[int, int], block: tuple[int, int], density: float,
                  pattern: str, seed: int, name: str = "") -> np.ndarray:
  """block_index int32 [nnz, 2] of a [in, out] weight (block already clamped): k row
  blocks per column block (`blocks_per_column`), ordered by column then row."""
  nbr, nbc = shape[0] // block[0], shape[1] // block[1]
  k = blocks_per_column(density, nbr)
  slot = np.arange(nbc)[:, None] * k + np.arange(k)[None]        # [nbc, k], distinct
  rows = slot % nbr                                              # rows per column
  if pattern == "random":
    rng = np.random.default_rng(zlib.crc32(f"{seed}/{name}".encode()))
    rows = rng.permutation(nbr)[rows[rng.permutation(nbc)]]
  elif pattern != "diagonal":
    raise ConfigError(f"{FIELD}.pattern={pattern!r} is invalid: must be one of "
                      f"{sorted(PATTERNS)}")
  rows = np.sort(rows, axis=1)
  cols = np.repeat(np.arange(nbc), k)
  return np.stack([rows.reshape(-1), cols], axis=1).astype(np.int32)


@functools.lru_cache(maxsize=8)
def load_patterns(path: str) -> dict[str, np.ndarray]:
  """{projection path: block_index int32 [nnz, 2], BLOCK_KEY: (bh, bw)} of a patterns
  file (ConfigError naming linear_options.pattern_file when it cannot be read)."""
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ConfigError(f"{FIELD}.pattern_file={path!r} is invalid: {e}") from None


def save_patterns(path: str, patterns: dict[str, np.ndarray],
                  block: tuple[int, int]) -> None:
  """Writes `patterns` ({projection path: block_index}) and `block` as a .npz."""
  np.savez(path, **{k: np.asarray(v, np.int32) for k, v in patterns.items()},
           **{BLOCK_KEY: np.asarray(block, np.int32)})
  load_patterns.cache_clear()


def _file_pattern(path: str, key: str, block: tuple[int, int], grid: tuple[int, int]):
  patterns = load_patterns(path)
  saved = tuple(int(b) for b in patterns.get(BLOCK_KEY, ()))
  if saved != tuple(block):
    raise ConfigError(f"{FIELD}.block={tuple(block)} is invalid: the pattern file "
                      f"{path!r} was written for blocks {saved}")
  if key not in patterns:
    raise ConfigError(f"{FIELD}.pattern_file={path!r} is invalid: it has no pattern for "
                      f"the projection {key!r}")
  index = patterns[key]
  if index.ndim != 2 or index.shape[1] != 2 or np.any(index < 0) or np.any(
      index >= np.asarray(grid)):
    raise ConfigError(f"{FIELD}.pattern_file={path!r} is invalid: the pattern of {key!r} "
                      f"must be [nnz, 2] blocks inside the {grid[0]} x {grid[1]} grid")
  return index.astype(np.int32)


def _projections(params, prefix=()):
  """(path, kernel) of every dict holding a "kernel" (the linear projections)."""
  for name, sub in params.items():
    if isinstance(sub, dict) and "kernel" in sub:
      yield prefix + (name,), sub["kernel"]
    elif isinstance(sub, dict):
      yield from _projections(sub, prefix + (name,))


def prune_to_block_sparse(params, *, block: tuple[int, int], density: float,
                          contract_dims: dict[str, int] | None = None):
  """(params with every projection's "kernel" replaced by "w_blocks", {path:
  block_index}) of a dense model's params: per output column block the k =
  `blocks_per_column` row blocks of largest L1 norm are kept (ties: lower row).

  `contract_dims`: input dims of a kernel by projection name (default {"o_proj": 2},
  the attention output over heads × head_dim; every other projection 1). Embeddings
  and other params are kept as they are.
  """
  contract_dims = {"o_proj": 2, **(contract_dims or {})}
  patterns, out = {}, jax.tree.map(lambda x: x, params)
  for path, kernel in _projections(params):
    c = contract_dims.get(path[-1], 1)
    shape = (math.prod(kernel.shape[:c]), math.prod(kernel.shape[c:]))
    blk = clamp_block(block, shape, f" for {'/'.join(path)}")
    nbr, nbc = shape[0] // blk[0], shape[1] // blk[1]
    w = np.asarray(kernel, np.float32).reshape(nbr, blk[0], nbc, blk[1])
    score = np.abs(w).sum(axis=(1, 3))                              # [nbr, nbc]
    keep = np.argsort(-score, axis=0, kind="stable")[:blocks_per_column(density, nbr)]
    mask = np.zeros((nbr, nbc), bool)
    mask[keep, np.arange(nbc)[None]] = True
    w_blocks, index = to_block_sparse(jnp.asarray(kernel).reshape(shape), mask, blk)
    node = out
    for name in path[:-1]:
      node = node[name]
    node[path[-1]] = {**{k: v for k, v in node[path[-1]].items() if k != "kernel"},
                      "w_blocks": w_blocks}
    patterns["/".join(path)] = index
  return out, patterns


class BlockSparseDense(Dense):
  """y = x · W with W [in, out] stored as balanced (bh × bw) blocks (module docstring).

  x: [..., *in_dims] (the last `contract_dims` axes, flattened to in); y: [...,
  *features] in `dtype`. Param "w_blocks" [nnz, bh, bw] (init normal(0, init_std),
  replicated: no logical mesh axes). `layer` seeds the pattern with the module name.
  """
  block: tuple[int, int] = (128, 128)
  density: float = 0.25
  pattern: str = "random"
  pattern_file: str = ""
  seed: int = 0
  layer: int = 0
  impl: str = "auto"

  def weight_layout(self, in_dims) -> tuple[tuple[int, int], tuple[int, int], np.ndarray]:
    """((in, out), clamped block, block_index) of this projection."""
    shape = (math.prod(in_dims), math.prod(self.features))
    block = clamp_block(self.block, shape, f" for {self.name} ({shape[0]} x {shape[1]})")
    if self.pattern == "file":
      grid = (shape[0] // block[0], shape[1] // block[1])
      return shape, block, _file_pattern(self.pattern_file, "/".join(self.path), block,
                                         grid)
    index = block_pattern(shape, block, self.density, self.pattern, self.seed,
                          f"{self.layer}/{self.name}")
    return shape, block, index

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:x.ndim - self.contract_dims]
    in_dims = x.shape[x.ndim - self.contract_dims:]
    (k, n), block, index = self.weight_layout(in_dims)
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                        (None, None, None))
    w_blocks = self.param("w_blocks", init, (len(index), *block), self.param_dtype)
    y = block_sparse_matmul(x.astype(self.dtype).reshape(*lead, k),
                            w_blocks.astype(self.dtype), index, out_features=n,
                            impl=self.impl)
    return y.reshape(*lead, *self.features)


@dataclasses.dataclass(frozen=True)
class BlockSparseLinearOptions:
  """Options of the "block_sparse" linear (`config.model.linear_options`)."""
  KERNEL_IMPL_FIELDS: ClassVar[tuple[str, ...]] = ("impl",)
  block: tuple[int, int] = (128, 128)   # (bh, bw); clamped to small weight dims
  density: float = 0.25                 # fraction of row blocks kept per column block
  pattern: str = "random"               # "random" (seeded) | "diagonal" | "file"
  pattern_file: str = ""                # .npz of pruned patterns (pattern="file")
  seed: int = 0
  impl: str = "auto"                    # block_sparse_matmul impl (ops.dispatch.IMPLS)

  def validate(self, prefix: str) -> None:
    check(len(self.block) == 2 and min(self.block) >= 1, f"{prefix}.block", self.block,
          "two block sizes (bh, bw) >= 1")
    check(0 < self.density <= 1, f"{prefix}.density", self.density,
          "in (0, 1] (the fraction of row blocks kept per output column block)")
    check_choice(f"{prefix}.pattern", self.pattern, PATTERNS)
    check((self.pattern == "file") == bool(self.pattern_file), f"{prefix}.pattern_file",
          self.pattern_file, "a .npz path exactly when pattern='file'")
    check_choice(f"{prefix}.impl", self.impl, IMPLS)


@registry.register("linear", "block_sparse", options=BlockSparseLinearOptions)
def build_block_sparse(cfg, options: BlockSparseLinearOptions, layer):
  del cfg
  return functools.partial(BlockSparseDense, layer=layer, **dataclasses.asdict(options))
