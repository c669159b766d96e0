"""Load and save Hugging Face safetensors checkpoints (Llama, Mistral, Qwen2, Mixtral).

    config, params = load_hf("path/to/Qwen2.5-0.5B", dtype=jnp.bfloat16, mesh=mesh)
    logits = DecoderLM(config).apply({"params": params}, tokens)
    save_hf("out/", config, params, like="path/to/Qwen2.5-0.5B")   # loads in transformers

`load_hf` reads a local directory: `config.json` (converted by
`sparsejax.interop.hf_config`) and `model.safetensors` or the shards listed in
`model.safetensors.index.json` (else every `*.safetensors` file). Tensors are read one
at a time with `safetensors.safe_open` (memory-mapped), converted to our layout in host
memory and placed on the device(s) — with `mesh`, straight into the param shardings of
`sparsejax.sharding` (each device receives only its slice) — so peak host memory is one
tensor (one stacked expert tensor for Mixtral), not the model.

Layouts (Flax kernels are [in, out], HF `Linear.weight` is [out, in]):

  model.embed_tokens.weight [V, D]            embedding [V, D]
  lm_head.weight [V, D] (absent when tied)    lm_head [D, V]
  layers.i.self_attn.q_proj.weight [H·Dh, D]  block_i/attention/q_proj/kernel [D, H, Dh]
     (k_proj, v_proj alike with Hkv heads; q/k/v_proj.bias [H·Dh] → q_bias [H, Dh])
  layers.i.self_attn.o_proj.weight [D, H·Dh]  block_i/attention/o_proj/kernel [H, Dh, D]
  layers.i.mlp.{gate,up,down}_proj.weight     block_i/ffn/{gate,up,down}_proj/kernel
  layers.i.{input,post_attention}_layernorm   block_i/{attn,ffn}_norm/scale
  model.norm.weight                           final_norm/scale
  Mixtral, per-expert layout (transformers 4, and `save_pretrained` by default):
    layers.i.block_sparse_moe.gate.weight [E, D]         block_i/ffn/router [D, E]
    layers.i.block_sparse_moe.experts.e.w1/w3 [F, D]     block_i/ffn/w_gate/w_up [E, D, F]
    layers.i.block_sparse_moe.experts.e.w2 [D, F]        block_i/ffn/w_down [E, F, D]
  Mixtral, fused layout (transformers 5 modules):
    layers.i.mlp.gate.weight [E, D]; layers.i.mlp.experts.gate_up_proj [E, 2F, D]
    (gate rows first); layers.i.mlp.experts.down_proj [E, D, F]

RoPE needs no permutation: `sparsejax.ops.attention.rope` rotates the pairs
(x[i], x[i + Dh/2]) like HF's `rotate_half`, so q/k columns keep their order.

`save_hf` writes the inverse (exact zeros of pruned weights stay exact zeros) and a
config.json transformers reads. Errors (`HFCheckpointError`, `HFConfigError`) name the
tensor, file or config field at fault.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from sparsejax import sharding
from sparsejax.interop import hf_config
from sparsejax.interop.hf_config import HFConfigError
from sparsejax.models import DecoderLM
from sparsejax.models.config import ModelConfig
from sparsejax.validation import ConfigError

INDEX = "model.safetensors.index.json"
LAYOUTS = ("per_expert", "fused")      # Mixtral expert tensor layouts
# Side files copied from `like` by save_hf (tokenizer and generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "generation_config.json")
_BUFFERS = (".rotary_emb.inv_freq",)   # non-parameter buffers some old checkpoints hold

__all__ = ["load_hf", "save_hf", "HFCheckpointError",
           "HFConfigError"]


class HFCheckpointError(ConfigError):
  """A checkpoint directory whose tensors do not match its config.json."""


@dataclasses.dataclass(frozen=True)
class _Rule:
  """Our params `ours` (paths "block_0/ffn/router") <-> HF tensors `theirs`."""
  ours: tuple[str, ...]
  theirs: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]                  # HF shapes of `theirs`
  to_ours: Callable[..., tuple[np.ndarray, ...]]       # (*theirs) -> ours
  to_theirs: Callable[..., tuple[np.ndarray, ...]]     # (*ours) -> theirs


def _linear(ours, theirs, d_in, out_shape):
  """Linear [prod(out), d_in] <-> kernel [d_in, *out_shape]."""
  n = int(np.prod(out_shape))
  return _Rule((ours,), (theirs,), ((n, d_in),),
               lambda w: (w.T.reshape(d_in, *out_shape),),
               lambda k: (k.reshape(d_in, n).T,))


def _out_linear(ours, theirs, in_shape, d_out):
  """Linear [d_out, prod(in)] <-> kernel [*in_shape, d_out]."""
  n = int(np.prod(in_shape))
  return _Rule((ours,), (theirs,), ((d_out, n),),
               lambda w: (w.T.reshape(*in_shape, d_out),),
               lambda k: (k.reshape(n, d_out).T,))


def _same(ours, theirs, shape, our_shape=None):
  our_shape = our_shape or shape
  return _Rule((ours,), (theirs,), (shape,), lambda w: (w.reshape(our_shape),),
               lambda p: (p.reshape(shape),))


def _moe_rules(cfg: ModelConfig, i: int, layout: str) -> list[_Rule]:
  from sparsejax.layers import registry
  opt = registry.parse_options("ffn", "moe", cfg.ffn_options, "config.model.ffn_options")
  e, d, f = opt.num_experts, cfg.d_model, opt.resolved_d_expert(cfg.resolved_d_ff)
  ours = f"block_{i}/ffn/"
  swap = lambda a: np.swapaxes(a, -1, -2)
  if layout == "fused":
    hf = f"model.layers.{i}.mlp."
    return [
        _linear(ours + "router", hf + "gate.weight", d, (e,)),
        _Rule((ours + "w_gate", ours + "w_up"), (hf + "experts.gate_up_proj",),
              ((e, 2 * f, d),), lambda gu: (swap(gu[:, :f]), swap(gu[:, f:])),
              lambda g, u: (np.concatenate([swap(g), swap(u)], axis=1),)),
        _Rule((ours + "w_down",), (hf + "experts.down_proj",), ((e, d, f),),
              lambda w: (swap(w),), lambda w: (swap(w),)),
    ]
  hf = f"model.layers.{i}.block_sparse_moe."
  names = lambda w: tuple(f"{hf}experts.{j}.{w}.weight" for j in range(e))
  stack = lambda *ws: (np.stack([w.T for w in ws]),)
  unstack = lambda w: tuple(x.T for x in w)
  return [
      _linear(ours + "router", hf + "gate.weight", d, (e,)),
      _Rule((ours + "w_gate",), names("w1"), ((f, d),) * e, stack, unstack),
      _Rule((ours + "w_up",), names("w3"), ((f, d),) * e, stack, unstack),
      _Rule((ours + "w_down",), names("w2"), ((d, f),) * e, stack, unstack),
  ]


def _rules(cfg: ModelConfig, layout: str = "per_expert") -> list[_Rule]:
  """All tensor rules of a supported `cfg` (see the module docstring)."""
  d, h, hkv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  rules = [_same("embedding", "model.embed_tokens.weight", (cfg.vocab_size, d)),
           _same("final_norm/scale", "model.norm.weight", (d,))]
  if not cfg.tie_embeddings:
    rules.append(_out_linear("lm_head", "lm_head.weight", (d,), cfg.vocab_size))
  for i in range(cfg.num_layers):
    ours, hf = f"block_{i}/", f"model.layers.{i}."
    att, hatt = ours + "attention/", hf + "self_attn."
    rules += [
        _same(ours + "attn_norm/scale", hf + "input_layernorm.weight", (d,)),
        _same(ours + "ffn_norm/scale", hf + "post_attention_layernorm.weight", (d,)),
        _linear(att + "q_proj/kernel", hatt + "q_proj.weight", d, (h, dh)),
        _linear(att + "k_proj/kernel", hatt + "k_proj.weight", d, (hkv, dh)),
        _linear(att + "v_proj/kernel", hatt + "v_proj.weight", d, (hkv, dh)),
        _out_linear(att + "o_proj/kernel", hatt + "o_proj.weight", (h, dh), d),
    ]
    if cfg.qkv_bias:
      rules += [_same(f"{att}{p}_bias", f"{hatt}{p}_proj.bias", (n * dh,), (n, dh))
                for p, n in (("q", h), ("k", hkv), ("v", hkv))]
    if cfg.ffn == "moe":
      rules += _moe_rules(cfg, i, layout)
      continue
    f, mlp = cfg.resolved_d_ff, hf + "mlp."
    rules += [_linear(ours + "ffn/gate_proj/kernel", mlp + "gate_proj.weight", d, (f,)),
              _linear(ours + "ffn/up_proj/kernel", mlp + "up_proj.weight", d, (f,)),
              _out_linear(ours + "ffn/down_proj/kernel", mlp + "down_proj.weight", (f,), d)]
  return rules


def _abstract_variables(cfg: ModelConfig) -> dict:
  """Boxed (`nn.LogicallyPartitioned`) ShapeDtypeStructs of DecoderLM(cfg)'s variables."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), tokens)


def _tensor_files(path: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a checkpoint directory."""
  index = os.path.join(path, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFCheckpointError(f"{index}: has no 'weight_map' object")
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    for name, file in files.items():
      if not os.path.exists(file):
        raise HFCheckpointError(f"{index}: tensor {name!r} is in {file!r}, which does "
                                "not exist")
    return files
  paths = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not paths:
    raise HFCheckpointError(f"{path!r} has no *.safetensors file (nor {INDEX}); "
                            "PyTorch .bin checkpoints are not supported")
  files = {}
  for file in paths:
    with safe_open(file, "np") as f:
      files.update({name: file for name in f.keys()})
  return files


def _check_names(rules: list[_Rule], files: Mapping[str, str], path: str,
                 arch: str) -> None:
  expected = {name for rule in rules for name in rule.theirs}
  ignorable = {n for n in files if n.endswith(_BUFFERS) or n == "lm_head.weight"}
  missing = sorted(expected - set(files))
  if missing:
    raise HFCheckpointError(f"{path}: missing tensor {missing[0]!r} needed by its "
                            f"config.json ({arch}; {len(missing)} missing: "
                            f"{missing[:6]}{' ...' if len(missing) > 6 else ''})")
  unexpected = sorted(set(files) - expected - ignorable)
  if unexpected:
    raise HFCheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} ({arch} as "
                            f"configured has no such weight; {len(unexpected)} "
                            f"unexpected: {unexpected[:6]})")


def _mixtral_layout(names) -> str:
  return "fused" if any(n.endswith("experts.gate_up_proj") for n in names) else \
      "per_expert"


def read_config(path: str) -> dict:
  """The config.json dict of a checkpoint directory."""
  file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise HFCheckpointError(f"{path!r} is not a directory (expected a Hugging Face "
                            "checkpoint directory with config.json)")
  if not os.path.exists(file):
    raise HFCheckpointError(f"{path!r} has no config.json")
  with open(file) as f:
    return json.load(f)


def load_hf(path: str, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None
            ) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of the Hugging Face checkpoint directory `path`.

  Params are `dtype` arrays (float32 by default; bf16 checkpoints convert exactly) in
  the tree of `DecoderLM(config).init(...)["params"]`, placed with the model's
  shardings on `mesh` when given (else on the default device). The config's `dtype` and
  `param_dtype` are `dtype`. Raises HFConfigError / HFCheckpointError naming the field
  or tensor for unsupported configs, missing/unexpected tensors and shape mismatches.
  """
  hf = read_config(path)
  source = os.path.join(path, "config.json")
  arch = hf_config.architecture(hf, source)
  dtype_name = jnp.dtype(dtype).name
  cfg = dataclasses.replace(hf_config.model_config_from_hf(hf, source),
                            dtype=dtype_name, param_dtype=dtype_name)
  files = _tensor_files(path)
  rules = _rules(cfg, _mixtral_layout(files))
  _check_names(rules, files, path, arch)
  boxed = traverse_util.flatten_dict(_abstract_variables(cfg)["params"], sep="/")
  assert sorted(boxed) == sorted(p for r in rules for p in r.ours), "rules out of sync"
  shardings = (traverse_util.flatten_dict(sharding.tree_shardings(
      traverse_util.unflatten_dict(boxed, sep="/"), mesh), sep="/")
               if mesh is not None else {})
  params = {}
  for rule in rules:
    tensors = [_read_tensor(files[name], name, shape, path)
               for name, shape in zip(rule.theirs, rule.shapes)]
    for our_path, value in zip(rule.ours, rule.to_ours(*tensors)):
      value = np.ascontiguousarray(value, dtype=jnp.dtype(dtype))
      params[our_path] = jax.device_put(value, shardings.get(our_path))
    del tensors, value
  return cfg, traverse_util.unflatten_dict(params, sep="/")


def _read_tensor(file: str, name: str, shape: tuple[int, ...], path: str) -> np.ndarray:
  """One tensor, checked against its expected shape. The file is memory-mapped only
  while it is read, so its pages do not accumulate in the process's memory."""
  with safe_open(file, "np") as f:
    tensor = f.get_tensor(name)
  if tensor.shape != shape:
    raise HFCheckpointError(f"{path}: tensor {name!r} has shape {tensor.shape}, but "
                            f"its config.json implies {shape}")
  return tensor


def _like(like: str | Mapping[str, Any] | None) -> tuple[dict | None, str | None]:
  """(config dict, checkpoint directory or None) of save_hf's `like`."""
  if like is None or isinstance(like, Mapping):
    return (dict(like) if like is not None else None), None
  return read_config(like), like


def save_hf(path: str, model_config: ModelConfig, params: Any, *,
            like: str | Mapping[str, Any] | None = None,
            max_shard_size: int = 5 * 2**30) -> None:
  """Writes `params` of `DecoderLM(model_config)` as a Hugging Face checkpoint in `path`.

  `path` must not exist or be an empty directory; files are written to a temporary
  sibling directory that is renamed when complete. `like` (a checkpoint directory or a
  config.json dict, e.g. the one the model was loaded from) sets the architecture, the
  Mixtral expert layout, the config style and its non-architecture keys (token ids, ...);
  its tokenizer and generation files are copied. Without it the architecture follows
  the model (MoE → Mixtral, q/k/v biases → Qwen2, else Llama). Tensors keep the params'
  dtype, are fetched one at a time and written in shards of at most `max_shard_size`
  bytes (several shards get a `model.safetensors.index.json`).
  """
  like_cfg, like_dir = _like(like)
  arch = (hf_config.architecture(like_cfg, "like") if like_cfg is not None
          else hf_config.hf_architecture_for(model_config))
  flat = traverse_util.flatten_dict(sharding.unbox(params), sep="/")  # init's boxes too
  dtypes = {jnp.dtype(v.dtype).name for v in flat.values()}
  if len(dtypes) != 1:
    raise HFCheckpointError(f"params mix dtypes {sorted(dtypes)}; cast them to one")
  config = hf_config.hf_config_from_model(model_config, arch, dtype=dtypes.pop(),
                                          like=like_cfg)
  layout = _mixtral_layout(_tensor_files(like_dir)) if like_dir else "per_expert"
  rules = _rules(model_config, layout)
  want = {p for r in rules for p in r.ours}
  extra, missing = sorted(set(flat) - want), sorted(want - set(flat))
  if extra or missing:
    raise HFCheckpointError(f"params do not match {arch} for this config: unexpected "
                            f"{extra[:6]}, missing {missing[:6]}")
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f"save_hf: {path!r} exists and is not an empty directory")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".save_hf_", dir=parent)
  try:
    _write_tensors(tmp, rules, flat, max_shard_size)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    for name in SIDE_FILES if like_dir else ():
      if os.path.exists(os.path.join(like_dir, name)):
        shutil.copy(os.path.join(like_dir, name), os.path.join(tmp, name))
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _write_tensors(out: str, rules: list[_Rule], flat: Mapping[str, Any],
                   max_shard_size: int) -> None:
  """Streams tensors into shard files of at most `max_shard_size` bytes (+ index)."""
  shard, shard_bytes, names, total = {}, 0, [], 0
  def flush():
    nonlocal shard, shard_bytes
    if shard:
      save_file(shard, os.path.join(out, f"shard-{len(names):05d}.safetensors"),
                metadata={"format": "pt"})
      names.append(sorted(shard))
    shard, shard_bytes = {}, 0
  for rule in rules:
    values = [np.asarray(jax.device_get(flat[p])) for p in rule.ours]
    for name, tensor in zip(rule.theirs, rule.to_theirs(*values)):
      tensor = np.ascontiguousarray(tensor)
      if shard and shard_bytes + tensor.nbytes > max_shard_size:
        flush()
      shard[name] = tensor
      shard_bytes += tensor.nbytes
      total += tensor.nbytes
  flush()
  if len(names) == 1:
    os.rename(os.path.join(out, "shard-00000.safetensors"),
              os.path.join(out, "model.safetensors"))
    return
  weight_map = {}
  for i, tensors in enumerate(names):
    file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
    os.rename(os.path.join(out, f"shard-{i:05d}.safetensors"), os.path.join(out, file))
    weight_map.update({name: file for name in tensors})
  with open(os.path.join(out, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
              indent=2, sort_keys=True)


# Model fields continue-training takes from the checkpoint; the rest of config.model
# (dtypes, remat, linear / attention variants that add no params, kernels) stays.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "d_ff", "rope_theta", "rope_scaling",
                       "qkv_bias", "norm_eps", "tie_embeddings", "ffn")
MOE_ARCHITECTURE_OPTIONS = ("num_experts", "top_k", "d_expert", "scoring", "renormalize",
                            "activation")


def with_hf_model(config):
  """`config` (a `sparsejax.train.config.Config`) with the architecture of the
  checkpoint `config.train.init_from_hf` (`ARCHITECTURE_FIELDS`; for Mixtral also the
  routing options, keeping the user's other `ffn_options`), and `config.data.tokenizer`
  set to the checkpoint's tokenizer.json when left at "bytes"."""
  from sparsejax.train.config import config_to_dict, parse_config
  path = config.train.init_from_hf
  field = f"config.train.init_from_hf={path!r}"
  try:
    hf_model = hf_config.model_config_from_hf(read_config(path),
                                              os.path.join(path, "config.json"))
  except (HFCheckpointError, HFConfigError) as e:
    raise HFConfigError(f"{field}: {e}") from None
  merged = config_to_dict(config)
  model = merged["model"]
  options = dict(model["ffn_options"]) if model["ffn"] == hf_model.ffn else {}
  model.update({f: getattr(hf_model, f) for f in ARCHITECTURE_FIELDS})
  model["ffn_options"] = {**options, **{k: v for k, v in hf_model.ffn_options.items()
                                        if k in MOE_ARCHITECTURE_OPTIONS}}
  tokenizer = os.path.join(path, "tokenizer.json")
  if merged["data"]["tokenizer"] == "bytes" and os.path.exists(tokenizer):
    merged["data"]["tokenizer"] = tokenizer
  return parse_config(merged)


def load_params_for(trainer) -> Any:
  """The params of `trainer.config.train.init_from_hf`, placed on the trainer's mesh
  in its param dtype; raises naming the field when its model's params differ."""
  path = trainer.config.train.init_from_hf
  _, params = load_hf(path, dtype=jnp.dtype(trainer.config.model.param_dtype),
                      mesh=trainer.mesh)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), trainer.abstract_state.params)
  have = jax.tree.map(lambda a: (a.shape, a.dtype), params)
  if want != have:
    raise HFCheckpointError(
        f"config.train.init_from_hf={path!r}: this model's parameters differ from the "
        "checkpoint's (config.model adds or changes weights, e.g. a memory layer)")
  return params
