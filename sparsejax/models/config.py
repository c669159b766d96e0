"""The decoder LM's config: a frozen dataclass validated from `config.model`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.core

from sparsejax import validation
from sparsejax.ops.dispatch import IMPLS
from sparsejax.validation import check, check_choice

DTYPES = ("float32", "bfloat16", "float16")
_EMPTY = flax.core.FrozenDict()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and per-block component choices of `DecoderLM`.

  `attention`, `ffn`, `linear` and `memory` name entries of `sparsejax.layers.registry`;
  their `*_options` mappings are validated by the entry's options dataclass.
  `memory_layers` places skip-layer memories: "s:t,..." reads the normalized FFN input
  of block s and adds the memory output to the residual after block t (s ≤ t).
  `decode_block_topk` (e.g. dict(block_size=16, num_sinks=4, window=64, top_k=8))
  makes cached one-token decode steps attend to sinks + window + the top-k KV blocks
  only (`sparsejax.ops.block_topk`); it changes no parameter, so it can be switched on
  for generation with any trained model. `kernel_impl` ("auto" | "xla" | "pallas" |
  "interpret", `sparsejax.ops.dispatch`) switches every kernel of the model at once
  (options naming an impl explicitly keep it); it changes no parameter either.
  """
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0                # 0: d_model // num_heads
  d_ff: int = 0                    # 0: 8/3 · d_model rounded up to a multiple of 64
  # Per-block sizes (one entry per block; () = the single value above in every block),
  # e.g. from `sparsejax.sparsity.shrink`; a per-block num_heads needs head_dim > 0.
  d_ff_per_layer: tuple[int, ...] = ()
  num_heads_per_layer: tuple[int, ...] = ()
  num_kv_heads_per_layer: tuple[int, ...] = ()
  rope_theta: float = 10_000.0
  rope_scaling: Mapping[str, Any] = _EMPTY   # {} = off; else ops.attention.RopeScaling
  qkv_bias: bool = False           # learned biases on the q/k/v projections (Qwen2)
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  init_std: float = 0.02
  dtype: str = "float32"           # compute dtype of activations and matmuls
  param_dtype: str = "float32"
  remat: bool = False              # rematerialize each block in the backward pass
  attention: str = "mha"
  attention_options: Mapping[str, Any] = _EMPTY
  ffn: str = "swiglu"
  ffn_options: Mapping[str, Any] = _EMPTY
  linear: str = "dense"
  linear_options: Mapping[str, Any] = _EMPTY
  memory: str = "none"
  memory_options: Mapping[str, Any] = _EMPTY
  memory_layers: str = ""
  decode_block_topk: Mapping[str, Any] = _EMPTY   # {} = off; else BlockTopK fields
  kernel_impl: str = "auto"        # what every layer's kernel impl="auto" option becomes

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def resolved_d_ff(self) -> int:
    return self.d_ff or -(-8 * self.d_model // 3 // 64) * 64

  def for_layer(self, layer: int) -> ModelConfig:
    """The config block `layer` is built from: this one with d_ff, num_heads and
    num_kv_heads taken from the `*_per_layer` tuples where set (and those cleared).
    Without per-block sizes it is this very config, so such models are unchanged."""
    if not any(getattr(self, name) for name in PER_LAYER_FIELDS):
      return self
    sizes = {name: getattr(self, name)[layer] for name in PER_LAYER_FIELDS
             if getattr(self, name)}
    return dataclasses.replace(
        self, **{name[:-len("_per_layer")]: size for name, size in sizes.items()},
        **{name: () for name in PER_LAYER_FIELDS})

  @property
  def rope_scaling_params(self):
    """The validated `rope_scaling` (e.g. dict(rope_type="llama3", factor=8.0)), or None."""
    if not self.rope_scaling:
      return None
    from sparsejax.ops.attention import RopeScaling
    return validation.from_mapping(RopeScaling, self.rope_scaling,
                                   "config.model.rope_scaling")

  @property
  def block_topk(self):
    """The validated `decode_block_topk` settings, or None when off."""
    if not self.decode_block_topk:
      return None
    from sparsejax.ops.block_topk import BlockTopK
    return validation.from_mapping(BlockTopK, self.decode_block_topk,
                                   "config.model.decode_block_topk")

  @property
  def memory_placements(self) -> tuple[tuple[int, int], ...]:
    """((source block, destination block), ...) parsed from `memory_layers`."""
    if not self.memory_layers.strip():
      return ()
    return tuple(tuple(int(v) for v in pair.split(":"))
                 for pair in self.memory_layers.replace(" ", "").split(","))

  def lr_multipliers(self, num_steps: int) -> dict:
    """{param-path regex: multiplier or schedule} requested by the chosen components
    (an options dataclass may define `lr_multipliers(num_steps)`, e.g. UltraMem's
    value-LR 4 → 1 decay)."""
    from sparsejax.layers import registry
    import sparsejax.layers  # noqa: F401

    groups = {}
    for kind in registry.KINDS:
      name = getattr(self, kind)
      if kind == "memory" and name == "none":
        continue
      options = registry.parse_options(kind, name, getattr(self, f"{kind}_options"),
                                       f"config.model.{kind}_options")
      if hasattr(options, "lr_multipliers"):
        groups.update(options.lr_multipliers(num_steps))
    return groups

  def validate(self, prefix: str = "config.model") -> None:
    from sparsejax.layers import registry  # the layers register themselves on import
    import sparsejax.layers  # noqa: F401

    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads"):
      value = getattr(self, name)
      check(value >= 1, f"{prefix}.{name}", value, ">= 1")
    check(self.head_dim >= 0, f"{prefix}.head_dim", self.head_dim, ">= 0 (0 = auto)")
    check(self.d_ff >= 0, f"{prefix}.d_ff", self.d_ff, ">= 0 (0 = auto)")
    if not self.head_dim:
      check(self.d_model % self.num_heads == 0, f"{prefix}.num_heads", self.num_heads,
            f"a divisor of d_model={self.d_model} when head_dim=0")
    check(self.num_heads % self.num_kv_heads == 0, f"{prefix}.num_kv_heads",
          self.num_kv_heads, f"a divisor of num_heads={self.num_heads}")
    self._validate_per_layer(prefix)
    check(self.resolved_head_dim % 2 == 0, f"{prefix}.head_dim",
          self.resolved_head_dim, "even (RoPE rotates pairs)")
    check(self.rope_theta > 0, f"{prefix}.rope_theta", self.rope_theta, "> 0")
    check(0 < self.norm_eps < 1, f"{prefix}.norm_eps", self.norm_eps, "in (0, 1)")
    check(self.init_std > 0, f"{prefix}.init_std", self.init_std, "> 0")
    check_choice(f"{prefix}.dtype", self.dtype, DTYPES)
    check_choice(f"{prefix}.param_dtype", self.param_dtype, DTYPES)
    check_choice(f"{prefix}.kernel_impl", self.kernel_impl, IMPLS)
    self.block_topk  # validates decode_block_topk
    self.rope_scaling_params  # validates rope_scaling
    for kind in ("attention", "ffn", "linear"):
      registry.parse_options(kind, getattr(self, kind), getattr(self, f"{kind}_options"),
                             f"{prefix}.{kind}_options")
    field = f"{prefix}.memory_layers"
    if self.memory == "none":
      check(not self.memory_layers.strip(), field, self.memory_layers,
            "empty when memory='none'")
      return
    registry.parse_options("memory", self.memory, self.memory_options,
                           f"{prefix}.memory_options")
    check(re.fullmatch(r"\d+:\d+(,\d+:\d+)*", self.memory_layers.replace(" ", "")),
          field, self.memory_layers, 'like "2:5,6:9" (source:destination block pairs)')
    for src, dst in self.memory_placements:
      check(0 <= src <= dst < self.num_layers, field, self.memory_layers,
            f"pairs s:t with 0 <= s <= t < num_layers={self.num_layers}")

  def _validate_per_layer(self, prefix: str) -> None:
    for name in PER_LAYER_FIELDS:
      sizes = getattr(self, name)
      check(not sizes or len(sizes) == self.num_layers, f"{prefix}.{name}", sizes,
            f"empty or one size per block ({self.num_layers} entries)")
      check(all(size >= 1 for size in sizes), f"{prefix}.{name}", sizes,
            "sizes >= 1")
    if self.num_heads_per_layer:
      check(self.head_dim > 0, f"{prefix}.head_dim", self.head_dim,
            "> 0 when num_heads_per_layer is set")
    for layer in range(self.num_layers):
      block = self.for_layer(layer)
      kv = "num_kv_heads_per_layer" if self.num_kv_heads_per_layer else "num_kv_heads"
      check(block.num_heads % block.num_kv_heads == 0, f"{prefix}.{kv}",
            getattr(self, kv), f"a divisor of block {layer}'s num_heads={block.num_heads}")


PER_LAYER_FIELDS = ("d_ff_per_layer", "num_heads_per_layer", "num_kv_heads_per_layer")


def parse_model_config(mapping: Any, prefix: str = "config.model") -> ModelConfig:
  return validation.from_mapping(ModelConfig, mapping, prefix)
