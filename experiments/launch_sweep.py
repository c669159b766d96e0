"""GPU (Triton) launch-parameter sweep of the Pallas kernels: num_stages × num_warps.

The GPU kernels take Triton's `num_warps` (threads per program / 32) and `num_stages`
(software-pipelining depth of the loads inside a program's loop); their defaults were
chosen without a device (block-sparse attention: 4 or 8 warps by tile size, 2 stages;
block-sparse matmul: warps by tile, 2 stages; top-k: one warp per 512 columns, 1
stage). On an NVIDIA GPU, `sweep()` compiles each kernel for every pair of `STAGES` ×
`WARPS`, checks that the pair computes what the default launch computes (max |Δ| /
max |ref| within the dtype's tolerance: the launch must not change the math), and
times forward and forward+backward (median of interleaved samples, `timing.py`).
`experiments/device_check.py` runs it after its checks (`--sweep`, on by default on a
GPU) and records the table next to the check's, so one `make device-check` gives the
numbers to set the defaults from.

  .venv/bin/python experiments/device_check.py --kernels=attention --sweep   # GPU

With `interpret=True` (CPU tests) the kernels run in Pallas interpret mode, which
ignores the launch parameters: that proves the plumbing and the checking, not speed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention_kernel
from pallas_kernels.block_sparse_matmul import BlockSparseTables, block_sparse_matmul_kernel
from pallas_kernels.topk import topk_sparsify_kernel
from sparsejax.layers.block_sparse_linear import block_pattern
from sparsejax.ops import masks as masks_lib
from sparsejax.ops.block_sparse_matmul import TABLE_FIELDS, block_tables
from timing import fwd_bwd_program, time_methods

STAGES = (1, 2, 3, 4)
WARPS = (4, 8)
TOLERANCE = {"float32": 2e-4, "bfloat16": 2e-2}
SIZES = {   # attention (B, H, T, D, block_q, block_kv); matmul (M, K, N, block, density);
            # topk (rows, D)
    "full": dict(attention=(1, 8, 8192, 128, 128, 64), matmul=(8192, 8192, 8192, 128, 0.25),
                 topk=(8192, 4096)),
    "quick": dict(attention=(1, 8, 2048, 128, 128, 64), matmul=(2048, 4096, 4096, 128, 0.25),
                  topk=(2048, 4096)),
    "tiny": dict(attention=(1, 2, 64, 16, 32, 16), matmul=(32, 64, 64, 16, 0.5),
                 topk=(8, 256)),
}


class Target(NamedTuple):
  """One kernel to sweep: `run(*args, num_warps=, num_stages=)` -> one array, its
  differentiable inputs `diff` (None: forward only)."""
  kernel: str
  case: str
  dtype: str
  run: Callable
  args: tuple
  diff: tuple[int, ...] | None


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def targets(key, mode: str, interpret: bool) -> list[Target]:
  """The swept kernels at `mode` sizes, called with backend="gpu"."""
  sizes = SIZES[mode]
  common = dict(backend="gpu", interpret=interpret)
  k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
  b, h, t, d, bq, bkv = sizes["attention"]
  tables = masks_lib.mask_info(masks_lib.CausalMask(), t, t, bq, bkv).kernel_tables()
  attention = lambda q, k, v, **launch: block_sparse_attention_kernel(
      q, k, v, tables, scale=1 / math.sqrt(d), **common, **launch)
  m, kk, n, blk, density = sizes["matmul"]
  index = block_pattern((kk, n), (blk, blk), density, "random", 0, "launch_sweep")
  t_all = block_tables(index, (kk, n), (blk, blk))
  bs_tables = BlockSparseTables(*(t_all[f] for f in TABLE_FIELDS))
  matmul = lambda x, w, **launch: block_sparse_matmul_kernel(x, w, bs_tables, **common,
                                                             **launch)
  rows, dim = sizes["topk"]
  topk = lambda x, **launch: topk_sparsify_kernel(x, int(0.6 * dim), **common, **launch)
  bf16 = jnp.bfloat16
  return [
      Target("attention", f"causal T={t} {bq}x{bkv}", "bfloat16", attention,
             tuple(_normal(k_, (b, h, t, d), bf16) for k_ in (k1, k2, k3)), (0, 1, 2)),
      Target("sparse_matmul", f"x[{m},{kk}] W[{kk},{n}] {blk}x{blk} d={density:g}",
             "bfloat16", matmul,
             (_normal(k4, (m, kk), bf16),
              (_normal(k5, (len(index), blk, blk), jnp.float32)
               / math.sqrt(kk * density)).astype(bf16)), (0, 1)),
      Target("topk", f"x[{rows},{dim}]", "float32", topk,
             (_normal(k6, (rows, dim), jnp.float32),), None),
  ]


def _programs(target: Target, launch: dict):
  run = lambda *a: target.run(*a, **launch)
  return jax.jit(run), (None if target.diff is None
                        else fwd_bwd_program(run, target.diff))


def _max_rel_err(got, ref) -> float:
  got, ref = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, ref))
  return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def sweep_target(target: Target, *, timing: bool, repeats: int,
                 min_sample_s: float) -> list[dict]:
  """One record per (num_stages, num_warps): errors vs the default launch's outputs
  (forward and every gradient), status ("PASS"; "FAIL": the numbers differ; "REJECTED":
  the compiler refused the launch), and (with `timing`) median times."""
  default_fwd, default_fwd_bwd = _programs(target, {})
  ct = jnp.ones_like(default_fwd(*target.args))
  reference = (default_fwd_bwd(*target.args, ct) if default_fwd_bwd is not None
               else (default_fwd(*target.args),))
  records = []
  for stages, warps in itertools.product(STAGES, WARPS):
    rec = dict(kernel=target.kernel, case=target.case, dtype=target.dtype,
               num_stages=stages, num_warps=warps)
    try:
      fwd, fwd_bwd = _programs(target, dict(num_stages=stages, num_warps=warps))
      outs = (fwd_bwd(*target.args, ct) if fwd_bwd is not None
              else (fwd(*target.args),))
      rec["max_error"] = max(_max_rel_err(g, r) for g, r in zip(outs, reference))
      ok = rec["max_error"] <= TOLERANCE[target.dtype]
      rec["status"] = "PASS" if ok else "FAIL"
      if ok and timing:
        methods = {"fwd": fwd} | ({"fwd_bwd": fwd_bwd} if fwd_bwd is not None else {})
        args = {"fwd": target.args, "fwd_bwd": (*target.args, ct)}
        samples = time_methods(methods, args, repeats, min_sample_s)
        rec.update({f"{m}_s": float(np.median(v)) for m, v in samples.items()})
    except Exception as e:  # noqa: BLE001  (a launch Triton rejects, e.g. too much
      # shared memory for the pipeline depth: recorded, not a kernel failure)
      rec.update(status="REJECTED", error=f"{type(e).__name__}: {str(e)[:300]}")
    records.append(rec)
  return records


def sweep(key, *, mode: str = "full", interpret: bool = False, timing: bool = True,
          repeats: int = 5, min_sample_s: float = 0.01,
          kernels: tuple[str, ...] | None = None) -> list[dict]:
  """Sweeps every target (or those of `kernels`); returns the records in order."""
  chosen = [t for t in targets(key, mode, interpret) if kernels is None
            or t.kernel in kernels]
  records = []
  for target in chosen:
    records += sweep_target(target, timing=timing, repeats=repeats,
                            min_sample_s=min_sample_s)
  return records


def _ms(t) -> str:
  return "-" if t is None else f"{t * 1e3:.3g} ms"


def markdown_table(records: list[dict]) -> str:
  """One row per launch; the fastest forward+backward (forward for top-k) of each kernel
  in bold."""
  best = {}
  for r in records:
    t = r.get("fwd_bwd_s", r.get("fwd_s"))
    if t is not None and t < best.get(r["kernel"], math.inf):
      best[r["kernel"]] = t
  lines = ["| kernel | case | dtype | num_stages | num_warps | check (max err) | fwd | "
           "fwd+bwd |", "|---|---|---|---:|---:|---|---:|---:|"]
  for r in records:
    ranked = "fwd_bwd_s" if "fwd_bwd_s" in r else "fwd_s"
    times = {}
    for name in ("fwd_s", "fwd_bwd_s"):
      bold = name == ranked and r.get(name) is not None and r[name] == best[r["kernel"]]
      times[name] = f"**{_ms(r.get(name))}**" if bold else _ms(r.get(name))
    check = (f"{r['status']} ({r['max_error']:.2g})" if "max_error" in r
             else f"{r['status']}: {r.get('error', '')}")
    lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['num_stages']} | "
                 f"{r['num_warps']} | {check} | {times['fwd_s']} | {times['fwd_bwd_s']} |")
  return "\n".join(lines)
