"""Block sizes, grid steps and SMEM/VMEM footprints of the block-sparse kernels.

`default_blocks` is the one place block sizes are chosen when the caller gives none.
Larger blocks mean fewer grid steps (each TPU step costs ~0.35 µs of pipeline
overhead, each GPU loop iteration a K/V load round trip): causal attention at
T = S = 32k, Hq = 8 (`grid_steps`, forward; dq the same):

    TPU grid steps (B · Hq · nq · M)     64-blocks 2,097,152   128: 524,288   512: 32,768
                                         per head    262,144        65,536          4,096
    GPU loop iterations (Σ visited)      64×64       1,050,624    128×64 (default): 526,336

(dk/dv: B · Hkv · nkv · G · Mt TPU steps, the same totals for Hkv · G = Hq.)
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import BACKENDS, SMEM_TABLE_BYTES, largest_divisor

TPU_BLOCK = 512                # splash-attention-sized tiles (MaxText's default 512)
GPU_BLOCKS = (128, 64)         # (block_q, block_kv), as Triton / Pallas GPU flash attention
XLA_BLOCK = 128                # the op's XLA block-gather path (no kernel)
# Below v5e's 16 MiB default scoped VMEM (v6e: 32 MiB), leaving room for Mosaic's own.
TPU_VMEM_BUDGET = 12 * 2 ** 20


def _tpu_block(n: int, target: int, rows: int) -> int:
  """The largest divisor of n <= target that is a multiple of 128 (MXU / lane tiles),
  else n itself when n <= target (a whole-sequence block), else the largest divisor
  that is a multiple of `rows` (sublane tile), else the largest divisor."""
  for step in (128, None, rows):
    if step is None:
      if n <= target:
        return n
      continue
    fits = [b for b in range(step, min(n, target) + 1, step) if n % b == 0]
    if fits:
      return max(fits)
  return largest_divisor(n, target)


def default_blocks(backend: str, t: int, s: int, d: int, dtype,
                   dv: int | None = None) -> tuple[int, int]:
  """(block_q, block_kv) for T queries and S keys of head dims D (q, k) and Dv (v;
  default D) in `dtype`, dividing T and S, for the kernels of `backend` ("tpu" | "gpu")
  or the op's XLA path ("xla").

  TPU: 512 × 512 (splash-like) when the sequence allows — the largest divisor <= 512
  that is a multiple of 128, else the whole sequence when <= 512, else a multiple of
  the sublane tile (8 rows f32, 16 bf16) — shrunk to 256 / 128 while the kernels'
  VMEM (`tpu_vmem`) exceeds TPU_VMEM_BUDGET. GPU: 128 × 64 (64 × 32 for head dims
  > 128, shared memory), the largest powers of two dividing T and S up to those. A
  result the kernel cannot take (e.g. a GPU block < 16) makes the op's impl="auto"
  fall back to XLA. XLA: the largest divisors <= 128 (that path gathers M·bkv keys
  per query row, so a narrow mask wastes less with smaller blocks).
  """
  if backend not in BACKENDS + ("xla",):
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS + ('xla',)}")
  for name, n, low in (("T", t, 1), ("S", s, 1), ("D", d, 0)):
    if not isinstance(n, int) or n < low:
      raise ValueError(f"{name}={n!r} must be an int >= {low}")
  dv = d if dv is None else dv
  if backend == "xla":
    return largest_divisor(t, XLA_BLOCK), largest_divisor(s, XLA_BLOCK)
  if backend == "gpu":
    shrink = 2 if max(d, dv) > 128 else 1
    return math.gcd(t, GPU_BLOCKS[0] // shrink), math.gcd(s, GPU_BLOCKS[1] // shrink)
  itemsize = jnp.dtype(dtype).itemsize
  rows = 8 * max(1, 4 // itemsize)
  for target in (TPU_BLOCK, TPU_BLOCK // 2, TPU_BLOCK // 4):
    bq, bkv = _tpu_block(t, target, rows), _tpu_block(s, target, rows)
    if max(tpu_vmem(bq, bkv, d, dv, itemsize).values()) <= TPU_VMEM_BUDGET:
      break
  return bq, bkv


def tpu_vmem(bq: int, bkv: int, d: int, dv: int, itemsize: int) -> dict[str, int]:
  """VMEM bytes of the TPU forward, dq and dk/dv kernels (formulas in tpu.py): blocks
  double-buffered, f32 scratch, and ~2-3 f32 [bq, bkv] temporaries (logits,
  probabilities, ds) that Mosaic keeps in VMEM at these sizes."""
  b, tile, row = itemsize, 4 * bq * bkv, 32 * bq     # an f32 (1, bq) row pads to 8 sublanes
  fwd = 2 * (bq * d * b + bkv * (d + dv) * b + tile + bq * dv * b + row) \
      + 2 * 512 * bq + 4 * bq * dv + 2 * tile
  dq = 2 * (bq * (d + dv) * b + bkv * (d + dv) * b + 2 * row + tile + bq * d * b) \
      + 4 * bq * d + 3 * tile
  dkv = 2 * (bq * (d + dv) * b + 2 * bkv * (d + dv) * b + 2 * row + tile) \
      + 4 * bkv * (d + dv) + 3 * tile
  return dict(fwd=fwd, dq=dq, dkv=dkv)


def tpu_chunks(hq: int, hkv: int, hm: int, rows: int, slots: int,
               budget: int = SMEM_TABLE_BYTES) -> tuple[int, int]:
  """(query heads hc, table rows rc) per TPU call so that its scalar-prefetched tables,
  3 int32 [hm_c, rc, slots] (hm_c = 1 or hc), take <= `budget` bytes (when possible:
  at least one GQA group of G heads and one row per call).

  rows/slots: nq/M for the forward and dq (kv blocks per q block), nkv/Mt for dk/dv.
  A shared mask (hm = 1) keeps all heads; a per-head mask splits heads by GQA groups.
  """
  per_row = 12 * slots
  if hm == 1:
    return hq, largest_divisor(rows, budget // per_row)
  g = hq // hkv
  hc = g * largest_divisor(hkv, budget // (per_row * g))
  return hc, largest_divisor(rows, budget // (per_row * hc))


def tpu_footprint(*, hq: int, hkv: int, hm: int, nq: int, nkv: int, m: int, mt: int,
                  block_q: int, block_kv: int, d: int, dv: int, itemsize: int,
                  budget: int = SMEM_TABLE_BYTES) -> dict[str, int]:
  """Bytes of one TPU call after `tpu_chunks`: scalar-prefetch SMEM of the forward/dq
  and of the dk/dv call, and VMEM of each kernel (`tpu_vmem`)."""
  hc, rc = tpu_chunks(hq, hkv, hm, nq, m, budget)
  hct, rct = tpu_chunks(hq, hkv, hm, nkv, mt, budget)
  vmem = tpu_vmem(block_q, block_kv, d, dv, itemsize)
  return dict(smem_fwd=12 * (hc if hm > 1 else 1) * rc * m,
              smem_dkv=12 * (hct if hm > 1 else 1) * rct * mt,
              vmem_fwd=vmem["fwd"], vmem_dq=vmem["dq"], vmem_dkv=vmem["dkv"])


def grid_steps(tables, *, backend: str, batch: int, hq: int, hkv: int) -> dict[str, int]:
  """Work items of each kernel for `tables` (a `BlockTables`), summed over the calls
  `tpu_chunks` splits it into: TPU grid steps (every CSR slot is a step, padding
  included: fwd = dq = B·Hq·nq·M, dkv = B·Hkv·nkv·G·Mt); GPU loop iterations (visited
  blocks: B · Σ_heads kv_counts, and Σ q_counts for dk/dv)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
  hm, nq, m = tables.kv_blocks.shape
  _, nkv, mt = tables.q_blocks.shape
  if backend == "tpu":
    fwd = batch * hq * nq * m
    return dict(fwd=fwd, dq=fwd, dkv=batch * hkv * nkv * (hq // hkv) * mt)
  rep = hq if hm == 1 else 1                  # a shared table serves every head
  fwd = batch * rep * int(np.sum(tables.kv_counts))
  return dict(fwd=fwd, dq=fwd, dkv=batch * rep * int(np.sum(tables.q_counts)))


__all__ = ["default_blocks", "tpu_vmem", "tpu_chunks", "tpu_footprint", "grid_steps",
           "TPU_BLOCK", "GPU_BLOCKS", "XLA_BLOCK", "TPU_VMEM_BUDGET"]
