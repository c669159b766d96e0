"""Attention cost vs sequence length: dense vs block-sparse (local, strided) vs NSA;
decode loaded tokens and latency vs context; a short quality comparison.

  .venv/bin/python experiments/bench_attention.py --record

(the CPU run recorded in benchmarks/RESULTS.md; add --lengths=1024,...,32768 on an
accelerator, with --impl=pallas for the block-sparse kernels).

Scaling (B=--batch, Hq=--num_heads, Hkv=--num_kv_heads, D=Dv=--head_dim, random q/k/v):
  dense    causal `jax.nn.dot_product_attention(is_causal=True)` (XLA on CPU: the full
           [T, T] logits are computed and masked).
  local    `block_sparse_attention` with LocalMask(--local_window − 1) (causal band of
           the last w keys incl. itself), --block × --block tiles.
  strided  `block_sparse_attention` with StridedMask(--stride, --strided_local) (Sparse
           Transformer: the last `local` keys plus every stride-th earlier key).
  nsa      `nsa_attention` (shared K/V for the three branches, mean-pool φ, random
           gates), the paper's l=32, d=16, l'=64, n=16, w=512 (window branch through
           block_sparse_attention with the same impl).
Each is timed forward and forward+backward (jax.grad w.r.t. q, k, v of Σ out·ct), the
methods interleaved round-robin at each length (median of --repeats samples, each
repeating the call for >= --min_sample_ms). impl: --impl ("auto": XLA on CPU, the
Pallas kernels on GPU/TPU; NSA has no kernel yet and always runs its XLA reference).
Dense and strided are skipped above --max_quadratic_len and NSA above --max_nsa_len
(default 4096 both, so the CPU run fits ≈10 min: at T=4096 one NSA forward+backward of
the XLA reference takes ≈15 s there, and dense/strided grow as T²; at 32k dense's f32
logits alone are 4 GiB per query head on the XLA path). Pass 0 on an accelerator.

Reported per (method, T): nnz = allowed (q, k) pairs per head (dense T(T+1)/2; local and
strided `mask_info(...).nnz`; NSA Σ_t of the keys its three branches read for query t,
`nsa_decode_tokens(t + 1, exact=True)`: compressed blocks + selected tokens + window;
the branches overlap, so below ≈ n·l' + w tokens NSA reads MORE than dense: "nnz /
dense" > 1),
useful FLOPs_fwd = 2·B·Hq·nnz·(D + Dv) (backward counted as 2.5× forward), achieved
FLOP/s, block efficiency = nnz / (visited blocks · bq · bkv) (`mask_info`; dense
counts the causal block triangle; NSA has no static mask: "-"), and on an accelerator
with a known peak the fraction of roofline. The growth exponent p (time ∝ T^p) is the
least-squares slope on log-log per method and pass, and likewise of the FLOPs.

Decode: K/V tokens loaded per step vs context s: dense s; NSA the paper's
⌊(s − l)/d⌋ + n·l' + w (Table 4); block top-k `BlockTopK(block_size=16, num_sinks=4,
window=64, top_k=--topk).loaded_tokens(s)`. Measured per-step latency (one query token,
B=1, a filled KV cache of s positions) of dense attention over the cache vs
`block_topk_attention`, ops called directly. Block top-k still reads every key once per
step to form the block representatives (mean keys), so its bytes are not s-independent.

Quality (--quality): dense.py, local_global.py and nsa.py (configs, seq_len 128) trained
--quality_steps steps each with `sparsejax.train.sweep.run_variant` (resumable in
--quality_workdir/steps<N>/<variant>); final val loss at equal tokens.

On CPU absolute times are NOT meaningful (shared cores, no HBM): read ratios and
exponents only. Results: tables on stdout, one JSON line per measurement appended to
--out, a plot to --plot, and with --record a section appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, REPO)

from sparsejax.ops import masks as masks_lib  # noqa: E402
from sparsejax.ops.block_topk import BlockTopK, block_topk_attention  # noqa: E402
from sparsejax.ops.dispatch import resolve_impl  # noqa: E402
from sparsejax.ops.nsa import nsa_attention, nsa_decode_tokens  # noqa: E402
from sparsejax.ops.sparse_attention import block_sparse_attention  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import configs  # noqa: E402  (sibling modules)
import results_log  # noqa: E402
from timing import time_methods  # noqa: E402

_SCALING_FLAGS = (
    flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384"],
                      "Sequence lengths T (up to 32768 on an accelerator, with "
                      "--max_quadratic_len=0 --max_nsa_len=0)."),
    flags.DEFINE_integer("batch", 1, "Batch B."),
    flags.DEFINE_integer("num_heads", 4, "Query heads Hq."),
    flags.DEFINE_integer("num_kv_heads", 1, "Key/value heads Hkv (GQA)."),
    flags.DEFINE_integer("head_dim", 64, "Head dim D (= Dv)."),
    flags.DEFINE_integer("local_window", 512, "local: keys per query (incl. itself)."),
    flags.DEFINE_integer("stride", 128, "strided: stride of the strided columns."),
    flags.DEFINE_integer("strided_local", 128, "strided: local band."),
    flags.DEFINE_integer("block", 128, "block_q = block_kv of local / strided."),
    flags.DEFINE_integer("nsa_block_len", 32, "NSA compression block l."),
    flags.DEFINE_integer("nsa_stride", 16, "NSA compression stride d."),
    flags.DEFINE_integer("nsa_select_block", 64, "NSA selection block l'."),
    flags.DEFINE_integer("nsa_num_selected", 16, "NSA selected blocks n."),
    flags.DEFINE_integer("nsa_window", 512, "NSA sliding window w."),
    flags.DEFINE_integer("max_quadratic_len", 4096, "dense and strided are skipped "
                         "above this length (0 = never)."),
    flags.DEFINE_integer("max_nsa_len", 4096, "NSA is skipped above this length "
                         "(its XLA reference gathers T·n·l' keys; 0 = never)."),
    flags.DEFINE_list("methods", ["dense", "local", "strided", "nsa"], "Methods."),
    flags.DEFINE_bool("backward", True, "Also time forward+backward."),
    flags.DEFINE_enum("impl", "auto", ["auto", "xla", "pallas", "interpret"],
                      "block_sparse_attention impl (auto: XLA on CPU, Pallas on GPU/TPU)."),
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q/k/v dtype."),
    flags.DEFINE_float("peak_tflops", 0.0, "Peak FLOP/s (TFLOP/s) for the roofline "
                       "fraction; 0 = from the device kind if known (bf16 dense)."),
)
_DECODE_FLAGS = (
    flags.DEFINE_list("decode_contexts", ["1024", "2048", "4096", "8192", "16384",
                                          "32768", "65536"],
                      "Contexts s for the loaded-tokens table."),
    flags.DEFINE_list("latency_contexts", ["512", "1024", "2048", "4096"],
                      "Contexts s for the measured decode latency."),
    flags.DEFINE_integer("topk", 32, "Block top-k: blocks kept per step."),
)
_QUALITY_FLAGS = (
    flags.DEFINE_integer("quality_steps", 100, "Training steps per variant."),
    flags.DEFINE_list("quality_variants", ["dense", "local_global", "nsa"],
                      "experiments/configs/<name>.py to train."),
    flags.DEFINE_string("quality_workdir", os.path.join(REPO, "workdir",
                                                        "bench_attention_quality"),
                        "Sweep root (resumable)."),
)
_RUN_FLAGS = (
    flags.DEFINE_bool("scaling", True, "Run the scaling benchmark."),
    flags.DEFINE_bool("decode", True, "Run the decode tables."),
    flags.DEFINE_bool("quality", True, "Run the quality comparison."),
    flags.DEFINE_integer("repeats", 2, "Timed samples per measurement (median)."),
    flags.DEFINE_float("min_sample_ms", 50.0,
                       "Each sample repeats the call until it lasts at least this."),
    flags.DEFINE_integer("seed", 0, "PRNG seed."),
    flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "attention.jsonl"),
                        "JSONL file to append one line per measurement to."),
    flags.DEFINE_string("plot", os.path.join(REPO, "benchmarks",
                                             "attention_scaling.png"),
                        "PNG of time vs T and decode tokens vs s ('' = none)."),
    flags.DEFINE_bool("record", False, "Append a section to benchmarks/RESULTS.md."),
)

METHODS = ("dense", "local", "strided", "nsa")
LABELS = {"dense": "dense causal", "local": "block-sparse local",
          "strided": "block-sparse strided", "nsa": "NSA"}
QUADRATIC = ("dense", "strided")
BWD_FACTOR = 2.5          # backward FLOPs ≈ 2.5 × forward (spec roofline)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v6": 918.0}


# ------------------------------------------------------------------------ cost model


def masks_for(method: str, cfg: dict) -> masks_lib.Mask | None:
  """The static mask of a block-sparse method (None for dense / NSA)."""
  if method == "local":
    return masks_lib.LocalMask(cfg["local_window"] - 1)
  if method == "strided":
    return masks_lib.StridedMask(cfg["stride"], cfg["strided_local"])
  return None


def nsa_options(cfg: dict) -> dict:
  return dict(block_len=cfg["nsa_block_len"], stride=cfg["nsa_stride"],
              select_block=cfg["nsa_select_block"],
              num_selected=cfg["nsa_num_selected"], window=cfg["nsa_window"])


def nnz_per_head(method: str, t: int, cfg: dict) -> int:
  """Allowed (q, k) pairs per head of a length-t causal self-attention (module doc)."""
  if method == "dense":
    return t * (t + 1) // 2
  if method == "nsa":
    o = nsa_options(cfg)
    return int(sum(nsa_decode_tokens(s, o["block_len"], o["stride"], o["num_selected"],
                                     o["select_block"], o["window"], exact=True)
                   for s in range(1, t + 1)))
  block = min(cfg["block"], t)
  return int(masks_lib.mask_info(masks_for(method, cfg), t, t, block, block).nnz[0])


def block_efficiency(method: str, t: int, cfg: dict) -> float | None:
  """nnz / (visited blocks · bq · bkv) with --block tiles; None for NSA."""
  block = min(cfg["block"], t)
  if method == "dense":
    nq = t // block
    return (t * (t + 1) // 2) / (nq * (nq + 1) // 2 * block * block)
  if method == "nsa":
    return None
  return float(masks_lib.mask_info(masks_for(method, cfg), t, t, block,
                                   block).block_efficiency)


def fwd_flops(method: str, t: int, cfg: dict) -> float:
  """Useful forward FLOPs 2·B·Hq·nnz·(D + Dv)."""
  return (2.0 * cfg["batch"] * cfg["num_heads"] * nnz_per_head(method, t, cfg)
          * 2 * cfg["head_dim"])


def growth_exponent(lengths, values) -> float:
  """Least-squares slope of log(values) vs log(lengths) (values ∝ T^slope)."""
  x, y = np.log(np.asarray(lengths, float)), np.log(np.asarray(values, float))
  return float(np.polyfit(x, y, 1)[0])


# ------------------------------------------------------------------------------ timing


def attention_fn(method: str, t: int, cfg: dict, impl: str):
  """f(q, k, v, gates) -> out [B, T, Hq, D] (un-jitted)."""
  if method == "dense":
    return lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  if method == "nsa":
    o = nsa_options(cfg)
    return lambda q, k, v, g: nsa_attention(q, k, v, k, v, k, v, g, **o,
                                            window_impl=impl)
  mask, block = masks_for(method, cfg), min(cfg["block"], t)
  return lambda q, k, v, g: block_sparse_attention(q, k, v, mask, block_q=block,
                                                   block_kv=block, impl=impl)


def fwd_bwd(fn):
  """jit(q, k, v, gates, ct) -> (dq, dk, dv) of Σ fn(q, k, v, gates)·ct."""
  def loss(q, k, v, g, ct):
    return jnp.sum(fn(q, k, v, g).astype(jnp.float32) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_scaling(cfg: dict, *, lengths, methods, impl, backward, repeats, min_sample_s,
            seed, header, peak_flops) -> list[dict]:
  dtype = jnp.dtype(cfg["dtype"])
  b, hq, hkv, d = cfg["batch"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
  records = []
  for t in lengths:
    keys = jax.random.split(jax.random.key(seed + t), 5)
    q = jax.random.normal(keys[0], (b, t, hq, d), dtype)
    k = jax.random.normal(keys[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(keys[2], (b, t, hkv, d), dtype)
    g = jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, hq, 3), dtype))
    ct = jax.random.normal(keys[4], (b, t, hq, d), jnp.float32)
    run, skipped = [], []
    for m in methods:
      too_long = ((m in QUADRATIC and cfg["max_quadratic_len"]
                   and t > cfg["max_quadratic_len"])
                  or (m == "nsa" and cfg["max_nsa_len"] and t > cfg["max_nsa_len"]))
      (skipped if too_long else run).append(m)
    fns, args = {}, {}
    for m in run:
      f = attention_fn(m, t, cfg, impl)
      fns[(m, "fwd")], args[(m, "fwd")] = jax.jit(f), (q, k, v, g)
      if backward:
        fns[(m, "fwd+bwd")], args[(m, "fwd+bwd")] = fwd_bwd(f), (q, k, v, g, ct)
    t0 = time.perf_counter()
    samples = time_methods(fns, args, repeats, min_sample_s)
    wall = time.perf_counter() - t0
    for (m, p), s in samples.items():
      med = float(np.median(s))
      flops = fwd_flops(m, t, cfg) * (1 + BWD_FACTOR if p == "fwd+bwd" else 1)
      records.append(dict(
          header, bench="attention_scaling", method=m, pass_=p, seq_len=t,
          time_s=med, times_s=[float(x) for x in s], nnz_per_head=nnz_per_head(m, t, cfg),
          density=nnz_per_head(m, t, cfg) / (t * (t + 1) / 2),
          useful_flops=flops, flops_per_s=flops / med,
          roofline_fraction=(flops / med / peak_flops) if peak_flops else None,
          block_efficiency=block_efficiency(m, t, cfg),
          impl="xla" if m == "nsa" else ("xla" if m == "dense" else impl)))
    for m in skipped:
      records.append(dict(header, bench="attention_scaling", method=m, pass_="skipped",
                          seq_len=t, time_s=None,
                          nnz_per_head=nnz_per_head(m, t, cfg) if m != "dense"
                          else t * (t + 1) // 2,
                          note=f"skipped: T > max_{'nsa' if m == 'nsa' else 'quadratic'}"
                               "_len"))
    print(f"# T={t}: " + ", ".join(
        f"{m}/{p} {_t(float(np.median(s)), header['platform'] == 'cpu')}"
        for (m, p), s in samples.items())
        + (f"; skipped {', '.join(skipped)}" if skipped else "")
        + f" ({wall:.0f} s)", flush=True)
    del q, k, v, g, ct, fns, args
  return records


# ------------------------------------------------------------------------------ decode


def decode_tokens(contexts, cfg: dict, topk: BlockTopK) -> list[dict]:
  o = nsa_options(cfg)
  rows = []
  for s in contexts:
    nsa = nsa_decode_tokens(s, o["block_len"], o["stride"], o["num_selected"],
                            o["select_block"], o["window"])
    bt = topk.loaded_tokens(s)
    rows.append(dict(context=s, dense=s, nsa=nsa, nsa_speedup=s / nsa, block_topk=bt,
                     block_topk_speedup=s / bt))
  return rows


def decode_latency(contexts, cfg: dict, topk: BlockTopK, *, repeats, min_sample_s,
                   seed) -> list[dict]:
  """Per-step latency of one query token over a filled cache of s positions."""
  b, hq, hkv, d = cfg["batch"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
  dtype = jnp.dtype(cfg["dtype"])
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
  rows = []
  for s in contexts:
    keys = jax.random.split(jax.random.key(seed + s), 3)
    q = jax.random.normal(keys[0], (b, 1, hq, d), dtype)
    k = jax.random.normal(keys[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(keys[2], (b, s, hkv, d), dtype)
    pos = jnp.full((b, 1), s - 1, jnp.int32)
    sparse = jax.jit(lambda q, k, v, p: block_topk_attention(q, k, v, p, jnp.int32(s),
                                                              topk))
    samples = time_methods({"dense": dense, "block_topk": sparse},
                           {"dense": (q, k, v), "block_topk": (q, k, v, pos)},
                           repeats, min_sample_s)
    med = {n: float(np.median(x)) for n, x in samples.items()}
    rows.append(dict(context=s, dense_s=med["dense"], block_topk_s=med["block_topk"],
                     block_topk_vs_dense=med["block_topk"] / med["dense"],
                     dense_tokens=s, block_topk_tokens=topk.loaded_tokens(s)))
    print(f"# decode s={s}: dense {med['dense'] * 1e6:.0f} µs, block top-k "
          f"{med['block_topk'] * 1e6:.0f} µs", flush=True)
  return rows


# ----------------------------------------------------------------------------- quality


def bench_quality(variants, steps: int, root: str) -> list:
  from sparsejax.train import sweep
  overrides = {"train": dict(num_steps=steps, eval_every=steps, checkpoint_every=steps,
                             log_every=max(1, min(20, steps)), sample_tokens=0)}
  root = os.path.join(root, f"steps{steps}")
  results = []
  for name in variants:
    cfg = sweep.deep_update(configs.load(name).to_dict(), overrides)
    print(f"# quality: training {name} for {steps} steps in {root}/{name}", flush=True)
    results.append(sweep.run_variant(name, cfg, root, description=name))
  return results


def quality_table(results) -> str:
  base = next((r for r in results if r.name == "dense"), None)
  lines = [_row(["variant", "val loss (nats/byte)", "Δ vs dense", "bits/byte",
                 "tokens", "wall s"]), "|---|---:|---:|---:|---:|---:|"]
  for r in results:
    delta = f"{r.val_loss - base.val_loss:+.4f}" if base else "-"
    lines.append(_row([r.name, f"{r.val_loss:.4f}", delta, f"{r.val_bpb:.4f}",
                       f"{r.tokens:,}", f"{r.wall_s:.0f}"]))
  return "\n".join(lines)


# ------------------------------------------------------------------------------ report


def _t(seconds: float, cpu: bool) -> str:
  s = f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"
  return f"({s})" if cpu else s


def _row(cells) -> str:
  return "| " + " | ".join(map(str, cells)) + " |"


def scaling_table(records, cpu: bool) -> str:
  head = ["method", "T", "nnz/head", "nnz / dense", "block eff.", "fwd", "fwd+bwd",
          "fwd GFLOP", "fwd GFLOP/s", "fwd+bwd GFLOP/s", "roofline fwd"]
  lines = [_row(head), "|---|" + "---:|" * (len(head) - 1)]
  by = {(r["method"], r["pass_"], r["seq_len"]): r for r in records}
  lengths = sorted({r["seq_len"] for r in records})
  methods = [m for m in METHODS if any(r["method"] == m for r in records)]
  for m in methods:
    for t in lengths:
      f, fb, sk = by.get((m, "fwd", t)), by.get((m, "fwd+bwd", t)), by.get((m, "skipped", t))
      if f is None:
        if sk is not None:
          lines.append(_row([LABELS[m], t, f"{sk['nnz_per_head']:,}", "", "",
                             "skipped", "skipped", "", "", "", ""]))
        continue
      eff = f["block_efficiency"]
      lines.append(_row([
          LABELS[m], t, f"{f['nnz_per_head']:,}", f"{f['density']:.3f}",
          "-" if eff is None else f"{eff:.2f}", _t(f["time_s"], cpu),
          _t(fb["time_s"], cpu) if fb else "-", f"{f['useful_flops'] / 1e9:.2f}",
          f"{f['flops_per_s'] / 1e9:.1f}",
          f"{fb['flops_per_s'] / 1e9:.1f}" if fb else "-",
          "-" if f["roofline_fraction"] is None else f"{f['roofline_fraction']:.1%}"]))
  return "\n".join(lines)


def exponents(records) -> dict:
  """{method: {"flops": p, "fwd": p, "fwd+bwd": p}} (least squares on log-log)."""
  out = {}
  for m in METHODS:
    rows = [r for r in records if r["method"] == m and r["pass_"] != "skipped"]
    if not rows:
      continue
    e = {}
    fw = sorted((r["seq_len"], r["useful_flops"]) for r in rows if r["pass_"] == "fwd")
    if len(fw) >= 2:
      e["flops"] = growth_exponent(*zip(*fw))
    for p in ("fwd", "fwd+bwd"):
      pts = sorted((r["seq_len"], r["time_s"]) for r in rows if r["pass_"] == p)
      if len(pts) >= 2:
        e[p] = growth_exponent(*zip(*pts))
    out[m] = e
  return out


def exponent_table(exps) -> str:
  lines = [_row(["method", "FLOPs ∝ T^p", "fwd time ∝ T^p", "fwd+bwd time ∝ T^p"]),
           "|---|---:|---:|---:|"]
  f = lambda e, k: f"{e[k]:.2f}" if k in e else "-"
  for m, e in exps.items():
    lines.append(_row([LABELS[m], f(e, "flops"), f(e, "fwd"), f(e, "fwd+bwd")]))
  return "\n".join(lines)


def tokens_table(rows, topk: BlockTopK) -> str:
  lines = [_row(["context s", "dense", "NSA", "dense / NSA",
                 f"block top-k (k={topk.top_k})", "dense / top-k"]),
           "|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(_row([f"{r['context']:,}", f"{r['dense']:,}", f"{r['nsa']:,}",
                       f"{r['nsa_speedup']:.1f}×", f"{r['block_topk']:,}",
                       f"{r['block_topk_speedup']:.1f}×"]))
  return "\n".join(lines)


def latency_table(rows, cpu: bool) -> str:
  lines = [_row(["context s", "dense", "block top-k", "top-k / dense",
                 "tokens attended dense / top-k"]), "|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(_row([f"{r['context']:,}", _t(r["dense_s"], cpu),
                       _t(r["block_topk_s"], cpu), f"{r['block_topk_vs_dense']:.2f}×",
                       f"{r['dense_tokens']:,} / {r['block_topk_tokens']:,}"]))
  return "\n".join(lines)


def interpretation(records, exps, tok_rows, lat_rows, qual, cpu: bool) -> str:
  parts = []
  if exps:
    parts.append("Growth exponents (time ∝ T^p, least squares on log-log): " + "; ".join(
        f"{LABELS[m]} FLOPs {e.get('flops', float('nan')):.2f}, fwd "
        f"{e.get('fwd', float('nan')):.2f}, fwd+bwd {e.get('fwd+bwd', float('nan')):.2f}"
        for m, e in exps.items()) + ".")
    lengths = sorted({r["seq_len"] for r in records if r["pass_"] == "fwd"})
    by = {(r["method"], r["pass_"], r["seq_len"]): r for r in records}
    tmax = max((t for t in lengths if ("dense", "fwd", t) in by), default=None)
    if tmax is not None:
      ratios = [f"{LABELS[m]} {by[('dense', p, tmax)]['time_s'] / by[(m, p, tmax)]['time_s']:.1f}×"
                for m in METHODS if m != "dense" for p in ("fwd",) if (m, p, tmax) in by]
      parts.append(f"Speed-up over dense at T={tmax} (forward): " + ", ".join(ratios) + ".")
    if ("strided", "fwd", lengths[-1]) in by or any(r["method"] == "strided" for r in records):
      eff = [r["block_efficiency"] for r in records
             if r["method"] == "strided" and r["pass_"] == "fwd"]
      if eff:
        parts.append(f"Strided's block efficiency is low ({min(eff):.2f}–{max(eff):.2f}): "
                     "its strided columns touch every causal kv block, so a block-sparse "
                     "kernel skips only the upper triangle and computes about as much "
                     "as dense though its nnz (≈ T²/(2·stride) + local·T at a fixed stride) "
                     "is a fraction of dense's.")
  if tok_rows:
    parts.append("Decode tokens per step, dense / NSA: " + ", ".join(
        f"{r['nsa_speedup']:.1f}× at {r['context'] // 1024}k" for r in tok_rows
        if r["context"] >= 1024) + " (paper Table 4: 4.0× at 8k, 6.4× 16k, 9.1× 32k, "
        "11.6× 64k).")
  if lat_rows:
    parts.append("Measured decode latency, block top-k / dense: " + ", ".join(
        f"{r['block_topk_vs_dense']:.2f}× at s={r['context']}" for r in lat_rows)
        + f" (block top-k attends ≤ {max(r['block_topk_tokens'] for r in lat_rows)} "
        "tokens but still reads every key once per step to form its block "
        "representatives, so its step cost keeps growing with s, more slowly than "
        "dense's).")
  if qual:
    base = next((r for r in qual if r.name == "dense"), None)
    if base is not None:
      parts.append("Quality at equal tokens: " + ", ".join(
          f"{r.name} {r.val_loss:.4f} ({r.val_loss - base.val_loss:+.4f})" for r in qual)
          + " val nats/byte (one seed and a short run: an early-training comparison, not a "
          "converged one).")
  if cpu:
    parts.append("CPU: absolute times are NOT meaningful (2 shared cores, XLA paths, no "
                 "kernels): read ratios and exponents only; no roofline fraction.")
  return " ".join(parts)


def save_plot(records, tok_rows, path: str) -> str | None:
  if not path:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  style = {"dense": ("k", "o"), "local": ("tab:blue", "s"), "strided": ("tab:green", "^"),
           "nsa": ("tab:red", "D")}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, p in zip(axes[:2], ("fwd", "fwd+bwd")):
    for m in METHODS:
      pts = sorted((r["seq_len"], r["time_s"]) for r in records
                   if r["method"] == m and r["pass_"] == p)
      if pts:
        c, mk = style[m]
        ax.plot(*zip(*pts), color=c, marker=mk, label=LABELS[m])
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="seconds",
           title=f"attention {p} time vs T" + (
               " (CPU: ratios only)" if records and records[0]["platform"] == "cpu"
               else ""))
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  ax = axes[2]
  if tok_rows:
    s = [r["context"] for r in tok_rows]
    for key, c, lab in (("dense", "k", "dense (s)"), ("nsa", "tab:red", "NSA (Table 4)"),
                        ("block_topk", "tab:purple", "block top-k")):
      ax.plot(s, [r[key] for r in tok_rows], color=c, marker="o", label=lab)
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="context s", ylabel="K/V tokens loaded / step",
           title="decode tokens per step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  else:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# --------------------------------------------------------------------------------- run


def _peak(dev, cfg) -> float:
  if cfg["peak_tflops"]:
    return cfg["peak_tflops"] * 1e12
  if dev.platform == "cpu" or cfg["dtype"] != "bfloat16":
    return 0.0
  return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in dev.device_kind), 0.0)


def run(*, lengths, methods, backward, impl, decode_contexts, latency_contexts, topk,
        quality_steps, quality_variants, quality_workdir, scaling, decode, quality,
        repeats, min_sample_ms, seed, out, plot, record, command=None, **cfg) -> dict:
  lengths = sorted(int(t) for t in lengths)
  if not set(methods) <= set(METHODS) or (scaling and not methods):
    raise ValueError(f"--methods must be a non-empty subset of {METHODS}")
  methods = [m for m in METHODS if m in methods]
  dev = jax.devices()[0]
  cpu = dev.platform == "cpu"
  impl = resolve_impl(impl, op="block_sparse_attention")
  command = command or " ".join([".venv/bin/python", *sys.argv])
  env = results_log.environment()
  header = dict(env, platform=dev.platform, device_kind=dev.device_kind, command=command,
                repeats=repeats, impl=impl, batch=cfg["batch"],
                num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"],
                head_dim=cfg["head_dim"], dtype=cfg["dtype"])
  print(f"# Attention benchmark — {env['device']}, jax {env['jax']}, commit "
        f"{env['commit']}, load average {env['loadavg']}, impl {impl}\n"
        + ("# CPU: absolute times are NOT meaningful (shared cores, no HBM); read the "
           "ratios and exponents only.\n" if cpu else ""), flush=True)
  bt = BlockTopK(block_size=16, num_sinks=4, window=64, top_k=topk)
  records, exps, tok_rows, lat_rows, qual = [], {}, [], [], []
  if scaling:
    records = bench_scaling(cfg, lengths=lengths, methods=methods, impl=impl,
                            backward=backward, repeats=repeats,
                            min_sample_s=min_sample_ms / 1e3, seed=seed, header=header,
                            peak_flops=_peak(dev, cfg))
    exps = exponents(records)
  if decode:
    tok_rows = decode_tokens([int(s) for s in decode_contexts], cfg, bt)
    lat_rows = decode_latency([int(s) for s in latency_contexts], cfg, bt,
                              repeats=repeats, min_sample_s=min_sample_ms / 1e3,
                              seed=seed)
  if quality and quality_steps > 0:
    qual = bench_quality(quality_variants, quality_steps, quality_workdir)
  load_after = results_log.load_average()

  sections = []
  if records:
    sections.append(
        f"Scaling (B={cfg['batch']}, Hq={cfg['num_heads']}, Hkv={cfg['num_kv_heads']}, "
        f"D={cfg['head_dim']}, {cfg['dtype']}, impl {impl}; local w={cfg['local_window']}, "
        f"strided stride={cfg['stride']} local={cfg['strided_local']}, blocks "
        f"{cfg['block']}; NSA l={cfg['nsa_block_len']} d={cfg['nsa_stride']} "
        f"l'={cfg['nsa_select_block']} n={cfg['nsa_num_selected']} w={cfg['nsa_window']}, "
        "mean-pool φ, XLA reference):\n\n" + scaling_table(records, cpu)
        + "\n\nGrowth exponents:\n\n" + exponent_table(exps))
  if tok_rows:
    sections.append("Decode K/V tokens loaded per step:\n\n" + tokens_table(tok_rows, bt))
  if lat_rows:
    sections.append(f"Decode latency per step (B={cfg['batch']}, one query token, "
                    f"filled cache of s positions, ops directly):\n\n"
                    + latency_table(lat_rows, cpu))
  if qual:
    sections.append(f"Quality at equal tokens ({quality_steps} steps each, configs' "
                    f"model/seq_len/batch, sweep root {quality_workdir}):\n\n"
                    + quality_table(qual))
  text = interpretation(records, exps, tok_rows, lat_rows, qual, cpu)
  png = save_plot(records, tok_rows, plot) if (records or tok_rows) else None
  print("\n\n".join(sections) + f"\n\n{text}\n# load average after {load_after}"
        + (f"\n# plot: {png}" if png else ""), flush=True)

  lines = [dict(r, loadavg_after=load_after) for r in records]
  lines += [dict(header, bench="decode_tokens", **r, topk=bt.top_k) for r in tok_rows]
  lines += [dict(header, bench="decode_latency", **r, topk=bt.top_k) for r in lat_rows]
  lines += [dict(header, bench="attention_quality", variant=r.name, val_loss=r.val_loss,
                 val_bpb=r.val_bpb, tokens=r.tokens, steps=quality_steps,
                 wall_s=r.wall_s) for r in qual]
  if exps:
    lines.append(dict(header, bench="attention_exponents", exponents=exps,
                      lengths=lengths))
  if out and lines:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as fh:
      fh.writelines(json.dumps(r) + "\n" for r in lines)
  if record:
    img = (f"![attention time vs T and decode tokens vs s]"
           f"({os.path.relpath(png, os.path.dirname(results_log.RESULTS_MD))})\n\n"
           if png else "")
    body = (f"repeats={repeats}, min sample {min_sample_ms:.0f} ms, load average "
            f"{env['loadavg']} → {load_after}."
            + (" CPU: times in parentheses are not meaningful, read ratios and "
               "exponents only." if cpu else "")
            + " nnz = allowed (q, k) pairs per head; useful FLOPs_fwd = 2·B·Hq·nnz·(D+Dv), "
            "backward counted as 2.5× forward; block eff. = nnz / (visited blocks · bq · "
            "bkv).\n\n" + "\n\n".join(sections) + f"\n\n{img}Interpretation: {text}")
    results_log.append_section(
        "Attention: dense vs block-sparse vs NSA scaling, decode and quality "
        "(experiments/bench_attention.py)", body, command=command)
  return dict(records=records, exponents=exps, decode_tokens=tok_rows,
              decode_latency=lat_rows, quality=qual)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  names = _SCALING_FLAGS + _DECODE_FLAGS + _QUALITY_FLAGS + _RUN_FLAGS
  run(**{f.name: f.value for f in names})


if __name__ == "__main__":
  app.run(main)
