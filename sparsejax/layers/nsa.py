"""The "nsa" attention entry: Native Sparse Attention (`sparsejax.ops.nsa`).

    config.model.attention = "nsa"
    config.model.attention_options = dict(block_len=32, stride=16, select_block=64,
                                          num_selected=16, window=512)

Kernels: `window_impl` and `selection_impl` ("auto" | "xla" | "pallas" | "interpret",
set from `config.model.kernel_impl` when left at "auto") choose the window branch's
block-sparse kernel and the selection branch's NSA kernel; under a multi-device mesh
they run inside `jax.shard_map` (batch over data/fsdp, heads over tensor).

Per block: q projection; K/V projections per branch (compression, selection, window) or
one shared pair (`shared_kv=True`, as in the fla reference); gates g = sigmoid(x · W_g)
per query head and branch; output projection.

Positions. RoPE rotates q and the selection / window keys at their token positions
(with the model's `rope_scaling`, as `Attention`, e.g. a Llama-3 checkpoint's). The
compression branch's φ sees the raw (un-rotated) keys plus its intra-block position
embedding (compress="mlp"), and the compressed key of block i is then RoPE-rotated at
its last token's position i·d + l − 1 (`cmp_rope=True`), so the compression scores, like
the other two branches', depend on the query–key distance (with RoPE on q but not on the
compressed keys they would depend on the query's absolute position instead).

KV cache ("cache" collection, created by an init call with decode=True like
`Attention`): the raw projections of each distinct K/V pair (`key_cmp`/`value_cmp`,
`key_slc`/..., or `key`/`value` when shared) [B, S_max, Hkv, Dh], un-rotated, and
`index`. Key slot s holds position s. Each decode call appends its tokens, rotates the
cached keys at positions 0..S_max−1, recomputes the compressed blocks from the whole
cache (only complete blocks at or before the query are visible, so unfilled slots are
never read) and runs `nsa_attention` with the queries' positions. This is the simplest
correct design (O(S_max) work per step); caching the compressed blocks is future work.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry
from sparsejax.layers.attention import linear_factory, output_init_std
from sparsejax.ops import attention as attention_ops
from sparsejax.ops import nsa as nsa_ops
from sparsejax.ops.dispatch import IMPLS
from sparsejax.validation import check, check_choice

COMPRESS = ("mlp", "mean")
BRANCHES = ("cmp", "slc", "win")


@dataclasses.dataclass(frozen=True)
class NSAOptions:
  """Options of the "nsa" attention (`config.model.attention_options`)."""
  KERNEL_IMPL_FIELDS: ClassVar[tuple[str, ...]] = ("window_impl", "selection_impl")
  block_len: int = 32        # l: compression block length
  stride: int = 16           # d: compression stride (<= block_len)
  select_block: int = 64     # l': selection block size
  num_selected: int = 16     # n: selected blocks per query (incl. forced ones)
  window: int = 512          # w: sliding window
  num_initial: int = 1       # always-selected initial blocks
  num_local: int = 2         # always-selected local blocks (current and previous)
  shared_kv: bool = False    # one K/V projection for the three branches
  compress: str = "mlp"      # φ: "mlp" (MLP + intra-block position emb.) or "mean"
  compress_hidden: int = 0   # φ MLP hidden width (0: 4 · head_dim)
  cmp_rope: bool = True      # RoPE the compressed keys at their block's last position
  window_impl: str = "auto"  # window branch (training): block_sparse_attention impl
  selection_impl: str = "auto"  # selection branch: selected_attention impl (NSA kernel)

  def validate(self, prefix: str = "config.model.attention_options") -> None:
    for name in ("block_len", "stride", "select_block", "num_selected", "window"):
      check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), ">= 1")
    for name in ("num_initial", "num_local", "compress_hidden"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), ">= 0")
    check(self.stride <= self.block_len, f"{prefix}.stride", self.stride,
          f"<= block_len={self.block_len}")
    check_choice(f"{prefix}.compress", self.compress, COMPRESS)
    for name in self.KERNEL_IMPL_FIELDS:
      check_choice(f"{prefix}.{name}", getattr(self, name), IMPLS)


class NSAttention(nn.Module):
  """x [B, T, D] -> [B, T, D] with Native Sparse Attention (see the module docstring)."""
  cfg: object
  layer: int = 0
  options: NSAOptions = NSAOptions()

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, *, decode: bool = False):
    cfg, opt = self.cfg, self.options
    hq, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    linear = linear_factory(cfg, self.layer)
    q = linear((hq, dh), ("embed", "heads", "head_dim"), init_std=cfg.init_std,
               name="q_proj")(x)
    pairs = ("",) if opt.shared_kv else tuple(f"_{b}" for b in BRANCHES)
    kv = {}
    for p in pairs:
      for kind in ("k", "v"):
        kv[kind + p] = linear((hkv, dh), ("embed", "kv_heads", "head_dim"),
                              init_std=cfg.init_std, name=f"{kind}{p}_proj")(x)
    gates = nn.sigmoid(linear((hq, len(BRANCHES)), ("embed", "heads", None),
                              init_std=cfg.init_std, name="gate_proj")(x)
                       .astype(jnp.float32))
    phi_k = phi_v = None
    if opt.compress == "mlp":
      hidden = opt.compress_hidden or 4 * dh
      phi_k = self.param("phi_k", self._phi_init(dh, hidden))
      phi_v = self.param("phi_v", self._phi_init(dh, hidden))
    scaling = cfg.rope_scaling_params
    q = attention_ops.rope(q, positions, cfg.rope_theta, scaling)

    q_positions = None
    if decode and self.has_variable("cache", "index"):
      index = self.variable("cache", "index")
      start = index.value
      for name, value in kv.items():
        slot = self.variable("cache", _cache_name(name))
        slot.value = jax.lax.dynamic_update_slice_in_dim(slot.value, value, start, axis=1)
        kv[name] = slot.value
      index.value = start + x.shape[1]
      q_positions = positions
      key_positions = jnp.broadcast_to(jnp.arange(kv["k" + pairs[0]].shape[1]),
                                       kv["k" + pairs[0]].shape[:2])
    else:
      if decode:  # init call: create the cache with this input's length
        for name, value in kv.items():
          self.variable("cache", _cache_name(name), jnp.zeros, value.shape, value.dtype)
        self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      key_positions = positions

    branch = {b: ("" if opt.shared_kv else f"_{b}") for b in BRANCHES}
    rotated = {p: attention_ops.rope(kv["k" + p], key_positions, cfg.rope_theta, scaling)
               for p in {branch["slc"], branch["win"]}}
    out = nsa_ops.nsa_attention(
        q, kv["k" + branch["cmp"]], kv["v" + branch["cmp"]], rotated[branch["slc"]],
        kv["v" + branch["slc"]], rotated[branch["win"]], kv["v" + branch["win"]], gates,
        phi_k=phi_k, phi_v=phi_v, block_len=opt.block_len, stride=opt.stride,
        select_block=opt.select_block, num_selected=opt.num_selected, window=opt.window,
        num_initial=opt.num_initial, num_local=opt.num_local,
        cmp_rope_theta=cfg.rope_theta if opt.cmp_rope else None,
        cmp_rope_scaling=scaling, q_positions=q_positions,
        window_impl=opt.window_impl, selection_impl=opt.selection_impl)
    return linear((cfg.d_model,), ("heads", "head_dim", "embed"), contract_dims=2,
                  init_std=output_init_std(cfg), name="o_proj")(out.astype(x.dtype))

  def _phi_init(self, dh: int, hidden: int):
    l, std, dtype = self.options.block_len, self.cfg.init_std, self.cfg.param_dtype

    def init(key):
      params = nsa_ops.init_phi_params(key, l, dh, hidden, std)
      return {name: value.astype(dtype) for name, value in params.items()}
    return init


def _cache_name(name: str) -> str:
  kind, _, branch = name.partition("_")
  base = {"k": "key", "v": "value"}[kind]
  return f"{base}_{branch}" if branch else base


@registry.register("attention", "nsa", options=NSAOptions)
def build_nsa(cfg, options: NSAOptions, layer):
  return NSAttention(cfg, layer, options, name="attention")
