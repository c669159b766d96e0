"""Multi-head attention with GQA, RoPE and a KV cache: the "mha" (dense causal) and
"block_sparse" (static structured mask, `sparsejax.ops.sparse_attention`)
attention entries.

    config.model.attention = "block_sparse"
    config.model.attention_options = dict(pattern="local_global", window=64,
                                          num_global=4, block_q=0, block_kv=0)

Patterns (all causal; `sparsejax.ops.masks`): "causal"; "local" (the last `window`
keys incl. itself); "local_global" (local plus the first `num_global` sink tokens);
"strided" (Sparse Transformer: the last `window` keys plus every `stride`-th earlier
key); "chunked" (causal within chunks of `window`). Training and prefill run the
block-sparse op (empty blocks skipped; block_q = block_kv = 0, the default, lets the op
pick them for the platform — TPU 512, GPU 128 × 64, divisors of T — and a configured
block shrinks to gcd(T, block) when it does not tile T; its kernels run inside
`jax.shard_map` under a multi-device mesh); cached
decoding applies the same mask's predicate to the absolute positions, so generation
sees exactly the trained pattern.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry
from sparsejax.ops import attention as attention_ops
from sparsejax.ops import masks as masks_lib
from sparsejax.ops.block_topk import block_topk_attention
from sparsejax.ops.sparse_attention import block_sparse_attention
from sparsejax.ops.dispatch import IMPLS
from sparsejax.validation import check, check_choice

PATTERNS = ("causal", "local", "local_global", "strided", "chunked")


@dataclasses.dataclass(frozen=True)
class BlockSparseOptions:
  """Options of the "block_sparse" attention (`config.model.attention_options`)."""
  KERNEL_IMPL_FIELDS: ClassVar[tuple[str, ...]] = ("impl",)
  pattern: str = "local_global"
  window: int = 64          # local band (local, local_global, strided) or chunk size
  num_global: int = 4       # sink tokens (local_global)
  stride: int = 16          # strided
  block_q: int = 0          # kernel / block-gather tile sizes (clamped to the length);
  block_kv: int = 0         # 0: by platform (`default_blocks`: TPU 512, GPU 128 × 64)
  impl: str = "auto"        # block_sparse_attention impl (ops.dispatch.IMPLS)

  def validate(self, prefix: str = "config.model.attention_options") -> None:
    check_choice(f"{prefix}.pattern", self.pattern, PATTERNS)
    for name in ("window", "num_global", "stride"):
      check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), ">= 1")
    for name in ("block_q", "block_kv"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name),
            ">= 0 (0: by platform)")
    check_choice(f"{prefix}.impl", self.impl, IMPLS)

  def mask(self) -> masks_lib.Mask:
    causal = masks_lib.CausalMask()
    local = masks_lib.LocalMask(self.window - 1)
    return {
        "causal": causal,
        "local": local,
        "local_global": (local | masks_lib.GlobalMask(self.num_global)) & causal,
        "strided": masks_lib.StridedMask(self.stride, self.window),
        "chunked": masks_lib.ChunkedCausalMask(self.window),
    }[self.pattern]


def linear_factory(cfg, layer: int):
  """The configured linear module class with the model's dtypes bound."""
  cls = registry.build("linear", cfg.linear, cfg, cfg.linear_options, layer)
  return functools.partial(cls, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def output_init_std(cfg) -> float:
  """GPT-2 style: residual-branch output projections get std / sqrt(2 · num_layers)."""
  return cfg.init_std / math.sqrt(2 * cfg.num_layers)


class Attention(nn.Module):
  """x [B, T, D] -> [B, T, D]: q/k/v projections (+ biases when `cfg.qkv_bias`), RoPE
  (scaled by `cfg.rope_scaling`), causal GQA attention, output projection.

  With `decode=True` keys/values are written to the "cache" collection
  (`key`/`value` [B, S_max, Hkv, Dh], `index` scalar); S_max is the length of the input
  at init. Each call appends its T tokens at positions index..index+T-1 and attends to
  the filled cache, so a prompt can be prefilled in one call and then decoded 1 by 1.
  """
  cfg: object
  layer: int = 0
  options: BlockSparseOptions | None = None   # None: dense causal ("mha")

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, decode: bool = False):
    cfg = self.cfg
    hq, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    linear = linear_factory(cfg, self.layer)
    q = linear((hq, dh), ("embed", "heads", "head_dim"), init_std=cfg.init_std,
               name="q_proj")(x)
    k = linear((hkv, dh), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std,
               name="k_proj")(x)
    v = linear((hkv, dh), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std,
               name="v_proj")(x)
    if cfg.qkv_bias:  # params q_bias [Hq, Dh], k_bias / v_bias [Hkv, Dh]
      q = q + self._bias("q_bias", (hq, dh), "heads").astype(q.dtype)
      k = k + self._bias("k_bias", (hkv, dh), "kv_heads").astype(k.dtype)
      v = v + self._bias("v_bias", (hkv, dh), "kv_heads").astype(v.dtype)
    scaling = cfg.rope_scaling_params
    q = attention_ops.rope(q, positions, cfg.rope_theta, scaling)
    k = attention_ops.rope(k, positions, cfg.rope_theta, scaling)
    if decode and self.has_variable("cache", "index"):
      out = self._attend_cached(q, k, v, positions)
    else:
      if decode:  # init call: create the cache with this input's length
        self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      out = self._attend(q, k, v)
    return linear((cfg.d_model,), ("heads", "head_dim", "embed"), contract_dims=2,
                  init_std=output_init_std(cfg), name="o_proj")(out)

  def _bias(self, name, shape, heads_axis):
    init = nn.with_logical_partitioning(nn.initializers.zeros, (heads_axis, "head_dim"))
    return self.param(name, init, shape, self.cfg.param_dtype)

  def _attend_cached(self, q, k, v, positions):
    key = self.variable("cache", "key")
    value = self.variable("cache", "value")
    index = self.variable("cache", "index")
    start = index.value
    key.value = jax.lax.dynamic_update_slice_in_dim(key.value, k, start, axis=1)
    value.value = jax.lax.dynamic_update_slice_in_dim(value.value, v, start, axis=1)
    index.value = start + q.shape[1]
    sparse_decode = self.cfg.block_topk
    if sparse_decode is not None and q.shape[1] == 1:       # decode steps, not prefill
      predicate = None if self.options is None else self.options.mask().predicate
      return block_topk_attention(q, key.value, value.value, positions, index.value,
                                  sparse_decode, extra_mask=predicate)
    if self.options is None:
      return attention_ops.causal_attention(q, key.value, value.value,
                                            q_positions=positions, kv_length=index.value)
    key_pos = jnp.arange(key.value.shape[1])
    allowed = self.options.mask().predicate(positions[:, :, None], key_pos[None, None, :])
    allowed &= key_pos[None, None, :] < index.value
    return jax.nn.dot_product_attention(q, key.value, value.value, mask=allowed[:, None])

  def _attend(self, q, k, v):
    """Training / prefill attention over this call's T tokens (positions 0..T-1)."""
    if self.options is None:
      return attention_ops.causal_attention(q, k, v)
    opt, t = self.options, q.shape[1]
    return block_sparse_attention(q, k, v, opt.mask(), block_q=fit_block(opt.block_q, t),
                                  block_kv=fit_block(opt.block_kv, t), impl=opt.impl)


def fit_block(block: int, t: int) -> int | None:
  """None for block 0 (the op picks by platform); else the configured block when it
  tiles T (clamped to T), else gcd(T, block), so any sequence length runs (a kernel
  that cannot take the smaller block falls back to XLA under impl="auto")."""
  if block == 0:
    return None
  if t == 0 or t % min(block, t) == 0:
    return min(block, t) if t else block
  return math.gcd(t, block)


@registry.register("attention", "mha")
def build_mha(cfg, options, layer):
  del options
  return Attention(cfg, layer, name="attention")


@registry.register("attention", "block_sparse", options=BlockSparseOptions)
def build_block_sparse(cfg, options: BlockSparseOptions, layer):
  return Attention(cfg, layer, options, name="attention")
