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

The pattern is fixed and static (NumPy, from the options, the block index and the
projection's name, never stored in the params): "random" (seeded) or "diagonal"
(column block j keeps row blocks j·k, ..., j·k + k − 1 mod in/bh). Both are balanced:
every column block holds k blocks and every row block ⌊·⌋ or ⌈nnz / (in/bh)⌉, so the
kernels' tables are as narrow as possible. `block_pattern` gives a projection's
`block_index`; `from_block_sparse` of the params and that index is the dense masked
weight the layer computes with. A block larger than a weight dim is clamped to it; a
block that does not divide it raises, naming `config.model.linear_options.block`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np

from sparsejax.layers import registry
from sparsejax.layers.dense import Dense
from sparsejax.ops.block_sparse_matmul import block_sparse_matmul
from sparsejax.ops.dispatch import IMPLS
from sparsejax.validation import ConfigError, check, check_choice

PATTERNS = ("random", "diagonal")
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


class BlockSparseDense(Dense):
  """y = x · W with W [in, out] stored as balanced (bh × bw) blocks (module docstring).

  x: [..., *in_dims] (the last `contract_dims` axes, flattened to in); y: [...,
  *features] in `dtype`. Param "w_blocks" [nnz, bh, bw] (init normal(0, init_std),
  replicated: no logical mesh axes). `layer` seeds the pattern with the module name.
  """
  block: tuple[int, int] = (128, 128)
  density: float = 0.25
  pattern: str = "random"
  seed: int = 0
  layer: int = 0
  impl: str = "auto"

  def weight_layout(self, in_dims) -> tuple[tuple[int, int], tuple[int, int], np.ndarray]:
    """((in, out), clamped block, block_index) of this projection."""
    shape = (math.prod(in_dims), math.prod(self.features))
    block = clamp_block(self.block, shape, f" for {self.name} ({shape[0]} x {shape[1]})")
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
  pattern: str = "random"               # "random" (seeded) | "diagonal"
  seed: int = 0
  impl: str = "auto"                    # block_sparse_matmul impl (ops.dispatch.IMPLS)

  def validate(self, prefix: str) -> None:
    check(len(self.block) == 2 and min(self.block) >= 1, f"{prefix}.block", self.block,
          "two block sizes (bh, bw) >= 1")
    check(0 < self.density <= 1, f"{prefix}.density", self.density,
          "in (0, 1] (the fraction of row blocks kept per output column block)")
    check_choice(f"{prefix}.pattern", self.pattern, PATTERNS)
    check_choice(f"{prefix}.impl", self.impl, IMPLS)


@registry.register("linear", "block_sparse", options=BlockSparseLinearOptions)
def build_block_sparse(cfg, options: BlockSparseLinearOptions, layer):
  del cfg
  return functools.partial(BlockSparseDense, layer=layer, **dataclasses.asdict(options))
