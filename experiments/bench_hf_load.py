"""Load time and peak host memory of `load_hf` vs Hugging Face checkpoint size.

  .venv/bin/python experiments/bench_hf_load.py --sizes=25,100,350 --record

(the CPU run recorded in benchmarks/RESULTS.md; `--quick` is a ~4 MiB smoke run).

For every size in --sizes (MiB of f32 params) it builds a Llama-family `ModelConfig`
(vocab --vocab, untied lm_head, head_dim 64, 4 query heads per KV head, SwiGLU d_ff
8/3·D; the widest d_model that still fits two layers, then as many layers as fill the
size), fills its params with random normals and writes them with `save_hf` twice into a
temporary directory: as one `model.safetensors` ("single") and as about --shards files
with `model.safetensors.index.json` ("sharded", via `max_shard_size`). Each checkpoint
is then loaded by `load_hf(path, dtype=...)` in a FRESH Python subprocess (this script
with --measure), so the peak is the loader's own, not this process's. The child imports
JAX and sparsejax, initializes the backend and first loads a tiny checkpoint of the same
family (d_model 64, one layer): the one-time cost of any first call (lazy imports, XLA
client threads, allocator arenas; "first call MiB" = its retained RSS minus its params)
is paid there, not charged to the size under test. Then it resets its peak RSS (`5`
into /proc/self/clear_refs), reads its RSS, times `load_hf` up to `block_until_ready`,
reads the peak RSS (VmHWM of /proc/self/status) and the RSS after, and the RSS once
glibc's `malloc_trim` has returned freed heap pages to the OS (what of the rest is live
data, not allocator slack). `ru_maxrss` is recorded too, but it is not the measure: a
child's ru_maxrss starts at its parent's peak (exec after vfork keeps the old mm's
high-water mark) and clear_refs does not reset it. Without /proc (not Linux) ru_maxrss
is all there is.

Printed per checkpoint (and in the JSON): checkpoint bytes and files, the largest
tensor, load seconds (including `load_hf`'s config parsing and abstract model trace;
files are in the page cache, just written), MiB/s, peak extra host memory (peak RSS −
RSS before the load), retained extra (RSS after − before; after malloc_trim), and
(peak extra − params bytes) / largest tensor bytes: how many largest-tensor copies the
loader holds beyond the params it returns. The claim checked: it stays near 1 — the
peak is near params + one tensor — whereas reading the whole model before converting it
(2× the model) would put it at params / largest tensor. On a GPU/TPU the params leave
host memory, so the params' bytes are not subtracted there.

Results: a table on stdout, one JSON line per checkpoint appended to --out (date,
device, JAX version, git commit, load average, command), and with --record a section
appended to benchmarks/RESULTS.md. The checkpoints are deleted afterwards.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, REPO)

from sparsejax.interop import load_hf, save_hf  # noqa: E402
from sparsejax.models import ModelConfig, accounting  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_log  # noqa: E402  (sibling module)

MIB = 2**20
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}       # safetensors dtype -> bytes
LAYOUTS = ("single", "sharded")
DEFAULT_MALLOC = "default"
# glibc: buffers >= 1 MiB are mmapped and unmapped on free (no dynamic threshold), so
# freed tensor copies leave no slack in the heap.
FIXED_MMAP = f"MALLOC_MMAP_THRESHOLD_={MIB}"
QUICK = dict(sizes=[4], vocab=1024)

_SIZES = flags.DEFINE_list("sizes", ["25", "100", "350"],
                           "Target checkpoint sizes in MiB of f32 params.")
_VOCAB = flags.DEFINE_integer("vocab", 8192, "Vocabulary size of the models.")
_SHARDS = flags.DEFINE_integer("shards", 4, "About this many files in the sharded "
                               "layout (max_shard_size = size / shards).")
_DTYPE = flags.DEFINE_enum("dtype", "f32", list(DTYPES),
                           "Dtype of the checkpoint and of the loaded params.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: one ~4 MiB model (vocab 1024), "
                           "overriding --sizes and --vocab.")
_TMP_DIR = flags.DEFINE_string("tmp_dir", None, "Where the temporary checkpoints go "
                               "(default: the system temp dir).")
_CHILD_TIMEOUT = flags.DEFINE_integer("child_timeout", 600,
                                      "Seconds one measuring subprocess may take.")
_FIXED_MMAP = flags.DEFINE_bool(
    "fixed_mmap_threshold", True, f"Also measure every checkpoint with {FIXED_MMAP} "
    "(glibc), which separates the loader's live memory from heap slack.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random params.")
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "hf_load.jsonl"),
                           "JSONL file to append one line per checkpoint to.")
_RECORD = flags.DEFINE_bool("record", False, "Append a section to benchmarks/RESULTS.md.")
_MEASURE = flags.DEFINE_string("measure", None, "Internal: load this checkpoint and "
                               "print its measurement (the subprocess's mode).")
_WARMUP = flags.DEFINE_string("warmup", None, "Internal (with --measure): the tiny "
                              "checkpoint loaded first.")


# ----------------------------------------------------------------------- the models


def layer_params(d: int) -> int:
  """Params of one block of `model_config(d, ...)`: q, k, v, o, SwiGLU and 2 norms."""
  heads, kv = d // 64, max(1, d // 256)
  f = ModelConfig(d_model=d).resolved_d_ff
  return d * 64 * (2 * heads + 2 * kv) + 3 * d * f + 2 * d


def model_config(size_mib: float, vocab: int) -> ModelConfig:
  """A Llama-family config of about `size_mib` MiB of f32 params: the widest d_model
  whose embedding, lm_head and two blocks fit, then as many blocks as fill the size."""
  params = size_mib * MIB / 4
  d = next((w for w in (4096, 2048, 1024, 512, 256, 128)
            if 2 * vocab * w + w + 2 * layer_params(w) <= params), 64)
  return ModelConfig(vocab_size=vocab, d_model=d, num_heads=d // 64,
                     num_kv_heads=max(1, d // 256),
                     num_layers=max(1, round((params - 2 * vocab * d - d) /
                                             layer_params(d))),
                     tie_embeddings=False, rope_theta=500_000.0, norm_eps=1e-5)


def random_params(cfg: ModelConfig, dtype, seed: int) -> dict:
  """Host (numpy) params of `DecoderLM(cfg)`: N(0, 0.02²) weights, unit norm scales."""
  rng = np.random.default_rng(seed)
  def leaf(path, s):
    if path[-1].key == "scale":
      return np.ones(s.shape, dtype)
    return (rng.standard_normal(s.shape, np.float32) * cfg.init_std).astype(dtype)
  return jax.tree_util.tree_map_with_path(leaf, accounting.abstract_params(cfg))


def write_checkpoints(root: str, cfg: ModelConfig, dtype, shards: int,
                      seed: int) -> dict[str, tuple[str, float]]:
  """{layout: (directory, save seconds)} of `cfg`'s random params under `root`."""
  params = random_params(cfg, dtype, seed)
  total = sum(p.nbytes for p in jax.tree.leaves(params))
  out = {}
  for layout in LAYOUTS:
    path = os.path.join(root, layout)
    max_shard = total + 1 if layout == "single" else math.ceil(total / shards)
    t0 = time.perf_counter()
    save_hf(path, cfg, params, max_shard_size=max_shard)
    out[layout] = (path, time.perf_counter() - t0)
  return out


def checkpoint_stats(path: str) -> dict:
  """Files, bytes and the largest tensor (name, bytes) of a checkpoint directory."""
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  largest, largest_bytes = None, 0
  for file in files:
    with safe_open(os.path.join(path, file), "np") as f:
      for name in f.keys():
        info = f.get_slice(name)
        n = math.prod(info.get_shape()) * ITEMSIZE[info.get_dtype()]
        if (n, name) > (largest_bytes, largest or ""):     # ties: the same name always
          largest, largest_bytes = name, n
  return dict(files=len(files), indexed=os.path.exists(
                  os.path.join(path, "model.safetensors.index.json")),
              checkpoint_bytes=sum(os.path.getsize(os.path.join(path, f))
                                   for f in files),
              largest_tensor=largest, largest_bytes=largest_bytes)


# ------------------------------------------------------------ the measuring subprocess


def proc_status_bytes(field: str) -> int | None:
  """A kB field ("VmRSS", "VmHWM") of /proc/self/status in bytes; None without /proc."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def ru_maxrss_bytes() -> int:
  scale = 1 if sys.platform == "darwin" else 1024     # bytes on macOS, KiB on Linux
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
  """Resets this process's VmHWM to its current RSS (Linux ≥ 4.0); False if it can't."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return proc_status_bytes("VmHWM") is not None
  except OSError:
    return False


def release_free_heap() -> bool:
  """Returns the heap's freed pages to the OS (glibc `malloc_trim`); False elsewhere."""
  try:
    ctypes.CDLL(None).malloc_trim(0)
    return True
  except (OSError, AttributeError):
    return False


def measure(path: str, warmup: str, dtype) -> dict:
  """Times `load_hf(path)` in this process and measures its peak extra host memory,
  after a first `load_hf(warmup)` (of a tiny checkpoint) has paid the one-time costs
  (imports, XLA client threads, allocator arenas) that any first call pays."""
  dev = jax.devices()[0]                   # initialize the backend before measuring
  start = proc_status_bytes("VmRSS")
  _, tiny = load_hf(warmup, dtype=dtype)
  jax.block_until_ready(tiny)
  first_call = (proc_status_bytes("VmRSS") - start - sum(
      p.nbytes for p in jax.tree.leaves(tiny)) if start is not None else None)
  release_free_heap()                      # start from a heap without freed slack
  hwm = reset_peak_rss()
  before = proc_status_bytes("VmRSS") if hwm else ru_maxrss_bytes()
  t0 = time.perf_counter()
  _, params = load_hf(path, dtype=dtype)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t0
  peak = proc_status_bytes("VmHWM") if hwm else ru_maxrss_bytes()
  after = proc_status_bytes("VmRSS") if hwm else None
  trimmed = proc_status_bytes("VmRSS") if hwm and release_free_heap() else None
  leaves = jax.tree.leaves(params)
  return dict(load_s=load_s, first_call_bytes=first_call, rss_before=before,
              peak_rss=peak, rss_after=after, rss_trimmed=trimmed,
              ru_maxrss=ru_maxrss_bytes(), peak_source="VmHWM" if hwm else "ru_maxrss",
              params_bytes=sum(p.nbytes for p in leaves),
              num_params=sum(p.size for p in leaves),
              child_device=f"{dev.platform}:{dev.device_kind}",
              params_on_host=dev.platform == "cpu")


def measure_in_subprocess(path: str, warmup: str, dtype_name: str, timeout: int,
                          malloc: str = DEFAULT_MALLOC) -> dict:
  """`measure(path, warmup)` run by a fresh Python process (this script, --measure),
  with `malloc` ("VAR=value" of glibc's malloc tunables, or DEFAULT_MALLOC)."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--measure={path}",
         f"--warmup={warmup}", f"--dtype={dtype_name}"]
  env = dict(os.environ)
  if malloc != DEFAULT_MALLOC:
    name, value = malloc.split("=")
    env[name] = value
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"measuring {path} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------ report


def derive(rec: dict) -> dict:
  """Adds MiB/s, peak extra, retained extra and the largest-tensor ratio to `rec`."""
  extra = rec["peak_rss"] - rec["rss_before"]
  on_host = rec["params_bytes"] if rec["params_on_host"] else 0
  return dict(rec, mib_per_s=rec["checkpoint_bytes"] / MIB / rec["load_s"],
              peak_extra_bytes=extra,
              retained_extra_bytes=(rec["rss_after"] - rec["rss_before"]
                                    if rec["rss_after"] is not None else None),
              trimmed_extra_bytes=(rec["rss_trimmed"] - rec["rss_before"]
                                   if rec["rss_trimmed"] is not None else None),
              peak_over_params=extra / rec["params_bytes"],
              extra_tensors=(extra - on_host) / rec["largest_bytes"],
              whole_model_tensors=rec["params_bytes"] / rec["largest_bytes"])


def label(rec: dict) -> str:
  malloc = "" if rec["malloc"] == DEFAULT_MALLOC else ", mmap ≥ 1 MiB"
  return f"{rec['size_mib']:g} MiB {rec['layout']}{malloc}"


def table(records: list[dict]) -> str:
  cols = ["checkpoint", "files", "params", "size MiB", "largest tensor", "load s",
          "MiB/s", "first call MiB", "peak extra MiB", "retained MiB",
          "after malloc_trim MiB", "peak / params", "(peak − params) / largest",
          "2× model would be"]
  lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
  mib = lambda b: f"{b / MIB:,.1f}" if b is not None else "n/a"
  for r in records:
    lines.append("| " + " | ".join([
        label(r), str(r["files"]),
        f"{r['num_params'] / 1e6:.1f}M", mib(r["checkpoint_bytes"]),
        f"{r['largest_tensor']} ({mib(r['largest_bytes'])} MiB)", f"{r['load_s']:.2f}",
        f"{r['mib_per_s']:,.0f}", mib(r["first_call_bytes"]),
        mib(r["peak_extra_bytes"]), mib(r["retained_extra_bytes"]),
        mib(r["trimmed_extra_bytes"]), f"{r['peak_over_params']:.2f}×",
        f"{r['extra_tensors']:.2f}", f"{r['whole_model_tensors']:.1f}"]) + " |")
  return "\n".join(lines)


def interpretation(records: list[dict]) -> str:
  """One paragraph on the claim (peak ≈ params + one tensor) from the measurements."""
  size = max(r["params_bytes"] for r in records)
  worst = {}                          # malloc -> the largest checkpoint's worst layout
  for r in records:
    if r["params_bytes"] == size and r["extra_tensors"] > worst.get(
        r["malloc"], {"extra_tensors": -math.inf})["extra_tensors"]:
      worst[r["malloc"]] = r
  big = worst[DEFAULT_MALLOC]
  verdict = lambda r: "holds" if r["extra_tensors"] <= 2.0 else "does NOT hold"
  text = (
      f"At the largest checkpoint ({big['checkpoint_bytes'] / MIB:,.0f} MiB, largest "
      f"tensor {big['largest_bytes'] / MIB:,.1f} MiB) a loader that reads the whole "
      f"model before converting it would peak at params + "
      f"{big['whole_model_tensors']:.1f} largest tensors (2× the model). `load_hf` "
      f"peaked at {big['peak_over_params']:.2f}× the params' bytes = params + "
      f"{big['extra_tensors']:.2f} largest tensors ({big['layout']} layout, glibc's "
      f"default allocator): the claim (at most 2 largest tensors beyond the params) "
      f"{verdict(big)} for the process RSS.")
  if big["trimmed_extra_bytes"] is not None and big["params_on_host"]:
    live = (big["trimmed_extra_bytes"] - big["params_bytes"]) / MIB
    text += (f" After the load `malloc_trim` brought the RSS to params "
             f"{'+' if live >= 0 else '−'} {abs(live):,.1f} MiB: the rest of the peak "
             "was heap slack, freed intermediate copies glibc had kept rather than "
             "returned to the OS.")
  if FIXED_MMAP in worst:
    fixed = worst[FIXED_MMAP]
    same = next(r for r in records if r["malloc"] == DEFAULT_MALLOC and
                (r["params_bytes"], r["layout"]) == (size, fixed["layout"]))
    text += (f" With {FIXED_MMAP} (large buffers unmapped on free) the same load "
             f"peaked at params + {fixed['extra_tensors']:.2f} largest tensors, so the "
             f"loader's own working set {verdict(fixed)} the claim; that setting cost "
             f"{fixed['load_s'] / same['load_s']:.2f}× the load time here.")
  default = [r for r in records if r["malloc"] == DEFAULT_MALLOC]
  speed = [r["mib_per_s"] for r in default]
  ratios = [r["extra_tensors"] for r in default]
  small = ("; on small checkpoints a few MiB that do not grow with the model (shape "
           "trace, Python objects) count as several largest tensors"
           if max(ratios) > 2.0 else "")
  return text + (
      f" Over all sizes (default allocator) the peak was params + "
      f"{min(ratios):.2f}–{max(ratios):.2f} largest tensors{small}. Load throughput "
      f"was {min(speed):,.0f}–"
      f"{max(speed):,.0f} MiB/s from the page cache (files just written), including "
      "`load_hf`'s fixed cost of parsing config.json and tracing the model's shapes, "
      "which weighs most on the smallest checkpoint; single-file and sharded layouts "
      "load alike, as every tensor is read from its own short-lived file mapping either "
      "way. Single runs on a shared machine: times are noisy, the memory figures much "
      "less so.")


def run(*, sizes, vocab: int, shards: int, dtype_name: str, tmp_dir: str | None,
        child_timeout: int, seed: int, out: str | None, record: bool,
        fixed_mmap_threshold: bool = True, command: str | None = None) -> list[dict]:
  """Writes, loads (in subprocesses) and deletes the checkpoints; returns the records."""
  sizes = [float(s) for s in sizes]
  if not sizes or min(sizes) <= 0 or vocab < 1 or shards < 2:
    raise ValueError(f"--sizes={sizes} must be positive MiB, --vocab={vocab} >= 1 and "
                     f"--shards={shards} >= 2")
  command = command or " ".join([".venv/bin/python", *sys.argv])
  env = results_log.environment()
  header = dict(env, command=command, dtype=dtype_name, vocab=vocab)
  mallocs = (DEFAULT_MALLOC,) + ((FIXED_MMAP,) if fixed_mmap_threshold else ())
  print(f"# HF checkpoint load benchmark — {env['device']}, jax {env['jax']}, commit "
        f"{env['commit']}, load average {env['loadavg']}", flush=True)
  records = []
  root = tempfile.mkdtemp(prefix="bench_hf_load_", dir=tmp_dir)
  try:
    warmup = os.path.join(root, "warmup")
    tiny = model_config(0, 256)               # d_model 64, one layer
    save_hf(warmup, tiny, random_params(tiny, DTYPES[dtype_name], seed))
    for size in sizes:
      cfg = model_config(size, vocab)
      dirs = write_checkpoints(os.path.join(root, f"{size:g}"), cfg,
                               DTYPES[dtype_name], shards, seed)
      for (layout, (path, save_s)), malloc in itertools.product(dirs.items(), mallocs):
        rec = dict(header, size_mib=size, layout=layout, malloc=malloc, save_s=save_s,
                   d_model=cfg.d_model, num_layers=cfg.num_layers,
                   **checkpoint_stats(path), **measure_in_subprocess(
                       path, warmup, dtype_name, child_timeout, malloc))
        records.append(derive(rec))
        print(f"# {label(rec)}: {rec['load_s']:.2f} s", flush=True)
      shutil.rmtree(os.path.join(root, f"{size:g}"))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  load_after = results_log.load_average()
  for r in records:
    r["loadavg_after"] = load_after
  text, tab = interpretation(records), table(records)
  print(f"\n{tab}\n\n{text}\n# load average after {load_after}")
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as fh:
      fh.writelines(json.dumps(r) + "\n" for r in records)
  if record:
    body = (f"Llama-family checkpoints of random {dtype_name} params (vocab {vocab}, "
            f"untied lm_head, head_dim 64, GQA 4:1, SwiGLU), written by `save_hf` as one "
            f"file and as ~{shards} indexed shards, each loaded by `load_hf` in a fresh "
            f"subprocess after a tiny warm-up load; peak = VmHWM reset right before the "
            f"load, minus the RSS then (device {records[0]['child_device']}, params "
            f"{'in host memory' if records[0]['params_on_host'] else 'on the device'}). "
            f"Rows \"mmap ≥ 1 MiB\" ran with {FIXED_MMAP}. Load average "
            f"{env['loadavg']} → {load_after}.\n\n{tab}\n\n"
            f"Interpretation: {text}")
    results_log.append_section("Hugging Face checkpoint loading: time and peak host "
                               "memory (experiments/bench_hf_load.py)", body,
                               command=command)
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MEASURE.value:
    print("RESULT " + json.dumps(measure(_MEASURE.value, _WARMUP.value,
                                         DTYPES[_DTYPE.value])), flush=True)
    return
  quick = QUICK if _QUICK.value else dict(sizes=_SIZES.value, vocab=_VOCAB.value)
  run(**quick, shards=_SHARDS.value, dtype_name=_DTYPE.value, tmp_dir=_TMP_DIR.value,
      child_timeout=_CHILD_TIMEOUT.value, seed=_SEED.value, out=_OUT.value,
      record=_RECORD.value, fixed_mmap_threshold=_FIXED_MMAP.value)


if __name__ == "__main__":
  app.run(main)
