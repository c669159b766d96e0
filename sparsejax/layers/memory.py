"""Product-key memory layers: the "pkm" and "ultramem" entries of the memory registry.

    config.model.memory = "ultramem"            # or "pkm"
    config.model.memory_layers = "0:1,2:3"      # read FFN input of block s, add after t
    config.model.memory_options = dict(num_keys=64, knn=16, heads=2, ...)

Both read the normalized FFN input x [B, T, D] of block s and return [B, T, D], added to
the residual after block t (`DecoderLM`). The module of placement i is "memory_i".

PKM (Lample et al. 2019; `ProductKeyMemory`): per-head query W_q x → halves, Norm;
top-k product-key retrieval with softmax weights (`ops.product_keys.pkm_retrieve`);
y = Σ_heads Σ_k w·V[slot], values [N = num_keys², D]. Init as UltraMem's "improved PKM"
(LN gains 1/kdim^0.33, W_q and keys ~ N(0, 1/√kdim), values ~ N(0, 0.02)). Lample's
values ~ N(0, 1/√D) give outputs larger than our residual stream at init (embeddings
~ N(0, 0.02)) and trained 0.4 nats/byte worse than dense in `make compare`.

Query/key norm (`qk_norm`, both layers): "rmsnorm" (default) as the released UltraMem
training config (OLMo-style model config `layer_norm_type: rms`, affine gain, no bias,
eps 1e-5; the paper's text says LayerNorm), or "layernorm" (scale-only LayerNorm over
kdim, mean removed). Either way the gains start at 1/kdim^0.33.

Sharding: the lookup goes through `ops.memory_sharded.memory_lookup_sharded` with
mode=`shard_values`; with "none" and a kernel impl on a multi-device mesh it runs in a
`jax.shard_map` (tokens split over the batch axes, table replicated), because a Pallas
call cannot be partitioned by XLA.

UltraMem V1 (`UltraMemLayer`, Huang et al. 2025): one query shared by the heads,
TDQKR retrieval with Tucker rank r and C cores (`ops.product_keys.tdqkr_retrieve`),
IVE with E virtual blocks through a fixed seeded permutation, multi-core scoring of C
value chunks, y = W_o·concat_e(o_e). The ablation ladder is options: tucker_cores=1
turns MCS off, value_expand=1 turns IVE off.

Variables (under ".../memory_i"):
  params        query, query_norm, keys, key_norm, values, (ultramem:) cores, out.
                `values` gets its own optimizer group: an LR multiplier decaying
                linearly from value_lr_start to 1 over value_lr_decay_fraction of the
                run (`lr_multipliers`), and weight decay like every matrix.
  memory_state  (ultramem) tucker_u, tucker_v [H, r]: the rank-1 surrogate of Σ_c C_c
                used to pick candidates. Every forward recomputes it from the current
                cores by SVD, sign-aligned with the stored one (`tucker_rank_one`), and
                stores it when the collection is mutable (the trainer's train step, and
                `init`, so it is set from the SVD before the first forward): one refresh
                per optimizer step, checkpointed with the run.
                permutation [E·N] int32 (when E > 1): fixed, from `permutation_seed`.
  aux_loss      (ultramem, rank_loss_weight > 0) α·mean_{k≥2} relu(σ_k − τ)².
  intermediates "rows" [T, H·k] int32: the physical value rows each token read (only
                when the caller makes "intermediates" mutable; benchmarks count bytes).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry
from sparsejax.ops import memory_sharded
from sparsejax.ops import product_keys
from sparsejax.ops.dispatch import IMPLS
from sparsejax.validation import check, check_choice

SHARD_MODES = ("none", "rows", "columns")
QK_NORMS = ("layernorm", "rmsnorm")
VALUES_PATTERN = r"(^|/)memory_\d+/values$"


@dataclasses.dataclass(frozen=True)
class _CommonOptions:
  KERNEL_IMPL_FIELDS: ClassVar[tuple[str, ...]] = ("impl",)
  heads: int = 2                 # H heads (independent keys, outputs summed)
  knn: int = 32                  # k (PKM) / m (UltraMem): slots read per head per token
  num_keys: int = 64             # sub-keys per side; N = num_keys² physical values
  kdim: int = 0                  # dim of one half-query; 0: max(8, d_model // 4)
  value_lr_start: float = 4.0    # value LR multiplier at step 0, decaying linearly...
  value_lr_decay_fraction: float = 0.5  # ...to 1.0 at this fraction of the run
  impl: str = "auto"             # memory_lookup implementation (ops.dispatch.IMPLS)
  shard_values: str = "none"     # "rows" | "columns": shard the table over the mesh
  qk_norm: str = "rmsnorm"       # query/key norm: "rmsnorm" (the released UltraMem
                                 # config's) | "layernorm" (the paper's text)

  def resolved_kdim(self, d_model: int) -> int:
    return self.kdim or max(8, d_model // 4)

  def _validate_common(self, prefix: str, keys_per_side: int) -> None:
    for name in ("heads", "knn", "num_keys"):
      check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), ">= 1")
    check(self.knn <= keys_per_side, f"{prefix}.knn", self.knn,
          f"<= {keys_per_side} keys per side")
    check(self.kdim >= 0, f"{prefix}.kdim", self.kdim, ">= 0 (0 = auto)")
    check(self.value_lr_start >= 0, f"{prefix}.value_lr_start", self.value_lr_start,
          ">= 0")
    check(0 < self.value_lr_decay_fraction <= 1, f"{prefix}.value_lr_decay_fraction",
          self.value_lr_decay_fraction, "in (0, 1]")
    check_choice(f"{prefix}.impl", self.impl, IMPLS)
    check_choice(f"{prefix}.shard_values", self.shard_values, SHARD_MODES)
    check_choice(f"{prefix}.qk_norm", self.qk_norm, QK_NORMS)

  def lr_multipliers(self, num_steps: int) -> dict:
    """{values regex: step -> 1 + (start − 1)·max(0, 1 − step/T)}, T = fraction·steps."""
    start = self.value_lr_start
    horizon = max(1.0, self.value_lr_decay_fraction * num_steps)

    def multiplier(step):
      return 1.0 + (start - 1.0) * jnp.maximum(0.0, 1.0 - step / horizon)

    return {VALUES_PATTERN: multiplier}


@dataclasses.dataclass(frozen=True)
class PKMOptions(_CommonOptions):
  """Options of the "pkm" memory (`config.model.memory_options`)."""
  heads: int = 4

  def validate(self, prefix: str = "config.model.memory_options") -> None:
    self._validate_common(prefix, self.num_keys)


@dataclasses.dataclass(frozen=True)
class UltraMemOptions(_CommonOptions):
  """Options of the "ultramem" memory (`config.model.memory_options`)."""
  vdim: int = 0                  # value dim; 0: d_model // 2 (rounded to C chunks)
  tucker_rank: int = 2           # r
  tucker_cores: int = 2          # C (multi-core scoring when > 1)
  value_expand: int = 4          # E virtual blocks (IVE when > 1; a perfect square)
  permutation_seed: int = 0      # seed of the fixed virtual-slot permutation
  rank_loss_weight: float = 0.0  # α of the singular-value aux loss (paper: 0.001)
  rank_loss_tau: float = 0.15    # τ

  @property
  def keys_per_side(self) -> int:
    return math.isqrt(self.value_expand) * self.num_keys

  def resolved_vdim(self, d_model: int) -> int:
    c = self.tucker_cores
    return self.vdim or max(1, d_model // 2 // c) * c

  def validate(self, prefix: str = "config.model.memory_options") -> None:
    check(self.value_expand >= 1 and math.isqrt(self.value_expand) ** 2
          == self.value_expand, f"{prefix}.value_expand", self.value_expand,
          "a perfect square >= 1 (1, 4, 9, ...)")
    self._validate_common(prefix, self.keys_per_side)
    for name in ("tucker_rank", "tucker_cores"):
      check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), ">= 1")
    check(self.vdim >= 0, f"{prefix}.vdim", self.vdim, ">= 0 (0 = auto)")
    check(self.vdim % self.tucker_cores == 0, f"{prefix}.vdim", self.vdim,
          f"a multiple of tucker_cores={self.tucker_cores}")
    check(self.value_expand * self.num_keys ** 2 < 2**31, f"{prefix}.num_keys",
          self.num_keys, "small enough that value_expand·num_keys² < 2**31")
    check(self.rank_loss_weight >= 0, f"{prefix}.rank_loss_weight",
          self.rank_loss_weight, ">= 0")
    check(self.rank_loss_tau >= 0, f"{prefix}.rank_loss_tau", self.rank_loss_tau, ">= 0")


def _normal(std: float, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _qk_norm(kind: str, x: jax.Array, gain: jax.Array) -> jax.Array:
  """Scale-only norm over the last axis in f32: "layernorm" (x − mean)/√(var + ε)·g or
  "rmsnorm" x/√(mean(x²) + ε)·g, ε = 1e-5."""
  x = x.astype(jnp.float32)
  if kind == "layernorm":
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-5) * gain


def _values_axes(mode: str) -> tuple:
  return {"none": (None, None), "rows": ("memory_table", None),
          "columns": (None, "memory_table")}[mode]


class _ProductKeyBase(nn.Module):
  """Shared parameter builders of the PKM and UltraMem layers."""
  cfg: object
  options: object

  def _norm(self, name: str, x: jax.Array) -> jax.Array:
    """`qk_norm` over the last axis (kdim) with a learned gain "name" (1/kdim^0.33)."""
    kdim = x.shape[-1]
    init = nn.initializers.constant(1.0 / kdim ** 0.33)
    gain = self.param(name, nn.with_logical_partitioning(init, ("norm",)), (kdim,),
                      jnp.float32)
    return _qk_norm(self.options.qk_norm, x, gain)

  def _lookup(self, values, indices, weights, groups=None, num_groups=None):
    opt = self.options
    return memory_sharded.memory_lookup_sharded(values, indices, weights, groups=groups,
                                                num_groups=num_groups,
                                                mode=opt.shard_values, impl=opt.impl)


class ProductKeyMemory(_ProductKeyBase):
  """PKM: x [B, T, D] -> [B, T, D] (Σ over heads of softmax-weighted values)."""
  options: PKMOptions = PKMOptions()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, opt = self.cfg, self.options
    d, h, n = cfg.d_model, opt.heads, opt.num_keys
    kdim = opt.resolved_kdim(d)
    xt = x.reshape(-1, d)
    w_q = self.param("query", _normal(kdim ** -0.5, ("embed", None)), (d, h * 2 * kdim),
                     cfg.param_dtype)
    q = jnp.einsum("td,de->te", xt, w_q.astype(cfg.dtype)).reshape(-1, h, 2, kdim)
    q = self._norm("query_norm", q)
    keys = self.param("keys", _normal(kdim ** -0.5, (None, None, None, None)),
                      (h, 2, n, kdim), jnp.float32)
    keys = self._norm("key_norm", keys)
    weights, slots = product_keys.pkm_retrieve(q[:, :, 0], q[:, :, 1], keys[:, 0],
                                               keys[:, 1], opt.knn)
    values = self.param("values", _normal(0.02, _values_axes(opt.shard_values)),
                        (n * n, d), cfg.param_dtype)
    rows = slots.reshape(slots.shape[0], -1)                    # [T, H·k]
    self.sow("intermediates", "rows", rows)
    out = self._lookup(values, rows, weights.reshape(slots.shape[0], -1))
    return out.astype(cfg.dtype).reshape(x.shape)


class UltraMemLayer(_ProductKeyBase):
  """UltraMem V1: x [B, T, D] -> [B, T, D] (TDQKR + IVE + MCS, Huang et al. 2025)."""
  options: UltraMemOptions = UltraMemOptions()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, opt = self.cfg, self.options
    d, h, r, c, e = (cfg.d_model, opt.heads, opt.tucker_rank, opt.tucker_cores,
                     opt.value_expand)
    kdim, vdim, n = opt.resolved_kdim(d), opt.resolved_vdim(d), opt.keys_per_side
    rows = opt.num_keys ** 2
    xt = x.reshape(-1, d)

    w_q = self.param("query", _normal(kdim ** -0.5, ("embed", None)), (d, 2 * kdim),
                     cfg.param_dtype)
    q = jnp.einsum("td,de->te", xt, w_q.astype(cfg.dtype)).reshape(-1, 2, kdim)
    q = self._norm("query_norm", q)
    keys = self.param("keys", _normal(kdim ** -0.5, (None,) * 5), (h, 2, n, r, kdim),
                      jnp.float32)                 # [H, 2, n, r, kdim], kdim last
    keys = self._norm("key_norm", keys)
    cores = self.param("cores", nn.with_logical_partitioning(
        nn.initializers.uniform(1.0), (None,) * 4), (h, c, r, r), jnp.float32)
    u, v = self._rank_one(cores)
    scores, slots = product_keys.tdqkr_retrieve(q[:, 0], q[:, 1], keys[:, 0], keys[:, 1],
                                                cores, u, v, opt.knn)
    if opt.rank_loss_weight > 0:
      self.sow("aux_loss", "tucker_rank_loss", opt.rank_loss_weight
               * product_keys.tucker_singular_value_loss(cores, opt.rank_loss_tau))

    permutation = None
    if e > 1:
      permutation = self.variable(
          "memory_state", "permutation",
          lambda: jax.random.permutation(jax.random.key(opt.permutation_seed),
                                         e * rows).astype(jnp.int32)).value
    tokens = slots.shape[0]
    indices, weights, groups = product_keys.implicit_value_expansion(
        slots.reshape(tokens, h * opt.knn), scores.reshape(tokens, h * opt.knn, c),
        permutation, rows)
    self.sow("intermediates", "rows", indices[:, ::c] // c)     # physical rows [T, H·m]
    values = self.param("values", _normal(0.02, _values_axes(opt.shard_values)),
                        (rows, vdim), cfg.param_dtype)
    blocks = self._lookup(values.reshape(rows * c, vdim // c), indices, weights,
                          groups, e * c)                       # [T, E·C, v/C]
    w_o = self.param("out", _normal((e * vdim) ** -0.5, (None, "embed")), (e * vdim, d),
                     cfg.param_dtype)
    y = jnp.einsum("tf,fd->td", blocks.reshape(tokens, e * vdim).astype(cfg.dtype),
                   w_o.astype(cfg.dtype))
    return y.reshape(x.shape)

  def _rank_one(self, cores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(u, v) [H, r] for this forward; stored when "memory_state" is mutable (always
    at init, so the stored surrogate starts from the SVD, never from zeros)."""
    first = not self.has_variable("memory_state", "tucker_u")
    zeros = lambda: jnp.zeros((cores.shape[0], cores.shape[-1]), jnp.float32)   # [H, r]
    u_var = self.variable("memory_state", "tucker_u", zeros)
    v_var = self.variable("memory_state", "tucker_v", zeros)
    if first:
      u, v = product_keys.tucker_rank_one(cores)
    else:
      u, v = product_keys.tucker_rank_one(cores, u_var.value, v_var.value)
    if self.is_mutable_collection("memory_state"):
      u_var.value, v_var.value = u, v
    return u, v


@registry.register("memory", "pkm", options=PKMOptions)
def build_pkm(cfg, options: PKMOptions, layer: int) -> nn.Module:
  return ProductKeyMemory(cfg, options, name=f"memory_{layer}")


@registry.register("memory", "ultramem", options=UltraMemOptions)
def build_ultramem(cfg, options: UltraMemOptions, layer: int) -> nn.Module:
  return UltraMemLayer(cfg, options, name=f"memory_{layer}")
