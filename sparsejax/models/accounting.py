"""What a `DecoderLM` costs: parameters, activated parameters, FLOPs per token and the
parameter bytes one decode step reads — computed from its `ModelConfig` and params.

Sparse components read only some slices of some parameters per token: an MoE FFN reads
top_k of its experts' weight slices, a PKM / UltraMem memory reads heads·knn rows of its
value table. Those parameters are declared once per registry entry in `ROUTED` (which
parameter, how many slices a token reads) and `SELECTED` (how to count the distinct
slices a step read from what the layer sows), keyed by (kind, registry name); every
other parameter counts fully. Components are located by the model's module names:
`block_<i>/attention`, `block_<i>/ffn` and `memory_<i>`.

Definitions (the experiment tables use them):

  activated params     non-embedding params used per token: routed params count
                       min(per_token, units) slices (MoE: top_k/num_experts of w_gate,
                       w_up, w_down; memory values: heads·knn rows × the row width),
                       everything else fully (attention, dense FFN, router, shared
                       experts, memory query/keys/cores/norms/W_o: every key is scored).
  FLOPs / token        forward FLOPs of one token at context `seq_len` (multiply-adds
                       count 2): 2 × the activated matmul params (attention q/k/v/o, FFN
                       or top_k routed + shared experts + router, memory query and
                       UltraMem W_o, LM head d·V) + attention scores 2·2·(seq_len/2)·H·
                       head_dim per layer (QKᵀ and AV at the mean causal context) +
                       memory retrieval per memory layer: PKM 2·H·2·n·kdim (sub-key
                       scores) + H·k² (candidate sums) + 2·H·k·d (weighted value sum);
                       UltraMem 2·2·n·kdim·r·H (S_row, S_col; n keys per side incl. IVE)
                       + 2·2·H·n·r (rank-1 candidate scores) + H·m²·2r²·C (Tucker grid,
                       C cores) + 2·H·m·vdim (weighted value sum). Norms, softmax, top-k
                       and the optimizer are not counted.
  decode bytes / step  parameter bytes one decode step reads (KV cache excluded): every
                       non-routed param, plus, per routed component, the distinct slices
                       the step's tokens selected (`selected_units`) × the slice bytes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax.layers  # noqa: F401  (the layers register themselves on import)
from sparsejax.layers import registry
from sparsejax.models.config import ModelConfig
from sparsejax.models.transformer import DecoderLM
from sparsejax.sharding import unbox

EMBEDDING = ("embedding", "lm_head")


@dataclasses.dataclass(frozen=True)
class Routed:
  """A parameter whose axis-0 slices ("units": experts, value rows) tokens choose."""
  units: int          # slices along axis 0
  unit_size: int      # elements per slice
  per_token: int      # slices one token reads (<= units)

  @property
  def size(self) -> int:
    return self.units * self.unit_size


def _moe_per_token(options, inner: tuple[str, ...]) -> int | None:
  return options.top_k if inner in (("w_gate",), ("w_up",), ("w_down",)) else None


def _memory_per_token(options, inner: tuple[str, ...]) -> int | None:
  return options.heads * options.knn if inner == ("values",) else None


def _moe_selected(leaves: Mapping[tuple[str, ...], Any]) -> int | None:
  """Experts with load > 0 (sown metrics "load_<i>", `log_expert_load=True`)."""
  loads = [np.asarray(v).reshape(-1)[0] for inner, v in leaves.items()
           if re.fullmatch(r"load_\d+", inner[0])]
  return sum(int(float(v) > 0) for v in loads) if loads else None


def _memory_selected(leaves: Mapping[tuple[str, ...], Any]) -> int | None:
  """Distinct physical value rows (sown intermediates "rows"), union over the tokens."""
  rows = [np.asarray(v).reshape(-1) for inner, v in leaves.items() if inner[0] == "rows"]
  return int(np.unique(np.concatenate(rows)).size) if rows else None


# (kind, registry name) -> per_token(options, param path inside the component) -> slices
# a token reads, or None for a parameter every token reads fully.
ROUTED: dict[tuple[str, str], Callable[[Any, tuple[str, ...]], int | None]] = {
    ("ffn", "moe"): _moe_per_token,
    ("memory", "pkm"): _memory_per_token,
    ("memory", "ultramem"): _memory_per_token,
}
# (kind, registry name) -> selected({path inside the component: sown leaf}) -> distinct
# units one step read (None: nothing sown).
SELECTED: dict[tuple[str, str], Callable[[Mapping[tuple, Any]], int | None]] = {
    ("ffn", "moe"): _moe_selected,
    ("memory", "pkm"): _memory_selected,
    ("memory", "ultramem"): _memory_selected,
}


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
  """{(name, ...): leaf} of a params / sown-collection pytree."""
  return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(unbox(tree))[0]}


def _is_embedding(names: tuple[str, ...]) -> bool:
  return len(names) == 1 and names[0] in EMBEDDING


def _component(names: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]] | None:
  """(kind, component path, path inside it) of a param path, or None outside any."""
  if (len(names) > 2 and names[0].startswith("block_")
      and names[1] in ("attention", "ffn")):
    return names[1], "/".join(names[:2]), names[2:]
  if len(names) > 1 and names[0].startswith("memory_"):
    return "memory", names[0], names[1:]
  return None


def _options(model: ModelConfig, kind: str) -> Any:
  return registry.parse_options(kind, getattr(model, kind),
                                getattr(model, f"{kind}_options"),
                                f"config.model.{kind}_options")


def abstract_params(model: ModelConfig) -> Any:
  """The params pytree of `DecoderLM(model)` as `jax.ShapeDtypeStruct`s (no allocation)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return unbox(jax.eval_shape(DecoderLM(model).init, jax.random.key(0), tokens))["params"]


def count_params(params: Any) -> dict[str, int]:
  """{"total_params", "embedding_params" (embedding + untied lm_head),
  "nonembedding_params"} of a params pytree (arrays or shapes)."""
  sizes = {names: math.prod(leaf.shape) for names, leaf in _flatten(params).items()}
  embedding = sum(s for names, s in sizes.items() if _is_embedding(names))
  total = sum(sizes.values())
  return {"total_params": total, "embedding_params": embedding,
          "nonembedding_params": total - embedding}


def routed_params(model: ModelConfig, params: Any) -> dict[str, Routed]:
  """{"block_0/ffn/w_gate": Routed, ...}: the params of which a token reads only some
  axis-0 slices, as the chosen components declare in `ROUTED`."""
  options = {}
  routed = {}
  for names, leaf in _flatten(params).items():
    where = _component(names)
    if where is None or (where[0], getattr(model, where[0])) not in ROUTED:
      continue
    kind, _, inner = where
    if kind not in options:
      options[kind] = _options(model, kind)
    per_token = ROUTED[kind, getattr(model, kind)](options[kind], inner)
    if per_token is not None:
      units = leaf.shape[0]
      routed["/".join(names)] = Routed(units, math.prod(leaf.shape[1:]),
                                       min(per_token, units))
  return routed


def activated_params(model: ModelConfig, params: Any) -> int:
  """Non-embedding params used per token (module docstring)."""
  routed = routed_params(model, params)
  active = 0
  for names, leaf in _flatten(params).items():
    if _is_embedding(names):
      continue
    r = routed.get("/".join(names))
    active += r.per_token * r.unit_size if r else math.prod(leaf.shape)
  return active


def _mha_flops(model: ModelConfig, options, seq_len: int) -> float:
  d, heads, kv, hd = (model.d_model, model.num_heads, model.num_kv_heads,
                      model.resolved_head_dim)
  return (2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d)   # q, k, v, o
          + 2 * 2 * (seq_len / 2) * heads * hd)                      # QKᵀ, AV


def _glu_flops(model: ModelConfig, options) -> float:
  return 2 * 3 * model.d_model * model.resolved_d_ff


def _relu2_flops(model: ModelConfig, options) -> float:
  return 2 * 2 * model.d_model * model.resolved_d_ff


def _moe_flops(model: ModelConfig, options) -> float:
  d, f = model.d_model, options.resolved_d_expert(model.resolved_d_ff)
  return 2 * (d * options.num_experts + (options.top_k + options.num_shared) * 3 * d * f)


def _pkm_flops(model: ModelConfig, options) -> float:
  d, h, k, n = model.d_model, options.heads, options.knn, options.num_keys
  kdim = options.resolved_kdim(d)
  return (2 * d * h * 2 * kdim          # query projection
          + 2 * h * 2 * n * kdim        # sub-key scores (rows and columns)
          + h * k * k                   # k² candidate sums
          + 2 * h * k * d)              # softmax-weighted sum of k value rows


def _ultramem_flops(model: ModelConfig, options) -> float:
  d, h, m = model.d_model, options.heads, options.knn
  n, r, c = options.keys_per_side, options.tucker_rank, options.tucker_cores
  kdim, vdim, e = options.resolved_kdim(d), options.resolved_vdim(d), options.value_expand
  return (2 * d * 2 * kdim              # query projection (shared by the heads)
          + 2 * 2 * n * kdim * r * h    # S_row, S_col
          + 2 * 2 * h * n * r           # rank-1 candidate scores
          + h * m * m * 2 * r * r * c   # per-core Tucker grid over m² candidates
          + 2 * h * m * vdim            # weighted value sum
          + 2 * e * vdim * d)           # W_o


# Forward FLOPs per token of one component, by registry name (see the module docstring).
ATTENTION_FLOPS = {"mha": _mha_flops}
FFN_FLOPS = {"swiglu": _glu_flops, "relu2_glu": _glu_flops, "relu2": _relu2_flops,
             "moe": _moe_flops}
MEMORY_FLOPS = {"pkm": _pkm_flops, "ultramem": _ultramem_flops}
# Every projection does all its multiply-adds: ternary weights and top-K-masked
# activations (Q-Sparse) still go through dense matmuls here.
DENSE_LINEARS = ("dense", "bitnet", "qsparse", "bitnet_qsparse")


def _supported(model: ModelConfig, kind: str, table) -> None:
  name = getattr(model, kind)
  if name not in table:
    raise ValueError(f"flops_per_token: config.model.{kind}={name!r} is not supported; "
                     f"supported: {tuple(table)}")


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of `DecoderLM(model)` at context `seq_len` (module
  docstring); raises ValueError for components without a FLOP formula."""
  _supported(model, "attention", ATTENTION_FLOPS)
  _supported(model, "ffn", FFN_FLOPS)
  _supported(model, "linear", DENSE_LINEARS)
  attention_options, ffn_options = _options(model, "attention"), _options(model, "ffn")
  blocks = sum(ATTENTION_FLOPS[model.attention](block, attention_options, seq_len)
               + FFN_FLOPS[model.ffn](block, ffn_options)
               for block in map(model.for_layer, range(model.num_layers)))
  total = blocks + 2 * model.d_model * model.vocab_size
  if model.memory == "none":
    return float(total)
  _supported(model, "memory", MEMORY_FLOPS)
  memory = MEMORY_FLOPS[model.memory](model, _options(model, "memory"))
  return float(total + len(model.memory_placements) * memory)


def selected_units(model: ModelConfig, metrics: Any, intermediates: Any
                   ) -> dict[str, int]:
  """{"block_0/ffn" | "memory_0": distinct units one step read} from the "metrics" and
  "intermediates" collections that step sowed (MoE: experts with load > 0; memories:
  distinct value rows), in layer order."""
  groups: dict[str, tuple[Callable, dict[tuple[str, ...], Any]]] = {}
  for tree in (metrics, intermediates):
    for names, leaf in _flatten(tree).items():
      where = _component(names)
      if where is not None and (where[0], getattr(model, where[0])) in SELECTED:
        count = SELECTED[where[0], getattr(model, where[0])]
        groups.setdefault(where[1], (count, {}))[1][where[2]] = leaf
  order = lambda path: (path[0], int(path.split("/")[0].rsplit("_", 1)[1]))
  counts = {path: groups[path][0](groups[path][1]) for path in sorted(groups, key=order)}
  return {path: n for path, n in counts.items() if n is not None}


def decode_bytes_per_step(model: ModelConfig, params: Any,
                          selected: Mapping[str, int]) -> int:
  """Parameter bytes one decode step reads: all non-routed params, plus per routed
  param min(selected[its component], units) slices; `selected` as `selected_units`
  returns it (a model without routed params needs {})."""
  routed = routed_params(model, params)
  total = 0
  for names, leaf in _flatten(params).items():
    itemsize = np.dtype(leaf.dtype).itemsize
    r = routed.get("/".join(names))
    if r is None:
      total += math.prod(leaf.shape) * itemsize
      continue
    component = _component(names)[1]
    if component not in selected:
      raise ValueError(f"selected has no count for {component} (routed param "
                       f"{'/'.join(names)}); it has {sorted(selected)}")
    total += min(selected[component], r.units) * r.unit_size * itemsize
  return total
