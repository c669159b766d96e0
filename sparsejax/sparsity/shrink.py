"""Shape shrink: a model whose FFN channels and attention heads were pruned as whole
units becomes a smaller dense model with the same logits.

Units (one per block; Flax kernels are [in, out]):

  FFN channel j    column j of gate_proj / up_proj [D, F] and row j of down_proj [F, D]
                   (SwiGLU, ReLU²-GLU, ReLU²); for the "moe" FFN the pair (expert
                   e, j) of w_gate / w_up [E, D, F] and w_down [E, F, D], and the
                   shared experts' gate_proj / up_proj / down_proj like a dense FFN.
  query head h     q_proj [D, Hq, Dh] (axis 1), o_proj [Hq, Dh, D] (axis 0), q_bias.
  kv head g        k_proj / v_proj [D, Hkv, Dh] (axis 1), k_bias / v_bias; it serves the
                   query heads g·G .. g·G+G-1 (G = Hq / Hkv: the grouping of
                   `jax.nn.dot_product_attention`).

Dropping a unit is exact when its slices are zero: a zero down_proj row (or gate/up
column: silu(0) = relu(0)² = 0) adds nothing, and a query head with a zero o_proj slice
adds nothing, whatever its attention weights.

Mask rules (`shrink` raises ValueError naming the tensor otherwise):
  * a mask is a bool array of its param's shape, True = kept; a tensor without a mask
    keeps everything;
  * the mask of a unit-carrying tensor is constant over each unit's slice, and all the
    masks of one unit agree (a column of gate_proj is pruned iff that row of down_proj
    is) — `channel_masks` builds such masks;
  * GQA: a kv head is dropped exactly when every query head of its group is (its k/v
    masks, if given, must say so), and the groups that stay keep the same number G' of
    query heads, so the block is again GQA with Hq' = G'·Hkv'. This covers both pruning
    whole groups and pruning the query heads of every group uniformly;
  * an MoE block keeps the same number F' of channels in every expert, and its shared
    experts keep num_shared·F';
  * every block keeps at least one channel and one head.
Masks on any other tensor (embedding, norms, router, ...) are applied (pruned entries
set to 0), so the shrunk model equals the masked model everywhere.

The smaller config keeps single sizes (d_ff, num_heads / num_kv_heads with head_dim
made explicit, MoE d_expert) when all blocks agree, else per-block tuples
(`ModelConfig.d_ff_per_layer`, `num_heads_per_layer`, `num_kv_heads_per_layer`; MoE:
d_expert = 0 and d_ff_per_layer = F'·(top_k + num_shared)). Only `linear="dense"`
models shrink: BitNet's absmean scale and Q-Sparse's per-token top-k depend on the
tensor's size, so removing zeros would change their outputs.

Structured pruning of channels and heads: Li et al. 2017 ("Pruning Filters for Efficient
ConvNets"), Michel et al. 2019 ("Are Sixteen Heads Really Better than One?").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.core
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import sharding
from sparsejax.layers import registry
from sparsejax.models.config import ModelConfig
from sparsejax.sparsity.masks import keep_count, keep_top_k
from sparsejax.validation import check, check_choice

ATTENTIONS = ("mha", "block_sparse")
FFNS = ("swiglu", "relu2_glu", "relu2", "moe")
SCORES = ("magnitude",)

# Unit-carrying tensors of a component: {name under the component: unit axis} (those
# a component lacks, e.g. relu2's gate_proj or the biases without qkv_bias, are skipped).
GLU_UNITS = {"gate_proj/kernel": 1, "up_proj/kernel": 1, "down_proj/kernel": 0}
EXPERT_UNITS = {"w_gate": 2, "w_up": 2, "w_down": 1}          # axis 0: the expert
QUERY_UNITS = {"q_proj/kernel": 1, "o_proj/kernel": 0, "q_bias": 0}
KV_UNITS = {"k_proj/kernel": 1, "v_proj/kernel": 1, "k_bias": 0, "v_bias": 0}


def _check_model(model: ModelConfig) -> None:
  check(model.linear == "dense", "config.model.linear", model.linear,
        '"dense" to shrink (a BitNet scale or Q-Sparse top-k depends on the size)')
  check_choice("config.model.attention", model.attention, ATTENTIONS)
  check_choice("config.model.ffn", model.ffn, FFNS)


def _flat(tree: Any) -> dict[str, Any]:
  tree = sharding.unbox(tree)
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  return {k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items()
          if v is not None}


def _kept_units(path: str, mask, shape: tuple[int, ...], axis: int,
                batch: tuple[int, ...] = ()) -> np.ndarray:
  """bool [*batch sizes, units]: the units `mask` keeps; ValueError unless it is
  constant over every unit's slice."""
  mask = np.asarray(mask)
  if mask.dtype != bool or mask.shape != shape:
    raise ValueError(f"mask of {path} must be bool {shape} like its param, got "
                     f"{mask.dtype} {mask.shape}")
  moved = np.moveaxis(mask, (*batch, axis), tuple(range(len(batch) + 1)))
  rest = tuple(range(len(batch) + 1, mask.ndim))
  kept, whole = moved.any(axis=rest), moved.all(axis=rest)
  if (kept != whole).any():
    unit = tuple(int(i) for i in np.argwhere(kept != whole)[0])
    raise ValueError(f"mask of {path} prunes part of unit {unit} (along axis {axis}); "
                     "shrink drops whole channels / heads only")
  return kept


def _agreed(prefix: str, units: dict[str, int], params: dict, masks: dict,
            batch: tuple[int, ...] = ()) -> np.ndarray | None:
  """The units kept by the masks of the tensors `prefix/name` (None: no mask); all
  masks of one unit must agree."""
  found = {}
  for name, axis in units.items():
    path = f"{prefix}/{name}"
    if path in masks:
      found[path] = _kept_units(path, masks[path], params[path].shape, axis, batch)
  if not found:
    return None
  (first, kept), *others = found.items()
  for path, other in others:
    if other.shape != kept.shape or (other != kept).any():
      raise ValueError(f"masks of {first} and {path} disagree on which units are kept; "
                       "every mask of a channel / head must prune it alike")
  return kept


def _ffn_width(model, layer, params, masks, keep) -> int:
  """Records the kept FFN channels of block `layer` in `keep`; returns F' (per expert
  for MoE)."""
  prefix = f"block_{layer}/ffn"
  if model.ffn != "moe":
    kept = _agreed(prefix, GLU_UNITS, params, masks)
    width = params[f"{prefix}/up_proj/kernel"].shape[1]
    kept = np.ones(width, bool) if kept is None else kept
    keep.update({f"{prefix}/{n}": (a, kept) for n, a in GLU_UNITS.items()})
    return _nonzero(int(kept.sum()), f"{prefix} (FFN channels)")
  experts = _agreed(prefix, EXPERT_UNITS, params, masks, batch=(0,))
  experts = (np.ones(params[f"{prefix}/w_up"].shape[::2], bool) if experts is None
             else experts)
  counts = experts.sum(axis=1)
  if (counts != counts[0]).any():
    raise ValueError(f"{prefix}: the experts keep different channel counts "
                     f"{counts.tolist()}; MoE shrink needs one count F' for all")
  keep.update({f"{prefix}/{n}": (a, experts) for n, a in EXPERT_UNITS.items()})
  shared = _moe_options(model).num_shared
  if shared:
    kept = _agreed(f"{prefix}/shared", GLU_UNITS, params, masks)
    width = params[f"{prefix}/shared/up_proj/kernel"].shape[1]
    kept = np.ones(width, bool) if kept is None else kept
    if kept.sum() != shared * counts[0]:
      raise ValueError(f"{prefix}/shared keeps {int(kept.sum())} channels; with "
                       f"{counts[0]} per routed expert it must keep num_shared·F' = "
                       f"{shared * counts[0]}")
    keep.update({f"{prefix}/shared/{n}": (a, kept) for n, a in GLU_UNITS.items()})
  return _nonzero(int(counts[0]), f"{prefix} (channels per expert)")


def _heads(model, layer, params, masks, keep) -> tuple[int, int]:
  """Records the kept heads of block `layer` in `keep`; returns (Hq', Hkv')."""
  prefix = f"block_{layer}/attention"
  hq = params[f"{prefix}/q_proj/kernel"].shape[1]
  hkv = params[f"{prefix}/k_proj/kernel"].shape[1]
  query = _agreed(prefix, QUERY_UNITS, params, masks)
  query = np.ones(hq, bool) if query is None else query
  per_group = query.reshape(hkv, hq // hkv).sum(axis=1)
  used = per_group > 0
  kv = _agreed(prefix, KV_UNITS, params, masks)
  if kv is not None and (kv != used).any():
    g = int(np.argmax(kv != used))
    verb = "drop" if used[g] else "keep"
    raise ValueError(f"{prefix}: the k/v masks {verb} kv head {g}, whose query heads "
                     f"keep {per_group[g]}; a kv head is dropped exactly when all the "
                     "query heads of its group are")
  if len(set(per_group[used].tolist())) > 1:
    raise ValueError(f"{prefix}: the kv groups keep {per_group.tolist()} query heads; "
                     "the groups that stay must keep the same number (GQA)")
  keep.update({f"{prefix}/{n}": (a, query) for n, a in QUERY_UNITS.items()})
  keep.update({f"{prefix}/{n}": (a, used) for n, a in KV_UNITS.items()})
  return (_nonzero(int(query.sum()), f"{prefix} (query heads)"), int(used.sum()))


def _nonzero(count: int, what: str) -> int:
  if count < 1:
    raise ValueError(f"{what}: the masks prune every unit; a block keeps at least one")
  return count


def _take(param: jax.Array, axis: int, kept: np.ndarray) -> jax.Array:
  """The slices of `param` along `axis` that `kept` keeps ([E, units] kept: per expert
  along axis 0)."""
  if kept.ndim == 1:
    return jnp.take(param, np.flatnonzero(kept), axis=axis)
  index = np.stack([np.flatnonzero(row) for row in kept])            # [E, F']
  shape = [1] * param.ndim
  shape[0], shape[axis] = index.shape
  return jnp.take_along_axis(param, index.reshape(shape), axis=axis)


def _moe_options(model: ModelConfig):
  return registry.parse_options("ffn", model.ffn, model.ffn_options,
                                "config.model.ffn_options")


def _sizes(values: list, single: dict, per_layer: dict) -> dict:
  """Config changes: `single` if all blocks have the same sizes, else `per_layer`."""
  return single if len(set(values)) == 1 else per_layer


def shrink(params: Any, masks: Any,
           model_config: ModelConfig) -> tuple[ModelConfig, Any]:
  """Drops the pruned FFN channels and attention heads (module docstring).

  Args:
    params: the `DecoderLM(model_config)` params (its "params" collection: nested dicts
      of arrays, as `TrainState.params`).
    masks: bool arrays, True = kept, in the same nesting for any subset of the params
      (a missing or None entry keeps its whole tensor).
    model_config: the params' config.

  Returns:
    (smaller_config, smaller_params): `DecoderLM(smaller_config)` applied to
    smaller_params gives the logits of `model_config` applied to params·masks; the
    param count drops by exactly the pruned units' entries.
  """
  _check_model(model_config)
  flat_params, flat_masks = _flat(params), _flat(masks)
  unknown = sorted(set(flat_masks) - set(flat_params))
  if unknown:
    raise ValueError(f"masks for tensors the params lack: {', '.join(unknown[:3])}")
  keep: dict[str, tuple[int, np.ndarray]] = {}
  layers = range(model_config.num_layers)
  widths = [_ffn_width(model_config, l, flat_params, flat_masks, keep) for l in layers]
  heads = [_heads(model_config, l, flat_params, flat_masks, keep) for l in layers]
  out = {}
  for path, param in flat_params.items():
    if path in flat_masks:
      param = jnp.where(jnp.asarray(flat_masks[path]), param,
                        jnp.zeros((), param.dtype))
    if path in keep:
      param = _take(param, *keep[path])
    out[path] = param
  return _smaller_config(model_config, widths, heads), traverse_util.unflatten_dict(
      out, sep="/")


def _smaller_config(model: ModelConfig, widths: list[int],
                    heads: list[tuple[int, int]]) -> ModelConfig:
  changes = dict(head_dim=model.resolved_head_dim)
  changes.update(_sizes(heads,
                        dict(num_heads=heads[0][0], num_kv_heads=heads[0][1],
                             num_heads_per_layer=(), num_kv_heads_per_layer=()),
                        dict(num_heads_per_layer=tuple(h for h, _ in heads),
                             num_kv_heads_per_layer=tuple(kv for _, kv in heads))))
  if model.ffn != "moe":
    changes.update(_sizes(widths, dict(d_ff=widths[0], d_ff_per_layer=()),
                          dict(d_ff_per_layer=tuple(widths))))
  else:
    parsed, options = _moe_options(model), dict(model.ffn_options)
    with_d_expert = lambda f: flax.core.FrozenDict({**options, "d_expert": f})
    uniform = dict(ffn_options=with_d_expert(widths[0]), d_ff_per_layer=())
    changes.update(_sizes(widths, uniform, dict(
        ffn_options=with_d_expert(0),
        d_ff_per_layer=tuple(w * (parsed.top_k + parsed.num_shared) for w in widths))))
  smaller = dataclasses.replace(model, **changes)
  smaller.validate()
  return smaller


def _unit_scores(flat: dict, prefix: str, units: dict[str, int],
                 batch: tuple[int, ...] = ()) -> jax.Array:
  """Σ over the unit-carrying tensors present of mean |w| over each unit's slice:
  float32 [units] ([E, units] with batch=(0,))."""
  total = 0.0
  for name, axis in units.items():
    if f"{prefix}/{name}" in flat:
      w = jnp.abs(flat[f"{prefix}/{name}"].astype(jnp.float32))
      total = total + jnp.mean(w, axis=tuple(a for a in range(w.ndim)
                                             if a not in (*batch, axis)))
  return total


def _unit_masks(flat: dict, prefix: str, units: dict[str, int], kept: jax.Array,
                batch: tuple[int, ...] = ()) -> dict[str, jax.Array]:
  """{path: kept spread over the param's shape} for the unit tensors present."""
  out = {}
  for name, axis in units.items():
    if f"{prefix}/{name}" in flat:
      shape = flat[f"{prefix}/{name}"].shape
      others = [a for a in range(len(shape)) if a not in (*batch, axis)]
      out[f"{prefix}/{name}"] = jnp.broadcast_to(jnp.expand_dims(kept, others), shape)
  return out


def _count(density, n: int, what: str) -> int:
  k = keep_count(density, n)
  if k < 1:
    raise ValueError(f"density={density} keeps round({density}·{n}) = 0 {what}; "
                     "every block must keep at least one")
  return k


def channel_masks(params: Any, model_config: ModelConfig, density: float, *,
                  score: str = "magnitude") -> Any:
  """Channel and head masks for `shrink`: per block, the k = round(density·n) units
  with the largest scores (ties: lower index, `keep_top_k`).

  Units scored (score="magnitude": the sum over the unit's tensors of their mean |w|
  over the unit's slice): the FFN channels (per expert for MoE: round(density·F) in
  every expert, and num_shared times that in the shared experts), and the attention's
  kv groups — a kv head with its G query heads, so GQA blocks drop whole groups and
  multi-head attention (G = 1) drops single heads.

  Args:
    params: the `DecoderLM(model_config)` params (as for `shrink`).
    model_config: their config (linear="dense"; attention "mha" / "block_sparse").
    density: fraction of units kept per block, in [0, 1], keeping at least one.
    score: "magnitude".

  Returns:
    bool masks (True = kept) in the params' nesting, for the unit-carrying tensors only.
  """
  _check_model(model_config)
  check_choice("score", score, SCORES)
  flat, masks = _flat(params), {}
  for layer in range(model_config.num_layers):
    prefix = f"block_{layer}/ffn"
    if model_config.ffn == "moe":
      scores = _unit_scores(flat, prefix, EXPERT_UNITS, batch=(0,))
      k = _count(density, scores.shape[1], f"of the {prefix} expert channels")
      kept = jax.vmap(keep_top_k, in_axes=(0, None))(scores, k)
      masks.update(_unit_masks(flat, prefix, EXPERT_UNITS, kept, batch=(0,)))
      if f"{prefix}/shared/up_proj/kernel" in flat:
        k *= _moe_options(model_config).num_shared
        kept = keep_top_k(_unit_scores(flat, f"{prefix}/shared", GLU_UNITS), k)
        masks.update(_unit_masks(flat, f"{prefix}/shared", GLU_UNITS, kept))
    else:
      scores = _unit_scores(flat, prefix, GLU_UNITS)
      k = _count(density, scores.size, f"of the {prefix} channels")
      kept = keep_top_k(scores, k)
      masks.update(_unit_masks(flat, prefix, GLU_UNITS, kept))
    prefix = f"block_{layer}/attention"
    groups = _unit_scores(flat, prefix, KV_UNITS)
    query = _unit_scores(flat, prefix, QUERY_UNITS).reshape(groups.size, -1)
    kept = keep_top_k(groups + query.sum(axis=1),
                      _count(density, groups.size, f"of the {prefix} kv groups"))
    masks.update(_unit_masks(flat, prefix, KV_UNITS, kept))
    masks.update(_unit_masks(flat, prefix, QUERY_UNITS,
                             jnp.repeat(kept, query.shape[1])))
  return traverse_util.unflatten_dict(masks, sep="/")
