"""Native Sparse Attention (Yuan et al., DeepSeek, arXiv 2502.11089): XLA reference.

    o_t = g_t^cmp · Attn(q_t, K̃^cmp, Ṽ^cmp) + g_t^slc · Attn(q_t, K^slc_sel) + g_t^win · Attn(q_t, K^win_w)

Shapes follow `jax.nn.dot_product_attention`: q [B, T, Hq, D], each branch's k [B, S, Hkv, D]
and v [B, S, Hkv, Dv] (pass the same arrays for shared K/V), gates [B, T, Hq, 3]
(already sigmoid-ed, order cmp, slc, win); Hq = G · Hkv. All positions are 0-based;
key s has position s. Training: T == S and query t has position t. Decoding: pass
`q_positions` int [B, T] (the keys are the whole KV cache; every mask is relative to the
query position, so unfilled cache slots are never seen).

Branches (l = block_len, d = stride, l' = select_block, n = num_selected, w = window):

* Compression (`compress`, `compression_attention`): compressed block i summarizes
  tokens [i·d, i·d + l) through φ (`mlp_phi`: an MLP over the flattened block plus an
  intra-block position embedding, on top of the mean; or `phi=None`: mean pool). Query t
  sees block i iff i·d + l − 1 ≤ t (the block is complete). Rows with no visible block
  (t < l − 1) give 0, never NaN.
* Selection (`selection_scores`, `select_blocks`, `selected_attention`): selection block j
  is tokens [j·l', (j+1)·l'). Its importance is the sum of p^cmp_t over the compression
  blocks that OVERLAP it (Eq. 9; convention below), summed over the GQA group's query
  heads so the group shares one block set. Keep the top n, with `num_initial` initial
  blocks and `num_local` local blocks (the current block ⌊t/l'⌋ and the ones before it)
  always kept, and blocks after the current one never selected. Attention runs over the
  tokens of the selected blocks, causal (s ≤ t) inside the current block. The scores are
  `stop_gradient`-ed: top-n is not differentiable, so the compression K/V get gradients
  only through the compression branch.
* Sliding window (`window_attention`): keys t − w < s ≤ t.

Eq. 9 index convention. The paper writes p^slc_t[j] = Σ_{m<l'/d} Σ_{n<l/d}
p^cmp_t[(l'/d)·j − m − n] (1-based, divisibility assumed); taken literally with 0-based
blocks it scores selection block j by compression blocks that mostly cover block j − 1,
and it weights them 1, 2, …, 2, 1. We use the overlap definition instead: compression
block i counts once for selection block j iff [i·d, i·d + l) ∩ [j·l', (j+1)·l') ≠ ∅, i.e.
⌈(j·l' − l + 1)/d⌉ ≤ i ≤ ⌈((j+1)·l')/d⌉ − 1. It is what the text of the paper says
("blocks that overlap"), it never credits a selection block with probability mass of
tokens outside it, and it works for any l, d, l' (no divisibility needed). For
l = 32, d = 16, l' = 64: block j gets compression blocks 4j − 1 … 4j + 3.

Forced blocks when n is small: they are kept in priority order current > previous
local blocks > initial blocks (so n = 1 keeps just the current block).

Decoding cost (`nsa_decode_tokens`): ⌊(s − l)/d⌋ + n·l' + w tokens per step (paper
Table 4 with l=32, d=16, n=16, l'=64, w=512: 8k → 2048 tokens, 4.0×; 16k → 2560,
6.4×; 32k → 3584, 9.1×; 64k → 5632, 11.6× fewer than full attention's s).

Implementations (`sparsejax.ops.dispatch`; "auto" picks the kernel on TPU/GPU when
its shape constraints hold, else XLA with one warning): the selection branch's XLA path
gathers [B, T, Hkv, n·l', D] keys and values (memory O(T · n · l') per kv head);
`selected_attention(impl=...)` / `nsa_attention(selection_impl=...)` run the Pallas
kernels of `pallas_kernels.nsa` (TPU query-tile union, GPU group-centric). The window
branch (`window_impl`) runs `block_sparse_attention` with a local mask in training
(XLA block gather or its kernels); decoding uses the dense masked
`window_attention_reference`. Kernels run inside `jax.shard_map` under a multi-device
mesh (`sparse_attention.shard_kernel`: batch over data/fsdp/expert, heads over tensor).

Invalid selected blocks. `selected_attention` follows the library's one index rule: a
slot whose block id is negative (padding, as in the fla reference) or >= ⌈S/l'⌉
contributes nothing — exactly as if it were not valid — in the XLA path and both
kernels, never clamped to a real block or wrapped around; `check_indices=True` adds a
`checkify` check instead (wrap the caller in `jax.experimental.checkify.checkify`).

Short sequences: with S < l there is no compressed block; the compression branch then
gives 0 and every selection score is 0 (only the forced blocks are selected), in
training and in cached decoding. T = 0 gives an empty output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from sparsejax.ops import attention as attention_ops
from sparsejax.ops import masks as masks_lib
from sparsejax.ops.dispatch import check_impl, kernel_platform, resolve_impl
from sparsejax.ops.sparse_attention import (KERNEL_DTYPES, MASK_VALUE, _masked_softmax_av,
                                            _pow2, block_sparse_attention, check_float,
                                            shard_kernel)

Phi = Callable[[jax.Array], jax.Array] | Mapping[str, jax.Array] | None


# ----------------------------------------------------------------------------- checks

def _check_int(name: str, value: Any, low: int) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
    raise ValueError(f"{name}={value!r} must be an int >= {low}")


def check_config(block_len: int, stride: int, select_block: int, num_selected: int,
                 window: int, num_initial: int = 1, num_local: int = 2) -> None:
  """Raises ValueError naming the bad NSA hyper-parameter."""
  _check_int("block_len", block_len, 1)
  _check_int("stride", stride, 1)
  _check_int("select_block", select_block, 1)
  _check_int("num_selected", num_selected, 1)
  _check_int("window", window, 1)
  _check_int("num_initial", num_initial, 0)
  _check_int("num_local", num_local, 0)
  if stride > block_len:
    raise ValueError(f"stride={stride} must be <= block_len={block_len} (otherwise "
                     f"tokens between compression blocks are never summarized)")


def _check_qkv(q, k, v, name):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{name}: q, k, v must be 4-D [batch, seq, heads, dim], got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape[0] != q.shape[0] or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{name}: k {k.shape} and v {v.shape} must share [batch, seq, heads] "
                     f"and batch with q {q.shape}")
  if k.shape[3] != q.shape[3]:
    raise ValueError(f"{name}: k head dim {k.shape[3]} must equal q head dim {q.shape[3]}")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(f"{name}: q heads Hq={q.shape[2]} must be a multiple of kv heads "
                     f"Hkv={k.shape[2]} (GQA)")
  check_float(q=q, k=k, v=v)


def _positions(q, q_positions):
  """int32 [B, T] query positions (0..T−1 when None)."""
  b, t = q.shape[:2]
  if q_positions is None:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if q_positions.shape != (b, t):
    raise ValueError(f"q_positions shape {q_positions.shape} must be [batch, seq] "
                     f"{(b, t)}")
  return q_positions.astype(jnp.int32)


def _grouped(q, hkv):
  b, t, hq, d = q.shape
  return q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)


# ------------------------------------------------------------------------ compression

def num_compressed_blocks(seq_len: int, block_len: int, stride: int) -> int:
  """Complete compression blocks in a sequence: max(0, ⌊(S − l)/d⌋ + 1)."""
  return max(0, (seq_len - block_len) // stride + 1)


def init_phi_params(key: jax.Array, block_len: int, dim: int, hidden: int,
                    std: float = 0.02) -> dict[str, jax.Array]:
  """Params of `mlp_phi`: pos [l, D], w1 [l·D, H], b1 [H], w2 [H, D], b2 [D]."""
  k1, k2, k3 = jax.random.split(key, 3)
  return dict(pos=std * jax.random.normal(k1, (block_len, dim)),
              w1=std * jax.random.normal(k2, (block_len * dim, hidden)),
              b1=jnp.zeros((hidden,)),
              w2=std * jax.random.normal(k3, (hidden, dim)),
              b2=jnp.zeros((dim,)))


def mlp_phi(params: Mapping[str, jax.Array], blocks: jax.Array) -> jax.Array:
  """φ(block) = mean_j(x_j + pos_j) + W2 · gelu(W1 · flatten(x + pos) + b1) + b2.

  blocks [..., l, D] -> [..., D] in float32 (weights shared across heads). The mean term
  keeps the compressed token on the scale of the raw ones at initialization.
  """
  x = blocks.astype(jnp.float32) + params["pos"].astype(jnp.float32)
  flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])   # explicit: nc may be 0
  h = jax.nn.gelu(flat @ params["w1"].astype(jnp.float32) + params["b1"])
  return x.mean(-2) + h @ params["w2"].astype(jnp.float32) + params["b2"]


def compress(kv: jax.Array, block_len: int, stride: int, phi: Phi = None) -> jax.Array:
  """kv [B, S, H, D] -> compressed [B, nc, H, D] float32, block i = φ(kv[i·d : i·d + l]).

  phi: None (mean pool), a `mlp_phi` params mapping, or a callable [..., l, D] -> [..., D].
  nc = `num_compressed_blocks(S, l, d)` (may be 0).
  """
  _check_int("block_len", block_len, 1)
  _check_int("stride", stride, 1)
  b, s, h, d = kv.shape
  nc = num_compressed_blocks(s, block_len, stride)
  idx = np.arange(nc)[:, None] * stride + np.arange(block_len)          # [nc, l]
  blocks = jnp.moveaxis(kv[:, idx], 3, 2)                               # [B, nc, H, l, D]
  if phi is None:
    out = blocks.astype(jnp.float32).mean(-2)
  elif isinstance(phi, Mapping):
    out = mlp_phi(phi, blocks)
  else:
    out = phi(blocks)
  return out.astype(jnp.float32)


def compressed_block_ends(nc: int, block_len: int, stride: int) -> np.ndarray:
  """Position of each compressed block's last token, i·d + l − 1 (int32 [nc])."""
  return (np.arange(nc) * stride + block_len - 1).astype(np.int32)


def compression_attention(q: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array,
                          block_len: int, stride: int, *, scale: float | None = None,
                          q_positions: jax.Array | None = None):
  """Attention over compressed blocks, causal at block granularity.

  q [B, T, Hq, D], k_blocks [B, nc, Hkv, D], v_blocks [B, nc, Hkv, Dv]. Query at position
  t sees block i iff i·d + l − 1 ≤ t. Returns (out f32 [B, T, Hq, Dv], p f32
  [B, T, Hq, nc]) where p are the attention probabilities (0 on invisible blocks; rows
  with no visible block give out = 0 and p = 0).
  """
  _check_qkv(q, k_blocks, v_blocks, "compression_attention")
  b, t, hq, d = q.shape
  nc, hkv, dv = k_blocks.shape[1], k_blocks.shape[2], v_blocks.shape[3]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  pos = _positions(q, q_positions)
  if nc == 0:
    return jnp.zeros((b, t, hq, dv), jnp.float32), jnp.zeros((b, t, hq, 0), jnp.float32)
  ends = jnp.asarray(compressed_block_ends(nc, block_len, stride))
  allowed = (ends[None, None, :] <= pos[:, :, None])[:, :, None, None, :]  # [B,T,1,1,nc]
  logits = jnp.einsum("btkgd,bckd->btkgc", _grouped(q, hkv),
                      k_blocks.astype(jnp.float32)) * scale
  logits = jnp.where(allowed, logits, MASK_VALUE)
  m = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  e = jnp.where(allowed, jnp.exp(logits - m), 0.0)
  denom = e.sum(-1, keepdims=True)
  p = e / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("btkgc,bckv->btkgv", p, v_blocks.astype(jnp.float32))
  return out.reshape(b, t, hq, dv), p.reshape(b, t, hq, nc)


# -------------------------------------------------------------------------- selection

def selection_overlap(num_cmp: int, num_sel: int, block_len: int, stride: int,
                      select_block: int) -> np.ndarray:
  """float32 [nc, ns]: 1 where compression block i overlaps selection block j (Eq. 9)."""
  start = np.arange(num_cmp)[:, None] * stride
  sel = np.arange(num_sel)[None, :] * select_block
  return ((start < sel + select_block) & (start + block_len > sel)).astype(np.float32)


def selection_scores(p_cmp: jax.Array, block_len: int, stride: int, select_block: int,
                     num_kv_heads: int, num_sel_blocks: int) -> jax.Array:
  """p_cmp [B, T, Hq, nc] -> importance [B, T, Hkv, ns] (stop-gradient).

  score[b, t, h, j] = Σ_{query heads of group h} Σ_{i overlapping j} p_cmp[b, t, ·, i]
  (overlap convention: see the module docstring).
  """
  b, t, hq, nc = p_cmp.shape
  if hq % num_kv_heads:
    raise ValueError(f"Hq={hq} must be a multiple of num_kv_heads={num_kv_heads}")
  overlap = jnp.asarray(selection_overlap(nc, num_sel_blocks, block_len, stride,
                                          select_block))
  grouped = p_cmp.reshape(b, t, num_kv_heads, hq // num_kv_heads, nc).sum(3)
  return jax.lax.stop_gradient(jnp.einsum("btkc,cj->btkj", grouped, overlap))


def select_blocks(scores: jax.Array, q_positions: jax.Array, num_selected: int,
                  select_block: int, *, num_initial: int = 1, num_local: int = 2):
  """Top-n selection blocks per (query, kv head).

  scores [B, T, Hkv, ns] (>= 0), q_positions int [B, T]. Block j is a candidate iff
  j ≤ c = ⌊t/l'⌋; blocks c − num_local + 1 … c and 0 … num_initial − 1 are forced (in
  priority order current > earlier local > initial when n is too small for all).
  Returns (idx int32 [B, T, Hkv, n'], valid bool [B, T, Hkv, n']) with n' = min(n, ns);
  invalid slots (fewer than n candidate blocks) must be ignored.
  """
  _check_int("num_selected", num_selected, 1)
  ns = scores.shape[-1]
  n = min(num_selected, ns)
  j = jnp.arange(ns)
  cur = (q_positions // select_block)[:, :, None, None]                # [B,T,1,1]
  big = jnp.float32(1e9)
  value = scores.astype(jnp.float32)
  initial = j < num_initial
  value = jnp.where(initial, big, value)
  for r in range(num_local):           # current block gets the highest priority
    value = jnp.where(j == cur - r, big * (2 + num_local - r), value)
  value = jnp.where(j > cur, -jnp.inf, value)
  top, idx = jax.lax.top_k(value, n)
  return idx.astype(jnp.int32), top > -jnp.inf


def selection_kernel_unmet(q, k, v, select_block: int,
                           platform: str | None = None) -> str | None:
  """Why the NSA selection kernel of `platform` ("tpu" | "gpu"; default the kernel
  platform in context) cannot take these inputs, or None. Both: float32 / bfloat16.
  GPU (Triton dot tiles): l', D, Dv powers of two >= 16. TPU (Mosaic tiling of the
  [l', D] K/V blocks): l' a multiple of 8 (16 for bfloat16) unless one block covers S.
  """
  platform = kernel_platform() if platform is None else platform
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in [jnp.dtype(dt) for dt in KERNEL_DTYPES]:
      return f"{name} dtype {x.dtype} is not float32/bfloat16"
  if platform == "gpu":
    for name, n in (("select_block", select_block), ("D", q.shape[-1]),
                    ("Dv", v.shape[-1])):
      if n < 16 or not _pow2(n):
        return f"{name}={n} is not a power of two >= 16 (Triton dot tiles)"
    return None
  rows = 8 * max(1, 4 // min(x.dtype.itemsize for x in (q, k, v)))
  if select_block % rows and select_block < k.shape[1]:
    return f"select_block={select_block} is not a multiple of {rows} (Mosaic tiling)"
  return None


def _kernel_selected(q, k, v, block_idx, ok, select_block, scale, pos, impl):
  from pallas_kernels.nsa import nsa_selection_kernel  # lazy: kernels optional
  backend = kernel_platform()

  def run(q, k, v, block_idx, ok, pos):
    return nsa_selection_kernel(q, k, v, block_idx, ok, select_block=select_block,
                                scale=scale, q_positions=pos,
                                interpret=impl == "interpret", backend=backend)

  hq, hkv = q.shape[2], k.shape[2]
  out = shard_kernel(run, (q, k, v, block_idx, ok, pos),
                     ((0, 2), (0, 2), (0, 2), (0, 2), (0, 2), (0, None)), (0, 2),
                     heads=(hq, hkv))
  return out.astype(jnp.float32)


def selected_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array,
                       valid: jax.Array, select_block: int, *, scale: float | None = None,
                       q_positions: jax.Array | None = None, impl: str = "auto",
                       check_indices: bool = False) -> jax.Array:
  """Attention over the tokens of the selected blocks; f32 [B, T, Hq, Dv].

  k [B, S, Hkv, D], v [B, S, Hkv, Dv]; block_idx int / valid bool [B, T, Hkv, n] (as
  `select_blocks` returns; valid ids distinct per token and kv head). Key s of a
  selected block is visible iff s ≤ t and s < S. A slot that is not valid, or whose
  id is negative or >= ⌈S/l'⌉, contributes nothing (module docstring);
  `check_indices=True` instead adds a `checkify` check on the valid slots' ids.
  impl: "auto" | "xla" | "pallas" | "interpret" (`sparsejax.ops.dispatch`; the kernels
  are `pallas_kernels.nsa`, TPU query-tile union / GPU group-centric).
  """
  _check_qkv(q, k, v, "selected_attention")
  b, t, hq, d = q.shape
  s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  if block_idx.shape[:3] != (b, t, hkv) or block_idx.ndim != 4:
    raise ValueError(f"block_idx shape {block_idx.shape} must be [batch, seq, Hkv, n] "
                     f"with [batch, seq, Hkv] = {(b, t, hkv)}")
  if valid.shape != block_idx.shape:
    raise ValueError(f"valid shape {valid.shape} must equal block_idx shape "
                     f"{block_idx.shape}")
  if not jnp.issubdtype(block_idx.dtype, jnp.integer):
    raise TypeError(f"block_idx must be integers, got {block_idx.dtype}")
  _check_int("select_block", select_block, 1)
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  pos = _positions(q, q_positions)
  ns = -(-s_len // select_block)
  in_range = (block_idx >= 0) & (block_idx < ns)
  valid = valid.astype(bool)
  if check_indices:
    checkify.check(jnp.all(in_range | ~valid),
                   "selected_attention: block_idx of a valid slot must be in [0, {ns}) "
                   "(ceil(S / select_block)), got min {lo} max {hi}", ns=jnp.int32(ns),
                   lo=jnp.min(jnp.where(valid, block_idx, 0), initial=0),
                   hi=jnp.max(jnp.where(valid, block_idx, 0), initial=0))
  ok = valid & in_range
  if t == 0 or s_len == 0 or block_idx.shape[3] == 0:
    check_impl(impl)
    return jnp.zeros((b, t, hq, dv), jnp.float32)
  unmet = None if impl == "xla" else selection_kernel_unmet(q, k, v, select_block)
  impl = resolve_impl(impl, op="nsa.selected_attention", unmet=unmet)
  if impl != "xla":
    return _kernel_selected(q, k, v, block_idx.astype(jnp.int32), ok, select_block,
                            float(scale), pos, impl)
  n = block_idx.shape[3]
  safe = jnp.where(ok, block_idx, 0)
  tok = safe[..., None] * select_block + jnp.arange(select_block)      # [B,T,Hkv,n,l']
  allowed = ok[..., None] & (tok <= pos[:, :, None, None, None]) & (tok < s_len)
  tok = jnp.minimum(tok, s_len - 1).reshape(b, t, hkv, n * select_block)
  allowed = allowed.reshape(b, t, hkv, n * select_block)
  bi = jnp.arange(b)[:, None, None, None]
  hi = jnp.arange(hkv)[None, None, :, None]
  kg = k.astype(jnp.float32)[bi, tok, hi]                               # [B,T,Hkv,K,D]
  vg = v.astype(jnp.float32)[bi, tok, hi]
  logits = jnp.einsum("btkgd,btkjd->btkgj", _grouped(q, hkv), kg) * scale
  out = _masked_softmax_av(logits, allowed[:, :, :, None], vg, "btkgj,btkjv->btkgv")
  return out.reshape(b, t, hq, dv)


# ----------------------------------------------------------------------------- window

def window_block(t: int, block: int = 64) -> int:
  """Block size of the training-path window branch: gcd(T, block) (divides T)."""
  return math.gcd(t, block) if t else block


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int, *,
                     scale: float | None = None, q_positions: jax.Array | None = None,
                     impl: str = "auto") -> jax.Array:
  """Sliding-window causal attention (keys t − w < s ≤ t); f32 [B, T, Hq, Dv].

  Training (q_positions None, T == S): `block_sparse_attention` with LocalMask(w − 1),
  blocks of `window_block(T)` and `impl` (empty blocks skipped; "auto" falls back to
  XLA when the kernel's block constraints are not met, e.g. T not a multiple of 16 on
  GPU). Decoding (q_positions given, or T != S): `window_attention_reference` (XLA;
  no kernel takes arbitrary query positions here), whatever `impl`.
  """
  _check_qkv(q, k, v, "window_attention")
  _check_int("window", window, 1)
  d = q.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  if q_positions is None and q.shape[1] == k.shape[1]:
    block = window_block(q.shape[1])
    return block_sparse_attention(q, k, v, masks_lib.LocalMask(window - 1), scale=scale,
                                  block_q=block, block_kv=block,
                                  impl=impl).astype(jnp.float32)
  check_impl(impl)
  return window_attention_reference(q, k, v, window, scale=scale,
                                    q_positions=q_positions)


def window_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, window: int, *,
                               scale: float | None = None,
                               q_positions: jax.Array | None = None) -> jax.Array:
  """Dense masked sliding-window attention (keys t − w < s ≤ t, s < S); f32
  [B, T, Hq, Dv]. The decoding path of `window_attention` and the tests' reference."""
  _check_qkv(q, k, v, "window_attention_reference")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  pos = _positions(q, q_positions)
  key = jnp.arange(k.shape[1])
  allowed = (key[None, None] <= pos[..., None]) & (key[None, None] > pos[..., None] - window)
  b, t, hq, _ = q.shape
  hkv = k.shape[2]
  logits = jnp.einsum("btkgd,bskd->bkgts", _grouped(q, hkv), k.astype(jnp.float32)) * scale
  out = _masked_softmax_av(logits, allowed[:, None, None], v.astype(jnp.float32),
                           "bkgts,bskv->bkgtv")
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, v.shape[3])


# ---------------------------------------------------------------------------- combined

def nsa_attention(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, k_slc: jax.Array,
                  v_slc: jax.Array, k_win: jax.Array, v_win: jax.Array, gates: jax.Array,
                  *, phi_k: Phi = None, phi_v: Phi = None, block_len: int = 32,
                  stride: int = 16, select_block: int = 64, num_selected: int = 16,
                  window: int = 512, num_initial: int = 1, num_local: int = 2,
                  scale: float | None = None, cmp_rope_theta: float | None = None,
                  cmp_rope_scaling: attention_ops.RopeScaling | None = None,
                  q_positions: jax.Array | None = None, window_impl: str = "auto",
                  selection_impl: str = "auto", return_aux: bool = False):
  """Native Sparse Attention: Σ_c gates[..., c] · o_c over (cmp, slc, win).

  q [B, T, Hq, D] (RoPE already applied, as for k_slc / k_win); k_cmp/v_cmp are the raw
  (un-rotated) keys/values the compression branch summarizes with φ (phi_k / phi_v: None
  = mean pool, `mlp_phi` params, or a callable). With `cmp_rope_theta` the compressed
  keys are RoPE-rotated at their block's last position i·d + l − 1, with the model's
  `cmp_rope_scaling` (the `RopeScaling` its q and keys were rotated with). gates
  [B, T, Hq, 3] in [0, 1] (cmp, slc, win). Returns [B, T, Hq, Dv] in q.dtype, plus with
  `return_aux` a dict (o_cmp, o_slc, o_win, p_cmp, scores, block_idx, valid).
  `selection_impl` is the selection branch's `selected_attention(impl=)`, `window_impl`
  the window branch's `window_attention(impl=)` (`sparsejax.ops.dispatch.IMPLS`).
  """
  check_config(block_len, stride, select_block, num_selected, window, num_initial,
               num_local)
  for name, (k, v) in dict(cmp=(k_cmp, v_cmp), slc=(k_slc, v_slc),
                           win=(k_win, v_win)).items():
    _check_qkv(q, k, v, f"nsa_attention ({name} branch)")
  if gates.shape != (*q.shape[:3], 3):
    raise ValueError(f"gates shape {gates.shape} must be [batch, seq, Hq, 3] "
                     f"{(*q.shape[:3], 3)}")
  if k_slc.shape[1] != k_cmp.shape[1] or k_win.shape[1] != k_cmp.shape[1]:
    raise ValueError("the three branches' keys must have the same length S")
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  pos = _positions(q, q_positions)
  s_len, hkv = k_slc.shape[1], k_slc.shape[2]

  kc = compress(k_cmp, block_len, stride, phi_k)
  vc = compress(v_cmp, block_len, stride, phi_v)
  if cmp_rope_theta is not None and kc.shape[1]:
    ends = jnp.asarray(compressed_block_ends(kc.shape[1], block_len, stride))
    kc = attention_ops.rope(kc, jnp.broadcast_to(ends, kc.shape[:2]), cmp_rope_theta,
                            cmp_rope_scaling)
  o_cmp, p_cmp = compression_attention(q, kc, vc, block_len, stride, scale=scale,
                                       q_positions=pos)
  ns = -(-s_len // select_block)
  scores = selection_scores(p_cmp, block_len, stride, select_block, hkv, ns)
  idx, valid = select_blocks(scores, pos, num_selected, select_block,
                             num_initial=num_initial, num_local=num_local)
  o_slc = selected_attention(q, k_slc, v_slc, idx, valid, select_block, scale=scale,
                             q_positions=pos, impl=selection_impl)
  o_win = window_attention(q, k_win, v_win, window, scale=scale,
                           q_positions=q_positions, impl=window_impl)
  g = gates.astype(jnp.float32)
  out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
  out = out.astype(q.dtype)
  if return_aux:
    return out, dict(o_cmp=o_cmp, o_slc=o_slc, o_win=o_win, p_cmp=p_cmp, scores=scores,
                     block_idx=idx, valid=valid)
  return out


# ----------------------------------------------------------------------- decode cost

def nsa_decode_tokens(s: int, block_len: int = 32, stride: int = 16,
                      num_selected: int = 16, select_block: int = 64, window: int = 512,
                      *, exact: bool = False) -> int:
  """K/V tokens loaded by one decode step with `s` tokens in the cache.

  exact=False: the paper's count ⌊(s − l)/d⌋ + n·l' + w (Table 4: l=32, d=16, n=16,
  l'=64, w=512 gives 8k → 2046 ≈ 2048, 4.0×; 16k → 2558 ≈ 2560, 6.4×; 32k → 3582 ≈
  3584, 9.1×; 64k → 5630 ≈ 5632, 11.6×), each term clipped to what exists
  (max(0, ·) compressed blocks, n·l' and w at most s) and the total clipped to s: when
  the branches would read more than the cache, dense attention over the s tokens is
  cheaper.
  exact=True: what the three branches of this implementation read for the query at
  position s − 1, unclipped: max(0, ⌊(s − l)/d⌋ + 1) compressed blocks (the paper's
  formula omits the block ending at s − 1), min(n, ⌈s/l'⌉) selected blocks whose last
  (current) block holds only s − (⌈s/l'⌉ − 1)·l' tokens (assumes num_local >= 1, so the
  current block is among them), and min(w, s) window tokens.
  """
  check_config(block_len, stride, select_block, num_selected, window)
  _check_int("s", s, 1)
  if exact:
    nb = -(-s // select_block)
    slc = min(num_selected, nb) * select_block - (nb * select_block - s)
    return num_compressed_blocks(s, block_len, stride) + slc + min(window, s)
  total = (max(0, (s - block_len) // stride) + min(num_selected * select_block, s)
           + min(window, s))
  return min(s, total)
