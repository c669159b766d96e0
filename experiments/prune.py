r"""One-shot post-training pruning of a trained run or a Hugging Face checkpoint.

  python experiments/prune.py --workdir=workdir/dense --method=sparsegpt --sparsity=0.5 \
      --out=workdir/dense_sgpt50
  python experiments/prune.py --hf_path=path/to/Qwen2.5-0.5B --method=wanda --nm=2:4 \
      --calib=corpus.txt --calib_samples=128 --calib_seq_len=2048 --out=qwen_wanda24
  python experiments/prune.py --workdir=workdir/dense --record    # the comparison table

Calibrates on --calib_samples windows of --calib_seq_len tokens drawn with --seed from
--calib (a text file or directory; default: the run's training data, or the embedded
corpus for --hf_path), prunes block by block (`sparsejax.sparsity.prune_model`), and
scores the val text (the run's val split or --eval_data) before and after: perplexity
and bits-per-byte. --out writes the pruned model — a run directory that
evaluate/generate/`config.train.init_from` read (from --workdir), or a Hugging Face
checkpoint (from --hf_path, or --out_format=hf) — plus prune_report.md/.json (per
matrix: sparsity, reconstruction error ‖XW − XŴ‖²/‖XW‖², time; totals, peak memory).
The input checkpoint is only read. --record instead runs dense vs magnitude / Wanda /
SparseGPT at 50%, 60%, 2:4 and 4:8 for two calibration seeds and appends the table to
benchmarks/RESULTS.md. Bad flags or inputs print one `error: ...` line (--debug: the
traceback).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import shlex
import subprocess
import sys

import jax
import numpy as np
from absl import flags, logging

from sparsejax import sharding
from sparsejax.interop import HFCheckpointError, HFConfigError, load_hf, save_hf
from sparsejax.models import DecoderLM
from sparsejax.sparsity import calibration
from sparsejax.sparsity.compress import export_compressed
from sparsejax.sparsity.prune_model import PruneSettings, prune_model, summary
from sparsejax.train import data as data_lib
from sparsejax.train import tokenizer as tokenizer_lib
from sparsejax.train.checkpoint import Checkpointer, quiet_orbax_logs
from sparsejax.train.config import config_to_dict
from sparsejax.train.trainer import Trainer, restore_run
from sparsejax.validation import ConfigError, check, run_cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run to prune (read only).")
_HF_PATH = flags.DEFINE_string("hf_path", None, "A Hugging Face checkpoint to prune.")
_METHOD = flags.DEFINE_enum("method", "sparsegpt", ["magnitude", "wanda", "sparsegpt"],
                            "Pruning method.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Fraction of each linear pruned, in "
                               "[0, 1) (ignored with --nm).")
_NM = flags.DEFINE_string("nm", "", "N:M pattern, e.g. 2:4 (keep n of every m inputs).")
_CALIB = flags.DEFINE_string("calib", "", "Calibration text file or directory (default: "
                             "the run's training data / the embedded corpus).")
_CALIB_SAMPLES = flags.DEFINE_integer("calib_samples", 64, "Calibration windows.")
_CALIB_SEQ_LEN = flags.DEFINE_integer("calib_seq_len", 128, "Tokens per window.")
_CALIB_BATCH = flags.DEFINE_integer("calib_batch_size", 8, "Windows per forward pass.")
_SEED = flags.DEFINE_integer("seed", 0, "Calibration sampling seed.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 128, "SparseGPT columns per block.")
_DAMP = flags.DEFINE_float("damp", 0.01, "SparseGPT relative damping.")
_MAGNITUDE_SCOPE = flags.DEFINE_enum("magnitude_scope", "layer", ["layer", "output"],
                                     "Unstructured magnitude: per matrix or per output.")
_PRUNE_EMBEDDINGS = flags.DEFINE_bool("prune_embeddings", False, "Also prune the "
                                      "embedding (and untied lm_head) by magnitude.")
_PRUNE_MEMORY = flags.DEFINE_bool("prune_memory_values", False, "Also prune memory "
                                  "(PKM/UltraMem) value tables by magnitude.")
_EVAL_DATA = flags.DEFINE_string("eval_data", "", "Evaluation text (default: the run's "
                                 "val split / the embedded corpus's).")
_EVAL_TOKENS = flags.DEFINE_integer("eval_tokens", 32768, "Tokens scored (0: all).")
_EVAL_SEQ_LEN = flags.DEFINE_integer("eval_seq_len", 0, "Evaluation window (0: "
                                     "--calib_seq_len).")
_OUT = flags.DEFINE_string("out", "", "Output directory for the pruned model and report.")
_OUT_FORMAT = flags.DEFINE_enum("out_format", "auto", ["auto", "run", "hf"],
                                "auto: a run dir from --workdir, HF from --hf_path.")
_COMPRESS = flags.DEFINE_bool("compress", False, "With --nm and --out: also write "
                              "compressed.npz (N:M values + uint8 positions).")
_RECORD = flags.DEFINE_bool("record", False, "Run the method x pattern x seed table and "
                            "append it to --results.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/RESULTS.md", "File --record "
                               "appends to.")

PATTERNS = (("50%", 0.5, None), ("60%", 0.6, None), ("2:4", 0.5, (2, 4)),
            ("4:8", 0.5, (4, 8)))


class Source:
  """A model to prune: config, variables, tokenizer spec and data (and, for a training
  run, its Config)."""

  def __init__(self, name, model_cfg, params, model_state, tokenizer, data_cfg,
               run_config=None):
    self.name, self.model_cfg, self.params = name, model_cfg, params
    self.model_state, self.tokenizer, self.data_cfg = model_state, tokenizer, data_cfg
    self.run_config = run_config


def parse_nm(text: str) -> tuple[int, int] | None:
  if not text:
    return None
  parts = text.split(":")
  check(len(parts) == 2 and all(p.strip().isdigit() for p in parts), "--nm", text,
        "like 2:4 (n:m)")
  n, m = int(parts[0]), int(parts[1])
  check(1 <= n <= m, "--nm", text, "n:m with 1 <= n <= m")
  return n, m


def load_source(mesh) -> Source:
  check((_WORKDIR.value is None) != (_HF_PATH.value is None), "--workdir/--hf_path",
        (_WORKDIR.value, _HF_PATH.value), "exactly one of the two")
  if _WORKDIR.value is not None:
    if not os.path.isdir(_WORKDIR.value):
      raise ConfigError(f"--workdir={_WORKDIR.value!r} is not a directory")
    config, state, _ = restore_run(_WORKDIR.value, mesh=mesh)
    return Source(_WORKDIR.value, config.model, state.params, dict(state.model_state),
                  config.data.tokenizer, config.data, config)
  try:
    model_cfg, params = load_hf(_HF_PATH.value, mesh=mesh)
  except (HFCheckpointError, HFConfigError) as e:
    raise ConfigError(f"--hf_path={_HF_PATH.value!r}: {e}") from None
  spec = os.path.join(_HF_PATH.value, "tokenizer.json")
  spec = spec if os.path.exists(spec) else tokenizer_lib.BYTES
  return Source(_HF_PATH.value, model_cfg, params, {}, spec,
                data_lib.DataConfig(path="", tokenizer=spec))


def text_tokens(source: Source, path: str, split: str, field: str) -> np.ndarray:
  """Tokens of `path` (all of it) or, for "", of the source data's `split`."""
  if path:
    if not os.path.exists(path):
      raise ConfigError(f"{field}={path!r} does not exist")
    tokenizer = tokenizer_lib.load_tokenizer(source.tokenizer)
    documents = [d for _, d in tokenizer_lib.read_documents(path)]
    return tokenizer_lib.encode_documents(tokenizer, documents)
  return data_lib.load_tokens(source.data_cfg, split,
                              vocab_size=source.model_cfg.vocab_size)


def bytes_per_token(source: Source, path: str) -> float:
  if path:
    tokenizer = tokenizer_lib.load_tokenizer(source.tokenizer)
    documents = [d for _, d in tokenizer_lib.read_documents(path)]
    tokens = tokenizer_lib.encode_documents(tokenizer, documents)
    return tokenizer_lib.text_size(tokenizer, documents) / max(len(tokens), 1)
  return data_lib.bytes_per_token(source.data_cfg, "val")


def peak_memory() -> dict:
  """Peak host RSS and, where the backend reports it, peak device bytes."""
  out = {"host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
  return out


class Evaluator:
  """Scores variables of the source model on fixed held-out tokens."""

  def __init__(self, source: Source, mesh):
    self.tokens = text_tokens(source, _EVAL_DATA.value, "val", "--eval_data")
    self.bpt = bytes_per_token(source, _EVAL_DATA.value)
    model = DecoderLM(source.model_cfg)
    self.apply = lambda variables, inputs: model.apply(variables, inputs)
    self.mesh = mesh

  def __call__(self, params, model_state) -> dict:
    with jax.set_mesh(self.mesh):
      result = calibration.score_tokens(
          self.apply, {"params": params, **model_state},
          self.tokens, seq_len=_EVAL_SEQ_LEN.value or _CALIB_SEQ_LEN.value,
          batch_size=_CALIB_BATCH.value, max_tokens=_EVAL_TOKENS.value)
    result["bpb"] = result["nll"] / math.log(2) / self.bpt
    return result


def settings_for(method, sparsity, nm) -> PruneSettings:
  if nm is not None:
    sparsity = 1 - nm[0] / nm[1]
  return PruneSettings(method=method, sparsity=sparsity, nm=nm,
                       block_size=_BLOCK_SIZE.value, damp=_DAMP.value,
                       batch_size=_CALIB_BATCH.value,
                       magnitude_scope=_MAGNITUDE_SCOPE.value,
                       prune_embeddings=_PRUNE_EMBEDDINGS.value,
                       prune_memory_values=_PRUNE_MEMORY.value)


def calib_windows(source: Source, calib_tokens: np.ndarray, seed: int) -> np.ndarray:
  return calibration.calibration_windows(
      calib_tokens, _CALIB_SAMPLES.value, _CALIB_SEQ_LEN.value, seed,
      field=f"--calib={_CALIB.value!r}" if _CALIB.value else "calibration data")


def write_report(out_dir: str, report: dict) -> str:
  """prune_report.json and prune_report.md in `out_dir`; returns the .md path."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "prune_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  lines = [f"# Pruning report: {report['method']} {report['pattern']}", "",
           f"Source: `{report['source']}`; calibration: {report['calib_samples']} × "
           f"{report['calib_seq_len']} tokens, seed {report['seed']}; "
           f"{report['summary']['seconds']:.1f} s; peak memory "
           + ", ".join(f"{k} {v:,.0f}" for k, v in report["memory"].items()), "",
           "| | nll/token | perplexity | bits/byte |", "|---|---|---|---|"]
  for key in ("before", "after"):
    r = report[key]
    lines.append(f"| {key} | {r['nll']:.4f} | {r['ppl']:.3f} | {r['bpb']:.4f} |")
  s = report["summary"]
  lines += ["", f"{s['zeros']:,} of {s['weights']:,} weights pruned "
            f"({s['sparsity']:.2%}) in {s['matrices']} matrices.",
            f"Unrouted experts (pruned by magnitude): {s['unrouted_experts'] or 'none'}",
            *([f"Compressed N:M export: {report['compressed']['dense_bytes']:,} -> "
               f"{report['compressed']['compressed_bytes']:,} bytes"]
              if "compressed" in report else []),
            "", "| matrix | [in, out] | method | tokens | sparsity | rel. error "
            "‖XW−XŴ‖²/‖XW‖² | s |", "|---|---|---|---|---|---|---|"]
  for row in report["layers"]:
    err = "—" if row["rel_error"] is None else f"{row['rel_error']:.4g}"
    lines.append(f"| {row['name']} | {row['shape']} | {row['method']} | {row['tokens']} "
                 f"| {row['sparsity']:.3f} | {err} | {row['seconds']:.2f} |")
  path = os.path.join(out_dir, "prune_report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def save_model(source: Source, params, out: str) -> str:
  """Writes the pruned model to `out` (must not exist or be empty); returns its format."""
  fmt = _OUT_FORMAT.value
  if fmt == "auto":
    fmt = "run" if source.run_config is not None else "hf"
  check(fmt == "hf" or source.run_config is not None, "--out_format", fmt,
        '"hf" or "auto" for a --hf_path model')
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError(f"--out={out!r} exists and is not an empty directory")
  if fmt == "hf":
    save_hf(out, source.model_cfg, jax.tree.map(np.asarray, params),
            like=_HF_PATH.value)
    return fmt
  config = source.run_config
  trainer = Trainer(config, mesh=sharding.make_mesh())
  state = trainer.state_from_params(params, source.model_state or None)
  data_state = iter(data_lib.make_dataset(config.data, "train",
                                          vocab_size=config.model.vocab_size)).get_state()
  ckpt = Checkpointer(os.path.join(out, "checkpoints"))
  try:
    ckpt.save(0, state, data_state, config_to_dict(config))
    ckpt.wait()
  finally:
    ckpt.close()
  return fmt


def run_one(source, evaluator, calib_tokens, mesh, method, sparsity, nm, seed,
            before=None) -> dict:
  settings = settings_for(method, sparsity, nm)
  windows = calib_windows(source, calib_tokens, seed)
  result = prune_model(source.model_cfg, source.params, source.model_state, windows,
                       settings, mesh=mesh,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
  before = before or evaluator(source.params, source.model_state)
  after = evaluator(result.params, source.model_state)
  pattern = f"{nm[0]}:{nm[1]}" if nm else f"{settings.sparsity:.0%}"
  report = dict(source=source.name, method=method, pattern=pattern, seed=seed,
                calib_samples=_CALIB_SAMPLES.value, calib_seq_len=_CALIB_SEQ_LEN.value,
                before=before, after=after, summary=summary(result),
                layers=result.layers, memory=peak_memory())
  return report, result


def record(source, evaluator, calib_tokens, mesh) -> None:
  """The method × pattern × seed table, printed and appended to --results."""
  dense = evaluator(source.params, source.model_state)
  seeds = (_SEED.value, _SEED.value + 1)
  rows = {}
  for method in ("magnitude", "wanda", "sparsegpt"):
    for label, sparsity, nm in PATTERNS:
      for seed in seeds:
        report, _ = run_one(source, evaluator, calib_tokens, mesh, method, sparsity, nm,
                            seed, before=dense)
        rows[method, label, seed] = report["after"]["ppl"]
        print(f"{method:9s} {label:4s} seed {seed}: ppl {report['after']['ppl']:.3f} "
              f"(dense {dense['ppl']:.3f})", flush=True)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
  today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  cfg = source.model_cfg
  lines = ["", f"## Post-training pruning: {os.path.basename(source.name.rstrip('/'))} "
           f"({today})", "",
           f"`python experiments/prune.py "
           f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}`"
           f" — {jax.devices()[0].device_kind}, JAX {jax.__version__}, commit {commit}. "
           f"Model: {cfg.num_layers} layers, d_model {cfg.d_model}, ffn {cfg.ffn}; "
           f"calibration {_CALIB_SAMPLES.value} × {_CALIB_SEQ_LEN.value} tokens; "
           f"val perplexity on {dense['tokens']:,} tokens (dense "
           f"{dense['ppl']:.3f}). Each cell: seed {seeds[0]} / seed {seeds[1]} "
           "(magnitude uses no calibration).", "",
           "| method | " + " | ".join(p[0] for p in PATTERNS) + " |",
           "|---|" + "---|" * len(PATTERNS)]
  lines.append("| dense | " + " | ".join(f"{dense['ppl']:.3f}" for _ in PATTERNS) + " |")
  for method in ("magnitude", "wanda", "sparsegpt"):
    cells = [" / ".join(f"{rows[method, p[0], s]:.3f}" for s in seeds) for p in PATTERNS]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  print(text)
  with open(_RESULTS.value, "a") as f:
    f.write(text)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  nm = parse_nm(_NM.value)
  settings_for(_METHOD.value, _SPARSITY.value, nm).validate()
  check(not _COMPRESS.value or (nm is not None and _OUT.value), "--compress", True,
        "used with --nm and --out")
  out = _OUT.value
  if out and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConfigError(f"--out={out!r} exists and is not an empty directory")
  mesh = sharding.make_mesh()
  source = load_source(mesh)
  calib_tokens = text_tokens(source, _CALIB.value, "train", "--calib")
  calib_windows(source, calib_tokens, _SEED.value)   # fails early on a short text
  evaluator = Evaluator(source, mesh)
  if _RECORD.value:
    record(source, evaluator, calib_tokens, mesh)
    return
  report, result = run_one(source, evaluator, calib_tokens, mesh, _METHOD.value,
                           _SPARSITY.value, nm, _SEED.value)
  b, a = report["before"], report["after"]
  print(f"before: ppl {b['ppl']:.3f}, bpb {b['bpb']:.4f}; after {report['method']} "
        f"{report['pattern']}: ppl {a['ppl']:.3f}, bpb {a['bpb']:.4f}; "
        f"{report['summary']['sparsity']:.2%} of the linears' weights pruned in "
        f"{report['summary']['seconds']:.1f} s")
  if _OUT.value:
    fmt = save_model(source, result.params, _OUT.value)
    if _COMPRESS.value:
      matrices = {row["name"]: tuple(row["shape"]) for row in result.layers
                  if row["name"].startswith("block_")}
      host_params = jax.tree.map(np.asarray, result.params)
      report["compressed"] = export_compressed(
          os.path.join(_OUT.value, "compressed.npz"), host_params, matrices, nm=nm)
      c = report["compressed"]
      print(f"compressed.npz: pruned matrices {c['dense_bytes']:,} -> "
            f"{c['compressed_bytes']:,} bytes ({c['saved_bytes']:,} saved)")
    path = write_report(_OUT.value, report)
    print(f"wrote the pruned model ({fmt}) to {_OUT.value}; report: {path}")


if __name__ == "__main__":
  run_cli(main, quiet_logs=quiet_orbax_logs)
