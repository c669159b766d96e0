"""Export a trained BitNet b1.58 run to packed ternary weights, and load it for inference.

    report = export_ternary("workdir/bitnet", "workdir/bitnet_export", format="base3")
    model, variables = load_ternary("workdir/bitnet_export")
    logits = model.apply(variables, tokens)     # == the fake-quantized model's, bitwise

`export_ternary` restores the latest checkpoint of a run whose `config.model.linear` is
"bitnet" or "bitnet_qsparse", quantizes every BitDense kernel (all attention/FFN
projections) with `ternary_quantize` into int8 codes and one float32 scale, packs the
codes (`sparsejax.ops.ternary_pack`: 5 trits/byte = 1.6 bits, or 2 bits per weight) and
keeps every other variable (embedding, norms, lm_head, non-parameter state) as is.

`out_dir` then holds
  weights.npz    one array per variable path ("params/block_0/attention/q_proj/codes"):
                 packed uint8 codes, float32 0-d scales, float arrays (bfloat16 is stored
                 as its uint16 bits);
  manifest.json  {"format_version", "format", "step", "source", "config" (the run's
                 config with model.linear_options.weights = "ternary"), "tensors"
                 {path: kind, shape, dtype, bytes}, "report"}; written last, so a
                 directory with a manifest is a complete export.

`load_ternary` rebuilds `DecoderLM` with `weights="ternary"` BitDense layers (params
"codes" and "scale" instead of "kernel"), unpacks the codes with jnp and returns
(model, variables). BitDense computes codes·scale with the same ops as `fake_ternary`,
so the loaded model's logits are bitwise equal to the trained (fake-quantized) model's
on the same device and compilation (XLA's reductions are deterministic for a given
program; a sharded or differently-fused model may differ in the last bits).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparsejax import sharding
from sparsejax.models import DecoderLM, parse_model_config
from sparsejax.ops.quant import ternary_quantize
from sparsejax.ops.ternary_pack import (FORMATS, bits_per_weight, check_packed,
                                        pack_ternary, unpack_ternary)
from sparsejax.train.config import Config, config_to_dict, parse_config
from sparsejax.train.state import split_variables
from sparsejax.train.trainer import inference_params, restore_run

BITNET_LINEARS = ("bitnet", "bitnet_qsparse")
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.npz"
MANIFEST_FILE = "manifest.json"
_NATIVE_FLOATS = ("float16", "float32", "float64")


# ------------------------------------------------------------------------ restoring

def restore_latent(path: str, step: int | None = None) -> tuple[Config, dict, int]:
  """(config, variables, step) of a run's checkpoint (the latest when step is None).

  `path` is a training workdir or its `checkpoints/` directory. `variables` =
  {"params": ..., **model_state} as host NumPy arrays.
  """
  config, state, step = restore_run(path, step=step)
  variables = {"params": inference_params(config, state), **state.model_state}
  return config, jax.device_get(variables), step


def ternary_model_config(config: Config) -> dict:
  """The run's config dict with `model.linear_options.weights = "ternary"`."""
  if config.model.linear not in BITNET_LINEARS:
    raise ValueError(f"export needs a BitNet run: config.model.linear="
                     f"{config.model.linear!r} must be one of {BITNET_LINEARS}")
  config_dict = config_to_dict(config)
  model = config_dict["model"]
  model["linear_options"] = {**model["linear_options"], "weights": "ternary"}
  parse_model_config(model)   # validates
  return config_dict


# -------------------------------------------------------------------- tree helpers

def _abstract_variables(model_cfg: Any, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of DecoderLM(model_cfg)'s saved variables."""
  model = DecoderLM(model_cfg)
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
  params, model_state = split_variables(sharding.unbox(boxed))
  return traverse_util.flatten_dict({"params": params, **model_state}, sep="/")


def _nbytes(x: Any) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _mib(n: int) -> str:
  return f"{n / 2**20:,.3f} MiB"


# ------------------------------------------------------------------------- export

def export_ternary(path: str, out_dir: str, *, format: str = "base3",
                   step: int | None = None, verbose: bool = True) -> dict:
  """Exports a BitNet run's checkpoint to packed ternary weights in `out_dir`.

  Args:
    path: the run's workdir (or its checkpoints/ directory).
    out_dir: created if needed; `weights.npz` and `manifest.json` are (re)written.
    format: "base3" (1.6 bits/weight) or "2bit".
    step: the checkpoint step (default: the latest).
    verbose: print the size table.

  Returns:
    The size report: bytes of the latent checkpoint variables vs the export, total and
    for the ternary (linear-layer) weights only, their ratios, the effective bits per
    ternary weight (packing + scales + padding) and the file size on disk.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r} must be one of {FORMATS}")
  config, variables, step = restore_latent(path, step)
  config_dict = ternary_model_config(config)
  target = _abstract_variables(parse_model_config(config_dict["model"]),
                               config.data.seq_len)
  latent = traverse_util.flatten_dict(variables, sep="/")
  quantize = jax.jit(ternary_quantize)

  arrays: dict[str, np.ndarray] = {}
  tensors: dict[str, dict] = {}
  used = set()
  sizes = dict(latent_total=0, latent_linear=0, export_total=0, export_linear=0,
               num_linear_weights=0, num_linear_tensors=0)
  for name, spec in target.items():
    module, leaf = name.rsplit("/", 1)
    if leaf == "scale" and f"{module}/codes" in target:
      continue                                   # written with its codes
    if leaf == "codes":
      source = f"{module}/kernel"
      kernel = latent.get(source)
      if kernel is None or tuple(kernel.shape) != tuple(spec.shape):
        raise ValueError(f"checkpoint variable {source} is missing or has shape "
                         f"{None if kernel is None else kernel.shape}, expected "
                         f"{spec.shape}")
      codes, scale = jax.device_get(quantize(kernel))
      packed, meta = pack_ternary(codes, format=format)
      scale = np.asarray(scale, np.dtype(target[f"{module}/scale"].dtype))
      arrays[name], arrays[f"{module}/scale"] = packed, scale
      tensors[name] = dict(kind="packed_ternary", shape=list(spec.shape), dtype="int8",
                           bytes=packed.nbytes, source=source,
                           source_dtype=str(kernel.dtype))
      tensors[f"{module}/scale"] = dict(kind="array", shape=[], dtype=str(scale.dtype),
                                        bytes=scale.nbytes, value=float(scale))
      used.add(source)
      sizes["latent_linear"] += kernel.nbytes
      sizes["export_linear"] += packed.nbytes + scale.nbytes
      sizes["num_linear_weights"] += int(codes.size)
      sizes["num_linear_tensors"] += 1
      continue
    value = latent.get(name)
    if value is None or tuple(value.shape) != tuple(spec.shape) or \
        np.dtype(value.dtype) != np.dtype(spec.dtype):
      raise ValueError(f"checkpoint variable {name} is missing or is "
                       f"{None if value is None else (value.shape, value.dtype)}, "
                       f"expected {(spec.shape, spec.dtype)}")
    value = np.asarray(value)
    dtype = str(value.dtype)
    native = dtype in _NATIVE_FLOATS or not np.issubdtype(value.dtype, np.floating)
    stored = value if native else value.view(f"uint{8 * value.dtype.itemsize}")
    arrays[name] = stored
    tensors[name] = dict(kind="array", shape=list(value.shape), dtype=dtype,
                         bytes=value.nbytes)
    used.add(name)
  leftover = sorted(set(latent) - used)
  if leftover:
    raise ValueError(f"checkpoint variables without a place in the ternary model: "
                     f"{leftover}")
  sizes["latent_total"] = sum(_nbytes(v) for v in latent.values())
  sizes["export_total"] = sum(a.nbytes for a in arrays.values())

  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, MANIFEST_FILE)
  weights_path = os.path.join(out_dir, WEIGHTS_FILE)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)                     # no manifest = incomplete export
  tmp = weights_path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, weights_path)

  report = _report(sizes, format, os.path.getsize(weights_path))
  manifest = dict(format_version=FORMAT_VERSION, format=format, step=step,
                  source=os.path.abspath(path), config=config_dict,
                  tensors=tensors, report=report)
  tmp = manifest_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, manifest_path)
  if verbose:
    print(format_report(report))
  return report


def _report(sizes: dict, format: str, file_bytes: int) -> dict:
  n = max(sizes["num_linear_weights"], 1)
  return dict(
      format=format, **sizes, export_file_bytes=file_bytes,
      ratio_total=sizes["latent_total"] / sizes["export_total"],
      ratio_linear=sizes["latent_linear"] / max(sizes["export_linear"], 1),
      latent_bits_per_weight=8 * sizes["latent_linear"] / n,
      export_bits_per_weight=8 * sizes["export_linear"] / n,
      format_bits_per_weight=bits_per_weight(format))


def format_report(report: dict) -> str:
  """The size table of an `export_ternary` report."""
  rows = [
      (f"linear weights ({report['num_linear_tensors']} tensors, "
       f"{report['num_linear_weights']:,} weights)", report["latent_linear"],
       report["export_linear"]),
      ("other variables (embedding, norms, head, ...)",
       report["latent_total"] - report["latent_linear"],
       report["export_total"] - report["export_linear"]),
      ("total", report["latent_total"], report["export_total"]),
  ]
  width = max(len(r[0]) for r in rows)
  lines = [f"{'':{width}}  {'latent':>16}  {'packed ' + report['format']:>16}  "
           f"{'reduction':>9}"]
  for label, before, after in rows:
    lines.append(f"{label:{width}}  {_mib(before):>16}  {_mib(after):>16}  "
                 f"{before / max(after, 1):>8.2f}x")
  lines.append(f"bits per linear weight: {report['latent_bits_per_weight']:.2f} -> "
               f"{report['export_bits_per_weight']:.3f} (format "
               f"{report['format_bits_per_weight']:g} + scales + padding); "
               f"{WEIGHTS_FILE} on disk: {_mib(report['export_file_bytes'])}")
  return "\n".join(lines)


# --------------------------------------------------------------------------- load

def read_manifest(out_dir: str) -> dict:
  path = os.path.join(out_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {out_dir!r} is not a (complete) ternary "
                            "export")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version={manifest.get('format_version')!r}, this "
                     f"sparsejax reads {FORMAT_VERSION}")
  return manifest


def load_ternary(out_dir: str) -> tuple[DecoderLM, dict]:
  """(model, variables) of an export: `DecoderLM` with ternary BitDense layers and its
  variables {"params": ..., **model_state} as device arrays (codes unpacked to int8)."""
  manifest = read_manifest(out_dir)
  config = parse_config(manifest["config"])
  model = DecoderLM(config.model)
  fmt = manifest["format"]
  flat = {}
  with np.load(os.path.join(out_dir, WEIGHTS_FILE)) as npz:
    for name, info in manifest["tensors"].items():
      stored = npz[name]
      if info["kind"] == "packed_ternary":
        check_packed(stored, info["shape"], format=fmt)
        flat[name] = unpack_ternary(stored, info["shape"], format=fmt)
      else:
        flat[name] = jnp.asarray(stored.view(jnp.dtype(info["dtype"]))
                                 .reshape(info["shape"]))
  expected = _abstract_variables(config.model, config.data.seq_len)
  problems = [f"{k}: missing" for k in expected if k not in flat]
  problems += [f"{k}: not in the model" for k in flat if k not in expected]
  problems += [f"{k}: {flat[k].shape} {flat[k].dtype} != {v.shape} {v.dtype}"
               for k, v in expected.items()
               if k in flat and (flat[k].shape != v.shape or flat[k].dtype != v.dtype)]
  if problems:
    raise ValueError(f"{out_dir}: the export does not match its model: {problems}")
  return model, traverse_util.unflatten_dict(flat, sep="/")


__all__ = ["export_ternary", "format_report", "load_ternary", "read_manifest",
           "restore_latent", "ternary_model_config"]
