"""The mask's block tables, handed to the block-sparse kernels as one object.

`BlockTables` is what `sparsejax.ops.masks.MaskInfo.kernel_tables()` returns (this
package imports nothing from sparsejax); `slot_tables` derives the per-CSR-slot tables
the kernels index.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jax import lax
import jax.numpy as jnp


class BlockTables(NamedTuple):
  """Block tables of a mask tiled [block_q, block_kv] (NumPy or jax integer arrays).

  Hm = 1 (one mask for every head) or Hq (per-head masks); nq = T / block_q,
  nkv = S / block_kv. A NamedTuple, so a pytree: it crosses `jax.jit`,
  `jax.shard_map` and `jax.custom_vjp` as its seven arrays.
    kv_blocks      int32 [Hm, nq, M]   non-empty kv blocks per q block (CSR, in
                                       increasing order, padded by repeating the last
                                       valid index), M >= 1;
    kv_counts      int32 [Hm, nq]      valid entries per row of kv_blocks;
    block_kind     int8 [Hm, nq, nkv]  0 empty / 1 partial / 2 full;
    partial_masks  bool [P, bq, bkv]   the distinct partial tiles (P >= 1); their shape
                                       gives block_q, block_kv;
    partial_index  int32 [Hm, nq, nkv] tile of each partial block (-1 elsewhere);
    q_blocks       int32 [Hm, nkv, Mt] the transposed CSR (non-empty q blocks per kv
                                       block, for dk/dv), q_counts int32 [Hm, nkv].
  """
  kv_blocks: Any
  kv_counts: Any
  block_kind: Any
  partial_masks: Any
  partial_index: Any
  q_blocks: Any
  q_counts: Any

  @property
  def block_q(self) -> int:
    return int(self.partial_masks.shape[1])

  @property
  def block_kv(self) -> int:
    return int(self.partial_masks.shape[2])

  @property
  def num_heads(self) -> int:
    """Hm: 1 for a head-independent mask, else one table per query head."""
    return int(self.block_kind.shape[0])

  def check(self, hq: int, t: int, s: int) -> None:
    """ValueError naming the field whose shape does not fit Hq query heads, T queries
    and S keys tiled by this tables' block sizes."""
    if len(self.partial_masks.shape) != 3:
      raise ValueError(f"partial_masks has shape {tuple(self.partial_masks.shape)}; "
                       "expected [P, block_q, block_kv]")
    bq, bkv, hm = self.block_q, self.block_kv, self.num_heads
    for name, blk, size in (("block_q", bq, t), ("block_kv", bkv, s)):
      if blk < 1 or size % blk:
        raise ValueError(f"{name}={blk} (from partial_masks) must be >= 1 and divide "
                         f"the sequence length {size}")
    if hm not in (1, hq):
      raise ValueError(f"mask tables have {hm} heads; need 1 or Hq={hq}")
    nq, nkv = t // bq, s // bkv
    want = {"block_kind": (hm, nq, nkv), "partial_index": (hm, nq, nkv),
            "kv_counts": (hm, nq), "q_counts": (hm, nkv)}
    for name, shape in want.items():
      got = tuple(getattr(self, name).shape)
      if got != shape:
        raise ValueError(f"{name} has shape {got}, expected {shape} for T={t}, S={s}, "
                         f"block_q={bq}, block_kv={bkv}")
    for name, lead in (("kv_blocks", (hm, nq)), ("q_blocks", (hm, nkv))):
      shape = tuple(getattr(self, name).shape)
      if len(shape) != 3 or shape[:2] != lead:
        raise ValueError(f"{name} has shape {shape}, expected [{lead[0]}, {lead[1]}, M]")


def slot_tables(blocks, counts, kind, pidx):
  """Per CSR slot: (kind int32 [Hm, R, M] (0 past the count), tile index int32).

  `kind` / `pidx` are [Hm, R, C] with R the CSR's row axis. The tile index of a slot
  that is not partial repeats the row's previous partial tile (0 before the first), so
  the TPU mask BlockSpec keeps its block and issues no DMA.
  """
  m = blocks.shape[-1]
  slot = jnp.arange(m, dtype=jnp.int32)
  valid = slot < counts[..., None]
  skind = jnp.where(valid, jnp.take_along_axis(kind, blocks, -1), 0).astype(jnp.int32)
  spidx = jnp.take_along_axis(pidx, blocks, -1).astype(jnp.int32)
  last = lax.cummax(jnp.where(skind == 1, slot, -1), axis=2)
  smask = jnp.where(last >= 0, jnp.take_along_axis(spidx, jnp.maximum(last, 0), -1), 0)
  return skind, smask.astype(jnp.int32)


__all__ = ["BlockTables", "slot_tables"]
