"""Block-sparse weight matmul vs the dense matmul, time vs density.

  .venv/bin/python experiments/bench_sparse_matmul.py --record        # CPU (recorded)

On a GPU / TPU (adds the compiled Pallas kernel; the targets below):

  .venv/bin/python experiments/bench_sparse_matmul.py --rows=8192 --in_features=8192 \
      --out_features=8192 --dtype=bf16,f32 --record

For y = x · W, x [--rows, K], W [K, N] (K = --in_features, N = --out_features) kept as
(bh × bw) = --block blocks, each density d of --densities keeps k = round(d · K/bh)
row blocks per output column block (the balanced random pattern of the "block_sparse"
linear, `block_pattern`). Timed side by side in one run, interleaved round-robin
(median of --repeats samples, each repeating the call for >= --min_sample_ms):

  dense   x @ W (the masked weight stored dense: what a pruned dense model runs);
  xla     `block_sparse_matmul(..., impl="xla")`;
  pallas  `block_sparse_matmul(..., impl="pallas")` (only on a GPU / TPU);

forward, and with --backward forward + backward (jax.vjp; dense: dx and the full dW,
block-sparse: dx and the stored blocks' dW). Every method's forward is first checked
against the dense result (max error / max |y| <= 1e-4 for f32, 2e-2 for bf16).
"speed-up" = dense time / method time. Targets (issue: pruned models that run faster):
on CPU the XLA path faster than dense (speed-up > 1) at density <= 25%; on GPU/TPU the
kernel at >= 0.7 · (1 / density) with 128 × 128 blocks at density <= 25%. The table's
"target" column says whether each applicable row meets its target. Ideal bytes =
stored blocks + x + y; FLOPs = 2·rows·nnz·bh·bw (dense: 2·rows·K·N), 3× that for
forward + backward. On CPU absolute
times are not meaningful (shared cores): read the speed-ups.

Results: a table on stdout, one JSON line per measurement appended to --out, and with
--record a section appended to benchmarks/RESULTS.md (date, device, JAX, commit).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: sparsejax, pallas_kernels
  sys.path.insert(0, REPO)

from sparsejax.layers.block_sparse_linear import block_pattern  # noqa: E402
from sparsejax.ops.block_sparse_matmul import (block_sparse_matmul,  # noqa: E402
                                               from_block_sparse)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_log  # noqa: E402  (sibling modules)
from timing import time_methods  # noqa: E402

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
TOLERANCE = {"f32": 1e-4, "bf16": 2e-2}

_ROWS = flags.DEFINE_integer("rows", 512, "Tokens M of x [M, K].")
_IN = flags.DEFINE_integer("in_features", 2048, "K.")
_OUT = flags.DEFINE_integer("out_features", 2048, "N.")
_BLOCK = flags.DEFINE_list("block", ["128", "128"], "Block (bh, bw).")
_DENSITIES = flags.DEFINE_list("densities", ["1", "0.5", "0.25", "0.125", "0.0625"],
                               "Fractions of row blocks kept per column block.")
_DTYPE = flags.DEFINE_list("dtype", ["f32"], "Dtype(s): f32 and/or bf16.")
_BACKWARD = flags.DEFINE_bool("backward", True, "Also time forward + backward.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed samples per method (median).")
_MIN_SAMPLE_MS = flags.DEFINE_float("min_sample_ms", 50.0,
                                    "Each sample repeats the call until it lasts this.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of inputs and patterns.")
_JSONL = flags.DEFINE_string("out", os.path.join(REPO, "benchmarks",
                                                 "sparse_matmul.jsonl"),
                             "JSONL file to append one line per measurement to.")
_RECORD = flags.DEFINE_bool("record", False, "Append a section to benchmarks/RESULTS.md.")


def programs(method: str, n: int, index, impl_fwd: bool):
  """jitted fn(x, w) -> y (impl_fwd), or fn(x, w, ct) -> (y, dx, dw) through jax.vjp
  (the cotangent an argument: a constant one would be folded into the program)."""
  if method == "dense":
    fwd = lambda x, w: x @ w
  else:
    fwd = lambda x, w: block_sparse_matmul(x, w, index, out_features=n, impl=method)
  if impl_fwd:
    return jax.jit(fwd)

  def fwd_bwd(x, w, ct):
    y, vjp = jax.vjp(fwd, x, w)
    return (y, *vjp(ct))
  return jax.jit(fwd_bwd)


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def target(method: str, density: float, speedup: float, accelerator: bool):
  """True / False where the issue's target applies to this row, else None."""
  if density > 0.25 or method == "dense":
    return None
  if accelerator:
    return speedup >= 0.7 / density if method == "pallas" else None
  return speedup > 1.0 if method == "xla" else None


def run(*, rows, k, n, block, densities, dtypes, backward, repeats, min_sample_ms,
        seed, out, record, command=None) -> list[dict]:
  for name in dtypes:
    if name not in DTYPES:
      raise app.UsageError(f"--dtype={name!r} must be one of {sorted(DTYPES)}")
  if any(not 0 < d <= 1 for d in densities):
    raise app.UsageError(f"--densities={densities} must each be in (0, 1]")
  if rows < 1 or len(block) != 2 or k % block[0] or n % block[1]:
    raise app.UsageError(f"--rows must be >= 1 and --block={block} must divide "
                         f"K={k}, N={n}")
  env = results_log.environment()
  accelerator = jax.devices()[0].platform in ("gpu", "tpu")
  methods = ["dense", "xla"] + (["pallas"] if accelerator else [])
  command = command or " ".join(["python", *sys.argv])
  header = dict(env, command=command, rows=rows, K=k, N=n, block=list(block),
                repeats=repeats)
  print(f"# block-sparse matmul — {env['device']}, jax {env['jax']}, commit "
        f"{env['commit']}, load {env['loadavg']}; x [{rows}, {k}] · W [{k}, {n}], "
        f"blocks {block[0]}x{block[1]}")
  if not accelerator:
    print("# CPU: absolute times are NOT meaningful; read the speed-ups. pallas "
          "skipped (no GPU/TPU).")
  key = jax.random.key(seed)
  records = []
  for dname in dtypes:
    dtype = DTYPES[dname]
    key, kx, kc = jax.random.split(key, 3)
    x = jax.random.normal(kx, (rows, k), dtype)
    ct = jax.random.normal(kc, (rows, n), dtype)
    for density in densities:
      index = block_pattern((k, n), block, density, "random", seed, "bench")
      key, kw = jax.random.split(key)
      w_blocks = jax.random.normal(kw, (len(index), *block), dtype) / np.sqrt(k * density)
      w = from_block_sparse(w_blocks, index, (k, n))
      args = {m: (x, w if m == "dense" else w_blocks) for m in methods}
      want = programs("dense", n, index, True)(x, w)
      passes = [("fwd", True)] + ([("fwd+bwd", False)] if backward else [])
      for pass_, fwd_only in passes:
        fns = {m: programs(m, n, index, fwd_only) for m in methods}
        pass_args = args if fwd_only else {m: (*a, ct) for m, a in args.items()}
        if fwd_only:
          for m in methods[1:]:
            err = rel_err(fns[m](*args[m]), want)
            if not err <= TOLERANCE[dname]:
              raise AssertionError(f"{m} (density {density}, {dname}) disagrees with "
                                   f"dense: max error {err:.3g}")
        samples = time_methods(fns, pass_args, repeats, min_sample_ms / 1e3)
        t_dense = float(np.median(samples["dense"]))
        b = jnp.dtype(dtype).itemsize
        for m, ts in samples.items():
          t = float(np.median(ts))
          stored = (k * n if m == "dense" else len(index) * block[0] * block[1])
          speedup = t_dense / t
          records.append(dict(
              header, method=m, pass_=pass_, dtype=dname, density=density,
              nnz_blocks=len(index), time_s=t, times_s=[float(v) for v in ts],
              speedup_vs_dense=speedup,
              flops=2 * rows * stored * (1 if fwd_only else 3),
              ideal_bytes=(stored + rows * (k + n)) * b,
              target_met=target(m, density, speedup, accelerator)
              if pass_ == "fwd" else None))
  table = format_table(records, accelerator)
  print(table)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  if record:
    note = ("CPU: times in parentheses are not meaningful; read the speed-ups "
            "(dense time / method time). Target: xla faster than dense at density <= "
            "25%." if not accelerator else "Target: pallas >= 0.7 / density at <= 25%.")
    results_log.append_section(
        f"Block-sparse weight matmul vs dense ({'CPU' if not accelerator else 'device'})",
        f"x [{rows}, {k}] · W [{k}, {n}], {block[0]}x{block[1]} blocks, balanced "
        f"random pattern; repeats {repeats}. {note}\n\n{table}", command=command)
  return records


def format_table(records, accelerator: bool) -> str:
  cols = ["dtype", "pass", "density", "method", "time", "speed-up vs dense",
          "TFLOP/s", "target"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in records:
    t = r["time_s"]
    ts = f"{t * 1e6:.0f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms"
    met = {None: "-", True: "met", False: "**missed**"}[r["target_met"]]
    lines.append("| " + " | ".join([
        r["dtype"], r["pass_"], f"{r['density']:g}", r["method"],
        ts if accelerator else f"({ts})", f"{r['speedup_vs_dense']:.2f}×",
        f"{r['flops'] / t / 1e12:.3f}", met]) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(rows=_ROWS.value, k=_IN.value, n=_OUT.value,
      block=tuple(int(b) for b in _BLOCK.value),
      densities=[float(d) for d in _DENSITIES.value], dtypes=_DTYPE.value,
      backward=_BACKWARD.value, repeats=_REPEATS.value,
      min_sample_ms=_MIN_SAMPLE_MS.value, seed=_SEED.value, out=_JSONL.value,
      record=_RECORD.value)


if __name__ == "__main__":
  app.run(main)
