"""Benchmark Q-Sparse top-K sparsification: our XLA reference vs baselines vs the kernel.

  .venv/bin/python experiments/bench_topk.py --rows=256 --lengths=256,1024,4096 \
      --ratio=0.7,0.3 --dtype=f32,bf16 --repeats=5 --markdown

(the CPU run recorded in benchmarks/RESULTS.md; on a GPU/TPU add 16384 to --lengths).

For every row length D (and kept fraction, dtype) it times, side by side in one run on
an `x[rows, D]` of standard normals with k = round(ratio·D):

  xla          `topk_sparsify(x, k, impl="xla")` — our reference;
  baseline     a plain `lax.top_k(|x|, k)` + `.at[].set` scatter mask + select, written
               here (the "ratio" column is relative to this one);
  f32key       (bf16 only) the baseline with |x| upcast to f32 before `lax.top_k`: the
               same order (bf16 -> f32 is exact and monotone), but XLA:CPU runs f32
               top_k as its TopK custom call and bf16 top_k as a full-row sort;
  approx       `lax.approx_max_k(|x|, k)` + the same scatter: the TPU-friendly
               approximate top-k. Off TPU, XLA lowers it to an exact fallback (on
               CPU the same TopK call as f32 `lax.top_k`, observed bit-identical);
               the "recall" column says how much of the exact mask it found;
  pallas       `topk_sparsify(x, k, impl="pallas")`, the compiled Pallas kernel (Mosaic
               on TPU, Triton on GPU) — only when a GPU/TPU is the default backend.

Before timing, the outputs of xla, baseline, f32key and (when run) pallas are asserted
to be bit-identical; approx is only measured (recall, and whether it equals xla). Once
per dtype, the kernel also runs in interpret mode at one small size (16×256) as a
correctness spot-check (never timed).

Every function is jitted and warmed up; each sample times `inner` back-to-back calls
(enough for >= --min_sample_ms) ending with `block_until_ready`, methods are interleaved
round-robin across --repeats samples, and the median per-call time is reported. Bytes
moved are the ideal R·D·(b_in + b_out); on a GPU/TPU the table also gives the fraction
of the HBM roofline (bandwidths in docs/kernels.md). On CPU absolute
times are not meaningful (shared cores, no HBM): read the ratios only.

Results: a table on stdout, one JSON line per measurement appended to --out (with date,
device, device_kind, JAX version, git commit and load average), and with --markdown the
table appended to --results_md.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import sys
import time

from absl import app, flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: sparsejax, pallas_kernels
  sys.path.insert(0, REPO)

from sparsejax.ops.topk import topk_sparsify  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_log import git_commit, load_average  # noqa: E402  (sibling module)

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}

_ROWS = flags.DEFINE_integer("rows", 256, "Rows R of x[R, D] (tokens).")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024", "4096", "16384"],
                             "Row lengths D to sweep.")
_RATIO = flags.DEFINE_list("ratio", ["0.7"],
                           "Kept fraction(s) k/D, e.g. 0.7 or 0.7,0.3.")
_DTYPE = flags.DEFINE_list("dtype", ["f32"], "Input dtype(s): f32 and/or bf16.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed samples per method (median).")
_MIN_SAMPLE_MS = flags.DEFINE_float(
    "min_sample_ms", 20.0, "Each sample repeats the call until it lasts at least this.")
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "topk.jsonl"),
                           "JSONL file to append one line per measurement to.")
_MARKDOWN = flags.DEFINE_bool("markdown", False,
                              "Append the table to the end of --results_md.")
_RESULTS_MD = flags.DEFINE_string(
    "results_md", os.path.join(REPO, "benchmarks", "RESULTS.md"),
    "Markdown file that --markdown appends to.")
_INTERPRET_CHECK = flags.DEFINE_bool(
    "interpret_check", True,
    "Spot-check the kernel in interpret mode at one small size (untimed).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for the inputs.")

# Per-chip HBM bandwidth, bytes/s (docs/kernels.md "Hardware limits and the roofline").
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "TPU v5e": 819e9, "TPU v5p": 2.77e12}


def hbm_bandwidth(device_kind: str) -> tuple[str | None, float | None]:
  """(name, bytes/s) of the HBM roofline for a `device_kind`, or (None, None)."""
  kind = device_kind.lower()
  if "h200" in kind:
    return "H200", HBM_BANDWIDTH["H200"]
  if "h100" in kind and "pcie" not in kind and "nvl" not in kind:  # SXM only
    return "H100", HBM_BANDWIDTH["H100"]
  if "v5e" in kind or "v5 lite" in kind or "v5litepod" in kind:
    return "TPU v5e", HBM_BANDWIDTH["TPU v5e"]
  if "v5p" in kind or kind.strip() == "tpu v5":
    return "TPU v5p", HBM_BANDWIDTH["TPU v5p"]
  return None, None


# ----------------------------------------------------------------------------- methods


def _scatter_select(x, idx):
  """y = x at the (row, idx) positions, +0.0 elsewhere (mask by scatter, then select)."""
  rows = jnp.arange(x.shape[0])[:, None]
  mask = jnp.zeros(x.shape, jnp.bool_).at[rows, idx].set(True)
  return jnp.where(mask, x, jnp.zeros_like(x))


def baseline_topk(x, k):
  """Plain exact baseline: lax.top_k on |x| + scatter mask."""
  _, idx = lax.top_k(jnp.abs(x), k)
  return _scatter_select(x, idx)


def f32key_topk(x, k):
  """The baseline ranking f32(|x|): same order for bf16/f16, other XLA lowering."""
  _, idx = lax.top_k(jnp.abs(x).astype(jnp.float32), k)
  return _scatter_select(x, idx)


def approx_topk(x, k):
  """lax.approx_max_k on |x| + scatter mask (approximate on TPU, sort fallback else)."""
  _, idx = lax.approx_max_k(jnp.abs(x), k)
  return _scatter_select(x, idx)


def make_methods(k: int, accelerator: bool, dtype):
  """name -> jitted fn(x) for the timed methods."""
  methods = {
      "xla": jax.jit(functools.partial(topk_sparsify, k=k, impl="xla")),
      "baseline": jax.jit(functools.partial(baseline_topk, k=k)),
  }
  if jnp.dtype(dtype) != jnp.float32:
    methods["f32key"] = jax.jit(functools.partial(f32key_topk, k=k))
  methods["approx"] = jax.jit(functools.partial(approx_topk, k=k))
  if accelerator:
    methods["pallas"] = jax.jit(functools.partial(topk_sparsify, k=k, impl="pallas"))
  return methods


def bits(a) -> np.ndarray:
  """The raw bits of an array (so -0.0 != +0.0 and NaN == NaN of the same payload)."""
  a = np.asarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_same(name: str, ref, got) -> None:
  if ref.shape != got.shape or ref.dtype != got.dtype:
    raise AssertionError(f"{name}: {got.shape}/{got.dtype} vs reference "
                         f"{ref.shape}/{ref.dtype}")
  diff = int(np.sum(bits(ref) != bits(got)))
  if diff:
    raise AssertionError(f"{name} disagrees with the xla reference at {diff} of "
                         f"{ref.size} entries")


def kept(y, x) -> np.ndarray:
  """Which entries of x survived in y (x != 0 almost surely for normal inputs)."""
  x = np.asarray(x)
  return (bits(y) == bits(x)) & (x != 0)


def recall(ref_y, got_y, x, k: int) -> float:
  """Fraction of the exact top-k positions that `got_y` also kept."""
  return float(np.sum(kept(ref_y, x) & kept(got_y, x))) / (np.asarray(x).shape[0] * k)


# ------------------------------------------------------------------------------ timing


def time_methods(methods, x, repeats: int, min_sample_s: float) -> dict[str, list[float]]:
  """Median-ready per-call times (s) of every method, interleaved round-robin."""
  inner = {}
  for name, fn in methods.items():
    jax.block_until_ready(fn(x))                       # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    once = max(time.perf_counter() - t0, 1e-7)
    inner[name] = max(1, math.ceil(min_sample_s / once))
  samples = {name: [] for name in methods}
  for _ in range(repeats):
    for name, fn in methods.items():
      n = inner[name]
      t0 = time.perf_counter()
      out = None
      for _ in range(n):
        out = fn(x)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) / n)
  return samples


# ------------------------------------------------------------------------------- setup


def interpret_spot_check(dtype_name: str, ratio: float, seed: int) -> dict:
  """The kernel in interpret mode vs the xla reference at one small size (untimed)."""
  rows, d = 16, 256
  k = max(1, min(d, round(ratio * d)))
  x = jax.random.normal(jax.random.key(seed + 1), (rows, d), DTYPES[dtype_name])
  ref = topk_sparsify(x, k, impl="xla")
  got = topk_sparsify(x, k, impl="interpret")
  assert_same(f"interpret kernel (rows={rows}, D={d}, {dtype_name})", ref, got)
  return dict(rows=rows, D=d, k=k, dtype=dtype_name, method="interpret",
              matches_xla=True, timed=False)


# --------------------------------------------------------------------------------- run


def run(*, rows: int, lengths, ratios, dtypes, repeats: int, out: str | None,
        markdown: bool = False, results_md: str | None = None,
        min_sample_ms: float = 20.0, interpret_check: bool = True, seed: int = 0,
        command: str | None = None) -> list[dict]:
  """Runs the sweep; prints a table, appends JSON lines to `out`; returns the records."""
  lengths = [int(d) for d in lengths]
  ratios = [float(r) for r in ratios]
  for name in dtypes:
    if name not in DTYPES:
      raise ValueError(f"--dtype={name!r} must be one of {sorted(DTYPES)}")
  for r in ratios:
    if not 0 < r <= 1:
      raise ValueError(f"--ratio={r} must be in (0, 1]")
  if rows < 1 or repeats < 1 or any(d < 1 for d in lengths):
    raise ValueError("--rows, --repeats and --lengths must be positive")

  dev = jax.devices()[0]
  platform = dev.platform
  accelerator = platform in ("gpu", "tpu")
  bw_name, bw = hbm_bandwidth(dev.device_kind) if accelerator else (None, None)
  commit, dirty = git_commit()
  load_before = load_average()
  command = command or " ".join(["python", *sys.argv])
  header = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      device=str(dev), platform=platform, device_kind=dev.device_kind,
      jax_version=jax.__version__, git_commit=commit, git_dirty=dirty,
      command=command, rows=rows, repeats=repeats)

  print(f"# top-k sparsification benchmark — {dev.device_kind} ({platform}), "
        f"jax {jax.__version__}, commit {commit}{'+dirty' if dirty else ''}, "
        f"load average {load_before}")
  if not accelerator:
    print("# CPU: absolute times are NOT meaningful (shared cores, no HBM); "
          "read the ratio column only. pallas (compiled) skipped: no GPU/TPU.")
  elif bw is None:
    print(f"# no HBM bandwidth on record for {dev.device_kind!r}: roofline n/a")

  checks, records = [], []
  if interpret_check:
    for name in dtypes:
      checks.append(interpret_spot_check(name, ratios[0], seed))
      print(f"# interpret-mode kernel spot-check ({name}, rows=16, D=256): "
            f"bit-identical to xla (not timed)")

  key = jax.random.key(seed)
  for dtype_name in dtypes:
    dtype = DTYPES[dtype_name]
    nbytes = jnp.dtype(dtype).itemsize
    for d in lengths:
      key, sub = jax.random.split(key)
      x = jax.random.normal(sub, (rows, d), dtype)
      for ratio in ratios:
        k = max(1, min(d, round(ratio * d)))
        methods = make_methods(k, accelerator, dtype)
        outs = {name: jax.block_until_ready(fn(x)) for name, fn in methods.items()}
        ref = np.asarray(outs["xla"])
        for name in ("baseline", "f32key", "pallas"):
          if name in outs:
            assert_same(f"{name} (D={d}, k={k}, {dtype_name})", ref,
                        np.asarray(outs[name]))
        approx_recall = recall(ref, np.asarray(outs["approx"]), x, k)
        approx_exact = bool(np.array_equal(bits(ref), bits(np.asarray(outs["approx"]))))

        samples = time_methods(methods, x, repeats, min_sample_ms / 1e3)
        t_base = float(np.median(samples["baseline"]))
        moved = rows * d * (nbytes + nbytes)
        for name, ts in samples.items():
          t = float(np.median(ts))
          rec = dict(header, method=name, D=d, k=k, ratio=ratio, dtype=dtype_name,
                     time_s=t, times_s=[float(v) for v in ts],
                     ratio_vs_baseline=t / t_base, bytes=moved,
                     gb_per_s=moved / t / 1e9,
                     roofline_device=bw_name,
                     roofline_fraction=(moved / bw) / t if bw else None,
                     matches_xla=(True if name != "approx" else approx_exact),
                     recall=(approx_recall if name == "approx" else 1.0))
          records.append(rec)

  load_after = load_average()
  for rec in records:
    rec["load_average"] = load_before
    rec["load_average_after"] = load_after
  checks = [dict(header, **chk, load_average=load_before, load_average_after=load_after)
            for chk in checks]

  table = format_table(records, accelerator)
  print(table)
  print(f"# load average before {load_before}, after {load_after}")

  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
      for rec in checks + records:
        f.write(json.dumps(rec) + "\n")
  if markdown:
    append_markdown(results_md or _RESULTS_MD.default, header, table, accelerator,
                    load_before, load_after)
  return checks + records


def format_table(records, accelerator: bool) -> str:
  cols = ["dtype", "D", "k", "method", "time", "ratio vs baseline", "GB/s",
          "% HBM roofline", "recall", "= xla"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in records:
    t = r["time_s"]
    time_s = (f"{t * 1e6:.1f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms")
    if not accelerator:
      time_s = f"({time_s})"          # CPU: shown for reference only
    roof = (f"{100 * r['roofline_fraction']:.1f}%" if r["roofline_fraction"] is not None
            else "n/a")
    lines.append("| " + " | ".join([
        r["dtype"], str(r["D"]), str(r["k"]), r["method"], time_s,
        f"{r['ratio_vs_baseline']:.2f}×", f"{r['gb_per_s']:.2f}", roof,
        f"{r['recall']:.4f}", "yes" if r["matches_xla"] else "no"]) + " |")
  return "\n".join(lines)


def append_markdown(path: str, header: dict, table: str, accelerator: bool,
                    load_before, load_after) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  new = not os.path.exists(path)
  with open(path, "a") as f:
    if new:
      f.write("# sparsejax benchmark results\n")
    f.write(f"\n### Top-K run {header['date']} — {header['device_kind']} "
            f"({header['platform']})\n\n")
    f.write(f"jax {header['jax_version']}, commit {header['git_commit']}"
            f"{' (dirty tree)' if header['git_dirty'] else ''}, rows={header['rows']}, "
            f"repeats={header['repeats']}, load average {load_before} → {load_after}."
            + ("" if accelerator else
               " CPU: times in parentheses are not meaningful, read ratios only.")
            + "\n\n")
    f.write(f"```\n{header['command']}\n```\n\n{table}\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(rows=_ROWS.value, lengths=_LENGTHS.value, ratios=_RATIO.value,
      dtypes=_DTYPE.value, repeats=_REPEATS.value, out=_OUT.value,
      markdown=_MARKDOWN.value, results_md=_RESULTS_MD.value,
      min_sample_ms=_MIN_SAMPLE_MS.value, interpret_check=_INTERPRET_CHECK.value,
      seed=_SEED.value)


if __name__ == "__main__":
  app.run(main)
