"""Hugging Face `config.json` <-> `ModelConfig` for the Llama family.

Supported architectures (pre-norm RMSNorm decoders with rotate-half RoPE, GQA, SwiGLU):

  LlamaForCausalLM     incl. rope scaling "linear" and "llama3" (Llama 3.1+)
  MistralForCausalLM   without sliding-window attention (`sliding_window` null)
  Qwen2ForCausalLM     q/k/v biases (`ModelConfig.qkv_bias`), often tied embeddings
  MixtralForCausalLM   → the "moe" FFN: softmax router, top-k weights renormalized,
                         SwiGLU experts of size `intermediate_size`

Both config styles are read: transformers 4's top-level `rope_theta` / `rope_scaling`
and transformers 5's `rope_parameters`. A field that changes the math in a way the
model does not implement (sliding windows, o_proj/MLP biases, another activation,
quantization, an unknown rope type, ...) or any key this module does not know raises
`HFConfigError` naming the field: nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparsejax import validation
from sparsejax.models.config import ModelConfig
from sparsejax.ops.attention import RopeScaling

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}
ARCHITECTURES = tuple(MODEL_TYPES)

# transformers' defaults per architecture for the optional keys we read.
_DEFAULTS = {
    "LlamaForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10_000.0),
    "MistralForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10_000.0),
    "Qwen2ForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10_000.0),
    "MixtralForCausalLM": dict(rms_norm_eps=1e-5, rope_theta=1e6),
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "vocab_size")
# Keys that are read (mapped or checked) by `model_config_from_hf`.
_READ = {*_REQUIRED, "architectures", "model_type", "num_key_value_heads", "head_dim",
         "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
         "tie_word_embeddings", "initializer_range", "hidden_act", "attention_bias",
         "mlp_bias", "attention_dropout", "sliding_window", "use_sliding_window",
         "layer_types", "num_local_experts", "num_experts_per_tok",
         "router_aux_loss_coef", "router_jitter_noise"}
# Keys with no effect on the forward pass (generation, bookkeeping, HF runtime options).
_IGNORED = {"bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
            "use_cache", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
            "pretraining_tp", "max_window_layers", "output_router_logits",
            "output_attentions", "output_hidden_states", "return_dict", "auto_map",
            "tokenizer_class", "_attn_implementation_autoset", "use_return_dict",
            "is_decoder", "chunk_size_feed_forward", "bos_token", "eos_token"}


class HFConfigError(validation.ConfigError):
  """A Hugging Face config.json (or a ModelConfig to save) that cannot be converted."""


def _fail(source: str, field: str, value: Any, why: str) -> None:
  raise HFConfigError(f"{source}: {field}={value!r} {why}")


def architecture(hf: Mapping[str, Any], source: str) -> str:
  """The supported architecture named by `architectures` (or `model_type`)."""
  archs = hf.get("architectures")
  if not archs:
    by_type = {t: a for a, t in MODEL_TYPES.items()}
    if hf.get("model_type") in by_type:
      return by_type[hf["model_type"]]
    _fail(source, "architectures", archs, f"is missing and model_type="
          f"{hf.get('model_type')!r} is not one of {sorted(by_type)}")
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    _fail(source, "architectures", archs, f"is not supported: must be one of "
          f"{list(ARCHITECTURES)}")
  return archs[0]


def _rope(hf: Mapping[str, Any], arch: str, source: str) -> tuple[float, dict]:
  """(rope_theta, rope_scaling mapping or {}) from either config style."""
  params = dict(hf.get("rope_parameters") or {})
  field = "rope_parameters"
  if not params:
    params = dict(hf.get("rope_scaling") or {})
    field = "rope_scaling"
  theta = params.pop("rope_theta", hf.get("rope_theta", _DEFAULTS[arch]["rope_theta"]))
  rope_type = params.pop("rope_type", params.pop("type", "default"))
  if rope_type == "default":
    if params:
      _fail(source, field, params, "has keys a 'default' rope does not take")
    return float(theta), {}
  if rope_type not in ("linear", "llama3"):
    _fail(source, f"{field}.rope_type", rope_type,
          "is not supported: must be 'default', 'linear' or 'llama3'")
  scaling = dict(rope_type=rope_type, **params)
  if rope_type == "linear":  # only `factor` matters; keep the llama3 fields at defaults
    unknown = set(params) - {"factor"}
    if unknown:
      _fail(source, field, params, f"has keys {sorted(unknown)} a 'linear' rope does "
            "not take")
  validation.from_mapping(RopeScaling, scaling, f"{source}: {field}")
  return float(theta), scaling


def _check_unsupported(hf: Mapping[str, Any], arch: str, source: str) -> None:
  unknown = sorted(set(hf) - _READ - _IGNORED)
  if unknown:
    _fail(source, unknown[0], hf[unknown[0]], "is not a config field sparsejax knows "
          f"how to convert (unknown keys: {unknown}); remove it if it does not change "
          "the model")
  if hf.get("hidden_act", "silu") != "silu":
    _fail(source, "hidden_act", hf["hidden_act"], "is not supported: must be 'silu'")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      _fail(source, key, hf[key], "is not supported (biases on all projections): "
            "must be false")
  if hf.get("attention_dropout", 0.0):
    _fail(source, "attention_dropout", hf["attention_dropout"],
          "is not supported: must be 0")
  if hf.get("router_jitter_noise", 0.0):
    _fail(source, "router_jitter_noise", hf["router_jitter_noise"],
          "is not supported: must be 0")
  windowed = (hf.get("use_sliding_window", False) if arch == "Qwen2ForCausalLM"
              else hf.get("sliding_window") is not None)
  if windowed:
    _fail(source, "sliding_window", hf.get("sliding_window"),
          "(sliding-window attention) is not supported: the model attends to all "
          "previous tokens; it must be null (or use_sliding_window false)")
  types = set(hf.get("layer_types") or ())
  if types - {"full_attention"}:
    _fail(source, "layer_types", sorted(types), "is not supported: every layer must "
          "be 'full_attention'")
  if "quantization_config" in hf:
    _fail(source, "quantization_config", hf["quantization_config"],
          "is not supported: load an unquantized checkpoint")
  moe_keys = {"num_local_experts", "num_experts_per_tok"} & set(hf)
  if moe_keys and arch != "MixtralForCausalLM":
    key = sorted(moe_keys)[0]
    _fail(source, key, hf[key], f"belongs to MixtralForCausalLM, not {arch}")


def model_config_from_hf(hf: Mapping[str, Any], source: str = "config.json"
                         ) -> ModelConfig:
  """A validated `ModelConfig` (float32 params) for a supported HF config dict."""
  arch = architecture(hf, source)
  _check_unsupported(hf, arch, source)
  for key in _REQUIRED:
    if key not in hf:
      _fail(source, key, None, "is missing")
  heads = hf["num_attention_heads"]
  theta, scaling = _rope(hf, arch, source)
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      d_ff=hf["intermediate_size"], rope_theta=theta, rope_scaling=scaling,
      qkv_bias=arch == "Qwen2ForCausalLM",
      norm_eps=hf.get("rms_norm_eps", _DEFAULTS[arch]["rms_norm_eps"]),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=hf.get("initializer_range", 0.02))
  if arch == "MixtralForCausalLM":
    fields.update(ffn="moe", ffn_options=dict(
        num_experts=hf.get("num_local_experts", 8), top_k=hf.get("num_experts_per_tok", 2),
        d_expert=hf["intermediate_size"], scoring="softmax", renormalize=True,
        activation="swiglu", aux_loss_weight=hf.get("router_aux_loss_coef", 0.001),
        z_loss_weight=0.0))
  try:
    return validation.from_mapping(ModelConfig, fields, "config.model")
  except validation.ConfigError as e:
    raise HFConfigError(f"{source}: converts to an invalid model config: {e}") from None


def hf_architecture_for(cfg: ModelConfig) -> str:
  """The architecture `save_hf` writes `cfg` as when no `like` config is given."""
  if cfg.ffn == "moe":
    return "MixtralForCausalLM"
  return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def check_exportable(cfg: ModelConfig, arch: str) -> None:
  """Raises HFConfigError naming the `config.model` field `arch` cannot represent."""
  src = "config.model"
  for field, allowed in (("attention", "mha"), ("linear", "dense"), ("memory", "none")):
    if getattr(cfg, field) != allowed:
      _fail(src, field, getattr(cfg, field), f"has no {arch} equivalent: must be "
            f"{allowed!r}")
  if cfg.ffn != ("moe" if arch == "MixtralForCausalLM" else "swiglu"):
    _fail(src, "ffn", cfg.ffn, f"has no {arch} equivalent")
  for field in ("d_ff_per_layer", "num_heads_per_layer", "num_kv_heads_per_layer"):
    if getattr(cfg, field):
      _fail(src, field, getattr(cfg, field), f"has no {arch} equivalent (one size for "
            "every block): must be empty")
  if cfg.qkv_bias != (arch == "Qwen2ForCausalLM"):
    _fail(src, "qkv_bias", cfg.qkv_bias, f"does not match {arch} (q/k/v biases only "
          "in Qwen2ForCausalLM)")
  if cfg.ffn == "moe":
    from sparsejax.layers import registry
    opt = registry.parse_options("ffn", "moe", cfg.ffn_options, f"{src}.ffn_options")
    for field, want in (("scoring", "softmax"), ("renormalize", True),
                        ("activation", "swiglu"), ("num_shared", 0),
                        ("bias_update_rate", 0.0)):
      if getattr(opt, field) != want:
        _fail(src, f"ffn_options.{field}", getattr(opt, field),
              f"has no {arch} equivalent: must be {want!r}")


def hf_config_from_model(cfg: ModelConfig, arch: str, *, dtype: str,
                         like: Mapping[str, Any] | None = None) -> dict:
  """The config.json dict of `cfg` as `arch`; keys of `like` that don't describe the
  architecture (token ids, max_position_embeddings, ...) are kept, and its rope style
  (transformers 5 `rope_parameters` or 4 `rope_theta`/`rope_scaling`) is followed."""
  check_exportable(cfg, arch)
  out = {k: v for k, v in (like or {}).items() if k in _IGNORED}
  out.update(
      architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.resolved_head_dim, intermediate_size=cfg.resolved_d_ff,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      hidden_act="silu", initializer_range=cfg.init_std, attention_dropout=0.0)
  out.setdefault("max_position_embeddings", 4096)
  out["dtype" if "dtype" in out else "torch_dtype"] = dtype   # transformers 5 : 4 name
  if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
    out["sliding_window"] = None
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  if arch == "Qwen2ForCausalLM":
    out.update(use_sliding_window=False, sliding_window=None,
               layer_types=["full_attention"] * cfg.num_layers)
  if arch == "MixtralForCausalLM":
    from sparsejax.layers import registry
    opt = registry.parse_options("ffn", "moe", cfg.ffn_options, "config.model.ffn_options")
    out.update(num_local_experts=opt.num_experts, num_experts_per_tok=opt.top_k,
               intermediate_size=opt.resolved_d_expert(cfg.resolved_d_ff),
               router_aux_loss_coef=opt.aux_loss_weight, router_jitter_noise=0.0)
  scaling = dict(cfg.rope_scaling)
  if like is not None and "rope_parameters" in like:
    out["rope_parameters"] = {"rope_type": "default", **scaling,
                              "rope_theta": cfg.rope_theta}
  else:
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = scaling or None
  return out
