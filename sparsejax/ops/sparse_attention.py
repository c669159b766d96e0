"""Block-sparse attention with a static structured mask (`sparsejax.ops.masks`), GQA.

    out[b, t, h] = Σ_s P[b, h, t, s] · v[b, s, h // G]
    P[b, h, t, :] = softmax_s(scale · q[b, t, h] · k[b, s, h // G] | mask_h[t, s])

q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] with Hq = G · Hkv (query head h
reads kv head h // G, as in `jax.nn.dot_product_attention`); output [B, T, Hq, Dv] in
q.dtype, computed in float32. The softmax runs only over allowed keys; a query row with
no allowed key gives exactly 0 (and zero gradients), never NaN or a uniform average.
`mask` is one mask for all heads or a `MultiHeadMask` with Hq masks.

The sequence is tiled into [block_q, block_kv] blocks (by default
`pallas_kernels.block_sparse_attention.default_blocks` for what runs: the TPU kernels
512 × 512, the GPU kernels 128 × 64, the XLA path 128; divisors of T and S);
`mask_info` (trace-time NumPy)
classifies each block as empty / partial / full. Empty blocks are skipped (not loaded,
not computed), full blocks are not masked, partial blocks are masked from the mask's
predicate on iota positions or, for masks defined by stored data, from the
deduplicated stored tiles.

impl: "xla" (gathers each q block's non-empty kv blocks; K/V blocks gathered once per
kv head and shared by its G query heads, using the union of the group's block lists for
per-head masks; one softmax over the gathered keys; differentiable by JAX autodiff),
"pallas"/"interpret" (the flash-style kernels in `pallas_kernels.block_sparse_attention`:
TPU splash-style with scalar-prefetched mask info, GPU Triton over a CSR of kv blocks;
custom_vjp with dq and dkv kernels), "auto" (`sparsejax.ops.dispatch.resolve_impl`: the
kernel on TPU/GPU when `kernel_unmet` finds no unmet constraint, else XLA with one
warning). `reference_attention` is the dense masked reference the tests compare with.

Sharding: when a mesh with more than one device is in context (`jax.set_mesh`) and the
impl resolved to a kernel, the kernel runs inside `jax.shard_map` (`shard_kernel`): the
batch is split over the mesh axes "data", "fsdp", "expert" that divide it and the heads
over "tensor" when it divides Hkv (a Pallas call cannot be partitioned by XLA).

Edge cases: T = 0 or S = 0 gives an empty / all-zero output; integer q, k or v raise
TypeError (attention of integer tensors has no meaning; cast them first).

Roofline (nnz = allowed (q, k) pairs per head, `mask_info(...).nnz`):
FLOPs_fwd = 2 · B · Hq · nnz · (D + Dv), backward ≈ 2.5×; bytes ≈ B · S · (Hq + Hkv) ·
(D + Dv) · itemsize. The XLA path materializes the visited logits, f32
[B, Hq, T, max_nnz · block_kv].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sparsejax.ops import masks as masks_lib
from sparsejax.ops.dispatch import check_impl, kernel_platform, resolve_impl
from sparsejax.sharding import BATCH_AXES

# Finite "minus infinity": exp underflows to 0, and rows with no allowed key stay finite.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
HEAD_AXIS = "tensor"


def check_float(**arrays) -> None:
  """TypeError naming the first non-floating argument (attention needs real logits)."""
  for name, x in arrays.items():
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} has dtype {x.dtype}; attention needs floating-point "
                      f"q, k, v (cast them, e.g. to float32)")


def _check(q, k, v, mask, scale, block_q, block_kv):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D [batch, seq, heads, dim], got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  check_float(q=q, k=k, v=v)
  (b, t, hq, d), (bk, s, hkv, dk) = q.shape, k.shape
  if bk != b or v.shape[0] != b:
    raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {v.shape[0]}")
  if dk != d:
    raise ValueError(f"k head dim {dk} must equal q head dim {d}")
  if v.shape[1:3] != (s, hkv):
    raise ValueError(f"v shape {v.shape} must match k's [batch, seq, heads] {k.shape[:3]}")
  if hkv == 0 or hq % hkv:
    raise ValueError(f"q heads Hq={hq} must be a multiple of kv heads Hkv={hkv} (GQA)")
  if not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be a sparsejax.ops.masks.Mask, got {mask!r}")
  if mask.num_heads is not None and mask.num_heads != hq:
    raise ValueError(f"MultiHeadMask has {mask.num_heads} heads; it needs one per query "
                     f"head (Hq={hq})")
  if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
    raise ValueError(f"scale={scale!r} must be a finite float > 0")
  for arg, name, size, blk in (("block_q", "T", t, block_q),
                               ("block_kv", "S", s, block_kv)):
    if blk is None:
      continue
    if not isinstance(blk, int) or isinstance(blk, bool) or blk < 1:
      raise ValueError(f"{arg}={blk!r} must be an int >= 1 or None (by platform)")
    if size and size % min(blk, size):
      raise ValueError(f"sequence length {name}={size} must be a multiple of {arg}={blk} "
                       "(pad the sequence or pick a divisor)")


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def kernel_unmet(q, k, v, block_q: int, block_kv: int,
                 platform: str | None = None) -> str | None:
  """Why the block-sparse kernel of `platform` ("tpu" | "gpu"; default the kernel
  platform in context) cannot take these inputs, or None. Shapes [B, T, H, D].

  Both: float32 / bfloat16 q, k, v. GPU (Triton `pl.dot` tiles): block_q, block_kv, D
  and Dv powers of two >= 16. TPU (Mosaic (8, 128) tiling of the second-minor block
  dim; 16 rows for bfloat16): block_q, block_kv multiples of 8 (16 for bf16) or the
  whole sequence.
  """
  platform = kernel_platform() if platform is None else platform
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in [jnp.dtype(dt) for dt in KERNEL_DTYPES]:
      return f"{name} dtype {x.dtype} is not float32/bfloat16"
  if platform == "gpu":
    for name, n in (("block_q", block_q), ("block_kv", block_kv), ("D", q.shape[-1]),
                    ("Dv", v.shape[-1])):
      if n < 16 or not _pow2(n):
        return f"{name}={n} is not a power of two >= 16 (Triton dot tiles)"
    return None
  rows = 8 * max(1, 4 // min(x.dtype.itemsize for x in (q, k, v)))
  for name, blk, size in (("block_q", block_q, q.shape[1]),
                          ("block_kv", block_kv, k.shape[1])):
    if blk % rows and blk != size:
      return (f"{name}={blk} is neither a multiple of {rows} nor the whole sequence "
              f"({size}) (Mosaic tiling)")
  return None


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           mask: masks_lib.Mask, *, scale: float | None = None,
                           block_q: int | None = None, block_kv: int | None = None,
                           impl: str = "auto") -> jax.Array:
  """Masked softmax attention that skips empty blocks; returns [B, T, Hq, Dv].

  q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] floating; Hq % Hkv == 0. scale
  defaults to 1/√D. T and S must be multiples of block_q and block_kv (a block larger
  than its sequence is clamped to it); None picks `default_blocks` for what runs (the
  kernel platform's, or the XLA path's). See the module docstring for the math, the
  impls and sharding.
  """
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  _check(q, k, v, mask, scale, block_q, block_kv)
  b, t, hq, _ = q.shape
  s_len = k.shape[1]
  if t == 0 or s_len == 0:                # no query, or no key: every row gives 0
    check_impl(impl)
    return jnp.zeros((b, t, hq, v.shape[3]), q.dtype)
  given = (block_q, block_kv)
  if impl != "xla":
    block_q, block_kv = _blocks(kernel_platform(), given, q, v, s_len)
    unmet = kernel_unmet(q, k, v, block_q, block_kv)
    impl = resolve_impl(impl, op="block_sparse_attention", unmet=unmet)
  if impl == "xla":
    block_q, block_kv = _blocks("xla", given, q, v, s_len)
    return _xla_attention(q, k, v, mask=mask, scale=float(scale), block_q=block_q,
                          block_kv=block_kv)
  return _kernel_attention(q, k, v, mask, scale=float(scale), block_q=block_q,
                           block_kv=block_kv, interpret=impl == "interpret")


def _blocks(backend, given, q, v, s_len):
  """The given (block_q, block_kv), clamped to T / S, with None entries picked by
  `default_blocks` for `backend` ("tpu" | "gpu" kernels, or "xla")."""
  from pallas_kernels.block_sparse_attention import default_blocks  # lazy
  t = q.shape[1]
  auto = default_blocks(backend, t, s_len, q.shape[3], q.dtype, v.shape[3])
  return tuple(a if g is None else min(g, n)
               for g, a, n in zip(given, auto, (t, s_len)))


def _kernel_attention(q, k, v, mask, *, scale, block_q, block_kv, interpret):
  """The Pallas kernels (TPU: scalar-prefetched mask info; GPU: CSR inputs), inside
  `shard_kernel` (per-head mask tables follow the heads' shard)."""
  from pallas_kernels.block_sparse_attention import block_sparse_attention_kernel  # lazy
  tables = masks_lib.mask_info(mask, q.shape[1], k.shape[1], block_q,
                               block_kv).kernel_tables()
  backend = kernel_platform()
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)            # [B, T, H, D] <-> [B, H, T, D]

  def run(q, k, v, *fields):
    out = block_sparse_attention_kernel(
        heads_major(q), heads_major(k), heads_major(v), type(tables)(*fields),
        scale=scale, interpret=interpret, backend=backend)
    return heads_major(out)

  # Per-head tables (Hm = Hq) follow the heads' shard; the partial tiles are shared.
  head_dim = 0 if tables.num_heads > 1 else None
  dims = [(None, None) if name == "partial_masks" else (None, head_dim)
          for name in tables._fields]
  return shard_kernel(run, (q, k, v, *tables), ((0, 2), (0, 2), (0, 2), *dims), (0, 2),
                      heads=(q.shape[2], k.shape[2]))


def kernel_mesh_axes(batch: int, heads: Sequence[int]):
  """(mesh, free axes, batch axes, head axes) to run a kernel under, or None when no
  `jax.shard_map` is needed: no mesh of more than one device, or every axis already
  manual (inside an enclosing shard_map, whose shards the kernel then runs on).

  Free axes: the mesh axes not already manual. Batch axes: those of
  `sparsejax.sharding.BATCH_AXES` among them with size > 1 whose cumulative product
  divides `batch`; head axes: ("tensor",) when it is free and its size > 1 divides
  every entry of `heads` (e.g. (Hq, Hkv), so GQA groups stay on one device), else ()
  (heads replicated)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  free = tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types)
               if t != jax.sharding.AxisType.Manual)
  if not free:
    return None
  sizes = dict(mesh.shape)
  axes: list[str] = []
  for a in BATCH_AXES:
    n = math.prod(sizes[x] for x in axes) * sizes.get(a, 1)
    if a in free and sizes[a] > 1 and batch % n == 0:
      axes.append(a)
  n_head = sizes.get(HEAD_AXIS, 1)
  head_axes = (HEAD_AXIS,) if (HEAD_AXIS in free and n_head > 1
                               and all(h % n_head == 0 for h in heads)) else ()
  return mesh, free, tuple(axes), head_axes


def shard_kernel(fn: Callable, args: Sequence[jax.Array],
                 dims: Sequence[tuple[int | None, int | None]],
                 out_dims: tuple[int | None, int | None], *, heads: Sequence[int]):
  """fn(*args) inside `jax.shard_map` over the mesh in context (`kernel_mesh_axes`).

  dims[i] = (batch dim, head dim) of args[i] (None: not split on that axis);
  out_dims the same for the single output, which has args[0]'s rank. Without a
  multi-device mesh, or with every axis already manual: fn(*args). The map is manual
  over every free axis, size-1 ones too (neither Mosaic nor the interpreter's
  callbacks accept a partially auto-partitioned region), with the default
  check_vma=True: the kernels state their outputs' varying axes (`out_struct`).
  """
  axes = kernel_mesh_axes(args[0].shape[dims[0][0]], heads)
  if axes is None:
    return fn(*args)
  mesh, free, batch_axes, head_axes = axes

  def spec(x_ndim, bdim, hdim):
    parts = [None] * x_ndim
    if bdim is not None and batch_axes:
      parts[bdim] = batch_axes
    if hdim is not None and head_axes:
      parts[hdim] = head_axes
    return P(*parts)

  in_specs = tuple(spec(x.ndim, *d) for x, d in zip(args, dims))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, axis_names=set(free),
                       out_specs=spec(args[0].ndim, *out_dims))(*args)


def _masked_softmax_av(s, allowed, v_rows, out_spec):
  """softmax over the last axis of `s` restricted to `allowed`, times values.

  s f32 [..., K]; allowed bool broadcastable to s. Rows with no allowed entry give 0
  (and zero gradients): the max is taken over a finite mask value and the
  normalizer is replaced by 1 where it is 0. Returns einsum(out_spec, p, v_rows) / l.
  """
  s = jnp.where(allowed, s, MASK_VALUE)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum(out_spec, p, v_rows, preferred_element_type=jnp.float32)
  return o / jnp.where(l == 0.0, 1.0, l)[..., None]


def reference_attention(q, k, v, mask, *, scale=None):
  """Dense f32 reference with the boolean mask (`mask.dense`); [B, T, Hq, Dv] q.dtype."""
  b, t, hq, d = q.shape
  s_len, hkv = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  dense = mask.dense(t, s_len)
  dense = dense if dense.ndim == 3 else dense[None]                       # [Hm, T, S]
  g = hq // hkv
  qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * scale
  groups = (hkv, g) if dense.shape[0] > 1 else (1, 1)
  allowed = jnp.asarray(dense).reshape(*groups, t, s_len)
  out = _masked_softmax_av(logits, allowed, v.astype(jnp.float32), "bkgts,bskv->bkgtv")
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, -1).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("mask", "scale", "block_q", "block_kv"))
def _xla_attention(q, k, v, *, mask, scale, block_q, block_kv):
  b, t, hq, d = q.shape
  s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  g = hq // hkv
  tables = _gather_tables(mask, t, s_len, block_q, block_kv, hkv)
  idx, slot_kind = tables["idx"], tables["kind"]     # [Hk', nq, M], [Hk', G', nq, M]
  nq, nkv = t // block_q, s_len // block_kv

  # [B, Hkv, G, nq, bq, D] and [B, Hkv, nkv, bkv, D]
  qb = q.astype(jnp.float32).reshape(b, nq, block_q, hkv, g, d).transpose(0, 3, 4, 1, 2, 5)
  kb = k.astype(jnp.float32).reshape(b, nkv, block_kv, hkv, d).transpose(0, 3, 1, 2, 4)
  vb = v.astype(jnp.float32).reshape(b, nkv, block_kv, hkv, dv).transpose(0, 3, 1, 2, 4)
  if idx.shape[0] == 1:                                  # one block list for all heads
    kg, vg = kb[:, :, idx[0]], vb[:, :, idx[0]]          # [B, Hkv, nq, M, bkv, D]
  else:                                                  # per kv head (union of group)
    heads = np.arange(hkv)[:, None, None]
    kg, vg = kb[:, heads, idx], vb[:, heads, idx]
  s = jnp.einsum("bhgqid,bhqmjd->bhgqimj", qb, kg,
                 preferred_element_type=jnp.float32) * scale

  # Mask tiles [Hk', G', nq, bq, M, bkv]: full blocks all True, empty/padding all False,
  # partial blocks from the predicate on positions (or the stored tiles).
  kind = slot_kind[:, :, :, None, :, None]
  if mask.has_predicate:
    q_pos = (np.arange(nq)[:, None] * block_q + np.arange(block_q))[:, :, None, None]
    kv_pos = (idx[..., None] * block_kv + np.arange(block_kv))[:, :, None]  # [Hk',nq,1,M,bkv]
    per_head = masks_lib.head_masks(mask)                          # Hm = 1 or Hq masks
    partial = jnp.stack([
        m.predicate(jnp.asarray(q_pos), jnp.asarray(kv_pos[h // g if len(per_head) > 1 else 0]))
        for h, m in enumerate(per_head)])                            # [Hm, nq, bq, M, bkv]
    partial = partial.reshape(*kind.shape[:2], *partial.shape[1:])
  else:
    partial = jnp.asarray(tables["tiles"])                        # [Hk', G', nq, bq, M, bkv]
  allowed = (kind == masks_lib.FULL) | ((kind == masks_lib.PARTIAL) & partial)
  shape = s.shape
  s = s.reshape(*shape[:5], -1)
  allowed = allowed.reshape(*allowed.shape[:4], -1)
  vg = vg.reshape(b, hkv, nq, -1, dv)
  out = _masked_softmax_av(s, allowed[None], vg, "bhgqik,bhqkv->bhgqiv")
  # [B, Hkv, G, nq, bq, Dv] -> [B, T, Hq, Dv]
  return out.transpose(0, 3, 4, 1, 2, 5).reshape(b, t, hq, dv).astype(q.dtype)


@functools.lru_cache(maxsize=64)
def _gather_tables(mask, t, s_len, block_q, block_kv, hkv):
  """NumPy gather tables for the XLA path.

  idx   int32 [Hk', nq, M]: kv blocks gathered per q block — the CSR of `mask_info` for a
        head-independent mask (Hk' = 1), else per kv head the union of its G query
        heads' non-empty blocks (Hk' = Hkv).
  kind  int8 [Hk', G', nq, M]: each query head's block kind at each gathered slot
        (0 for padding and for blocks empty for that head); G' = 1 or G.
  tiles bool [Hk', G', nq, bq, M, bkv]: stored partial tiles (only for masks without a
        predicate).
  """
  info = masks_lib.mask_info(mask, t, s_len, block_q, block_kv)
  hm, nq, _ = info.block_kind.shape
  gq = hm // hkv if hm > 1 else 1
  kind = info.block_kind.reshape(hm // gq, gq, nq, -1)             # [Hk', G', nq, nkv]
  idx, counts = masks_lib.block_csr((kind > 0).any(1))                  # [Hk', nq, M]
  valid = np.arange(idx.shape[-1]) < counts[..., None]
  slot_kind = np.take_along_axis(kind, idx[:, None], -1)
  slot_kind = np.where(valid[:, None], slot_kind, 0).astype(np.int8)
  tables = {"idx": idx, "kind": slot_kind}
  if not mask.has_predicate:
    pidx = info.partial_index.reshape(kind.shape)
    pidx = np.take_along_axis(pidx, idx[:, None], -1)              # [Hk', G', nq, M]
    tiles = info.partial_masks[np.maximum(pidx, 0)]                # [.., nq, M, bq, bkv]
    tables["tiles"] = np.swapaxes(tiles, -3, -2) & (pidx >= 0)[..., None, :, None]
  return tables
