"""One-shot accelerator check: every Pallas kernel, compiled, against its XLA reference.

  make device-check                    # = .venv/bin/python experiments/device_check.py
  .venv/bin/python experiments/device_check.py --quick          # smaller shapes
  .venv/bin/python experiments/device_check.py --out_dir=$OUT   # JSON into another dir
  .venv/bin/python experiments/device_check.py --interpret      # tiny, on CPU (tests)
  .venv/bin/python experiments/device_check.py --record_from=<json from another machine>
  .venv/bin/python experiments/device_check.py --sweep   # + the GPU num_stages x
      # num_warps launch sweep (launch_sweep.py; on by default on a GPU, --nosweep: off)

On a TPU or NVIDIA GPU (H100/H200) it runs, for every kernel of the project through its
public op, impl="pallas" (compiled: Mosaic on TPU, Triton on GPU) against impl="xla":

  topk       `topk_sparsify(x, k)`, x [8192, 4096], k = 0.6·D (Q-Sparse), f32 and bf16;
             the kernel's contract is bit-identity, so any differing bit is a FAIL;
  memory     `memory_lookup(values, indices, weights[, groups])`, values [262144, 256],
             8192 lookup rows × K = 32 (f32 ungrouped; bf16 with 4 groups);
  attention  `block_sparse_attention(q, k, v, mask)`, B 1, T = S = 8192, Hq 8, Hkv 2
             (GQA), D 128, masks CausalMask (f32, bf16), LocalMask(1023) and
             CausalMask & (LocalMask(255) | GlobalMask(128)) (bf16), the op's default
             blocks (`default_blocks`: TPU 512 × 512, GPU 128 × 64);
  nsa        `selected_attention(q, k, v, block_idx, valid, 64)` (NSA selection branch)
             with block_idx/valid from `select_blocks` (n = 16 of 64-token blocks, one
             initial and two local blocks forced) on random scores, T = S = 4096, Hq 8,
             Hkv 2, D 128, f32 and bf16;
  sparse_matmul  `block_sparse_matmul(x, w_blocks, block_index)`, x [8192, 8192] ·
             W [8192, 8192] stored as 128 × 128 blocks at 25% density (the balanced
             random pattern of the "block_sparse" linear), f32 and bf16.

Each case is checked forward (the primal program) and through `jax.vjp` (the forward
output again plus every input gradient) against the XLA reference traced under
`jax.default_matmul_precision("highest")` (so the reference is f32-exact even where
XLA's default would use TF32 / one bf16 MXU pass; the kernels' own matmuls are HIGHEST).
Error = max|got − ref| / max|ref| per output; tolerance 2e-4 for f32 cases and 2e-2
for bf16 ones (bf16 outputs, the kernels' bf16 probability × V matmuls), 0 for top-k.
Then it times pallas and xla (xla at the default precision: what impl="xla" gives a
user), forward and forward+backward, the median of --repeats samples after a warm-up,
each sample repeating the call for >= --min_sample_ms and ending in
`block_until_ready`, and relates every time to the chip's roofline: ideal time =
max(ideal bytes / HBM bandwidth, useful FLOPs / peak FLOP/s of the case's dtype) and
"% roofline" = ideal time / measured time (see `ROOFLINES` and the `*_cases` builders
for the counts). Every function is compiled once per case; one case failing (mismatch
or exception) does not stop the others.

It prints one line per case as it goes, then a summary table and either
"DEVICE CHECK PASSED: n/n cases" (exit 0) or "DEVICE CHECK FAILED: m of n cases"
with each failure's reason (exit 1). For example (--interpret on CPU, so no times;
on an accelerator each line ends with the pallas and xla forward times, and the table
fills its time, speed-up and roofline columns):

  # device check — cpu (cpu), jax 0.10.2, commit 16bafd0+dirty, tiny shapes, impl
  #   interpret vs xla, seed 1796404080; roofline: n/a (chip not in ROOFLINES)
  PASS topk      x[8,256] k=154 float32: max error 0 [1.2 s]
  PASS memory    V[64,128] L=8 K=4 G=4 bfloat16: max error 0 [2.4 s]
  PASS attention causal T=128 bfloat16: max error 0.005 [4.2 s]
  PASS nsa       T=64 n=2 l'=16 float32: max error 5.2e-07 [4.6 s]
  ...
  | kernel | case | dtype | check | max error (tol) | pallas fwd | xla fwd | xla/pallas |
  |   roofline fwd | pallas fwd+bwd | xla fwd+bwd | xla/pallas | roofline fwd+bwd |
  ...
  ========================================================================
  DEVICE CHECK PASSED: 10/10 cases
  ========================================================================

It writes a JSON file (header: date, device kind, JAX version, git commit, command,
roofline; one record per case with errors, times, bytes, FLOPs) to --out, or
benchmarks/device_check_<device>_<date>.json (the directory replaced by --out_dir),
and appends a section "Device check: ..." with the table to benchmarks/RESULTS.md
(--results_md). A JSON written on another machine (e.g. into
$OUT) is appended later with --record_from. Full shapes need up to ≈ 14 GB of
accelerator memory at once (the XLA references materialize gathers and logits: 13 GB
of temporaries for the NSA case by XLA's memory analysis): on chips with 16 GB or
less (TPU v5e) use --quick (T = 2048, 1024 for NSA, 65536 memory rows).

Without an accelerator it imports every kernel module, prints that the check needs a
TPU or GPU and exits 0 (1 if an import fails). --interpret runs the same cases on tiny
shapes with impl="interpret" against impl="xla" (no timing): how the test suite proves
the checking logic on CPU.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Callable, NamedTuple

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere: sparsejax, pallas_kernels
  sys.path.insert(0, REPO)

from sparsejax.layers.block_sparse_linear import block_pattern  # noqa: E402
from sparsejax.ops import masks as masks_lib  # noqa: E402
from sparsejax.ops.block_sparse_matmul import block_sparse_matmul  # noqa: E402
from sparsejax.ops.memory import memory_lookup  # noqa: E402
from sparsejax.ops.nsa import select_blocks, selected_attention  # noqa: E402
from sparsejax.ops.sparse_attention import block_sparse_attention  # noqa: E402
from sparsejax.ops.topk import topk_sparsify  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_log import RESULTS_MD, git_commit  # noqa: E402  (sibling modules)
from timing import fwd_bwd_program, time_methods  # noqa: E402
import launch_sweep  # noqa: E402

KERNELS = ("topk", "memory", "attention", "nsa", "sparse_matmul")
KERNEL_MODULES = ("pallas_kernels.topk", "pallas_kernels.memory_lookup",
                  "pallas_kernels.block_sparse_attention", "pallas_kernels.nsa",
                  "pallas_kernels.block_sparse_matmul", "sparsejax.ops.block_sparse_matmul",
                  "sparsejax.ops.topk", "sparsejax.ops.memory",
                  "sparsejax.ops.sparse_attention", "sparsejax.ops.nsa")
TOLERANCE = {"float32": 2e-4, "bfloat16": 2e-2}

_QUICK = flags.DEFINE_bool("quick", False, "Smaller shapes (T 2048; ~16 GB chips).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Tiny shapes, impl='interpret' vs "
                               "'xla', no timing (runs on CPU).")
_KERNELS = flags.DEFINE_list("kernels", list(KERNELS), f"Subset of {KERNELS}.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed samples per method (median).")
_MIN_SAMPLE_MS = flags.DEFINE_float("min_sample_ms", 10.0, "Each sample repeats the "
                                    "call until it lasts at least this.")
_SWEEP = flags.DEFINE_bool("sweep", None, "After the checks, sweep the GPU kernels' "
                           "num_stages x num_warps (launch_sweep.py); default: on a GPU.")
_SEED = flags.DEFINE_integer("seed", -1, "PRNG seed (-1: from the clock, recorded).")
_OUT = flags.DEFINE_string("out", None, "JSON path (default benchmarks/"
                           "device_check_<device>_<date>.json).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory of the default JSON name "
                               "(e.g. $OUT on a remote machine).")
_RESULTS_MD = flags.DEFINE_string("results_md", None, "Markdown file the section is "
                                  "appended to (default benchmarks/RESULTS.md on an "
                                  "accelerator, none with --interpret; '' = none).")
_RECORD_FROM = flags.DEFINE_string("record_from", None, "Append the section of this "
                                   "device-check JSON to --results_md and exit.")

# Peak HBM bandwidth (bytes/s) and dense FLOP/s per chip: bf16 on the tensor cores /
# MXU, f32 as the kernels compute it (precision HIGHEST). Sources, vendor spec sheets:
# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 3.35 TB/s, 989 TFLOP/s bf16 dense,
# 67 TFLOP/s FP32); NVIDIA H200 Tensor Core GPU datasheet (H200 SXM: 4.8 TB/s, the same
# compute as H100 SXM); Google Cloud TPU system-architecture pages (v5e: 819 GB/s,
# 197 TFLOP/s bf16; v5p: 2,765 GB/s, 459; v6e (Trillium): 1,640 GB/s, 918; v4:
# 1,200 GB/s, 275). TPUs have no published f32 figure: HIGHEST runs f32 as 6 bf16 MXU
# passes, so f32 = bf16 / 6. H100 PCIe / NVL differ and are not listed (roofline n/a).
ROOFLINES = {
    "H100 SXM": dict(hbm=3.35e12, bfloat16=989e12, float32=67e12),
    "H200": dict(hbm=4.8e12, bfloat16=989e12, float32=67e12),
    "TPU v5e": dict(hbm=819e9, bfloat16=197e12, float32=197e12 / 6),
    "TPU v5p": dict(hbm=2.765e12, bfloat16=459e12, float32=459e12 / 6),
    "TPU v6e": dict(hbm=1.64e12, bfloat16=918e12, float32=918e12 / 6),
    "TPU v4": dict(hbm=1.2e12, bfloat16=275e12, float32=275e12 / 6),
}


def chip_roofline(device_kind: str) -> tuple[str | None, dict | None]:
  """(chip name, roofline dict) for `jax.devices()[0].device_kind`, or (None, None)."""
  kind = device_kind.lower()
  if "h200" in kind:
    name = "H200"
  elif "h100" in kind and "pcie" not in kind and "nvl" not in kind:
    name = "H100 SXM"
  elif any(s in kind for s in ("v5e", "v5 lite", "v5litepod")):
    name = "TPU v5e"
  elif any(s in kind for s in ("v6e", "v6 lite")):
    name = "TPU v6e"
  elif "v5p" in kind or kind.strip() == "tpu v5":
    name = "TPU v5p"
  elif "v4" in kind and "tpu" in kind:
    name = "TPU v4"
  else:
    return None, None
  return name, ROOFLINES[name]


# --------------------------------------------------------------------------- cases


class Case(NamedTuple):
  """One kernel check: `op(*args, impl=...)` -> one array, differentiable in `diff`."""
  kernel: str
  name: str
  dtype: str
  op: Callable
  args: tuple
  diff: tuple[int, ...]
  grad_names: tuple[str, ...]
  shapes: dict
  bytes_fwd: float
  bytes_bwd: float
  flops_fwd: float
  flops_bwd: float
  exact: bool = False


SIZES = {   # per kernel, for full / --quick / --interpret runs
    "full": dict(topk=(8192, 4096), memory=(262144, 256, 8192, 32),
                 attention=(1, 8192, 8, 2, 128, None), nsa=(1, 4096, 8, 2, 128, 64, 16),
                 sparse_matmul=(8192, 8192, 8192, 128, 0.25)),
    "quick": dict(topk=(2048, 4096), memory=(65536, 256, 2048, 32),
                  attention=(1, 2048, 8, 2, 128, None),
                  nsa=(1, 1024, 8, 2, 128, 64, 16),
                  sparse_matmul=(2048, 4096, 4096, 128, 0.25)),
    "tiny": dict(topk=(8, 256), memory=(64, 128, 8, 4),
                 attention=(1, 128, 2, 1, 16, 32), nsa=(1, 64, 2, 1, 16, 16, 2),
                 sparse_matmul=(16, 256, 256, 128, 0.5)),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def topk_cases(key, size) -> list[Case]:
  """x [R, D], k = 0.6·D. Bytes R·D·2b (read + write); backward is the identity."""
  rows, d = size
  k = round(0.6 * d)
  cases = []
  for dtype in ("float32", "bfloat16"):
    key, sub = jax.random.split(key)
    b = jnp.dtype(dtype).itemsize
    cases.append(Case(
        "topk", f"x[{rows},{d}] k={k}", dtype,
        lambda x, impl: topk_sparsify(x, k, impl=impl),
        (_normal(sub, (rows, d), DTYPES[dtype]),), (0,), ("dx",),
        dict(rows=rows, D=d, k=k), 2 * rows * d * b, 0.0, 0.0, 0.0, exact=True))
  return cases


def memory_cases(key, size) -> list[Case]:
  """values [N, v], L lookup rows × K. Bytes: forward L·K·v·b(V) + L·G·v·b(y) +
  the index / weight / group streams; backward writes all of dV (N·v·b), re-reads the
  L·K rows for dw and reads dY once. FLOPs 2·L·K·v forward, 4·L·K·v backward."""
  n, v, l, k = size
  cases = []
  for dtype, g in (("float32", None), ("bfloat16", 4)):
    key, kv, ki, kw, kg = jax.random.split(key, 5)
    dt, b = DTYPES[dtype], jnp.dtype(dtype).itemsize
    args = [_normal(kv, (n, v), dt), jax.random.randint(ki, (l, k), 0, n, jnp.int32),
            _normal(kw, (l, k), dt)]
    if g is None:
      op = lambda values, idx, w, impl: memory_lookup(values, idx, w, impl=impl)
    else:
      args.append(jax.random.randint(kg, (l, k), 0, g, jnp.int32))
      op = lambda values, idx, w, grp, impl, g=g: memory_lookup(
          values, idx, w, groups=grp, num_groups=g, impl=impl)
    gg = g or 1
    streams = l * k * (4 + b + (4 if g else 0))
    cases.append(Case(
        "memory", f"V[{n},{v}] L={l} K={k} G={gg}", dtype, op, tuple(args), (0, 2),
        ("dvalues", "dweights"), dict(N=n, v=v, L=l, K=k, G=gg),
        l * k * v * b + l * gg * v * b + streams,
        n * v * b + l * k * v * b + l * gg * v * b + streams + l * k * b,
        2 * l * k * v, 4 * l * k * v))
  return cases


def attention_cases(key, size) -> list[Case]:
  """q [B, T, Hq, D], k/v [B, T, Hkv, D]. FLOPs_fwd = 2·B·Σ_heads nnz·(D + Dv),
  backward 2.5×; bytes: q, out, k, v once (+ f32 LSE) forward; backward reads q, do,
  out, k, v, LSE and writes dq, dk, dv."""
  b, t, hq, hkv, d, block = size              # block None: the op's default blocks
  local = min(1023, t // 2 - 1)
  masks = [("causal", masks_lib.CausalMask(), "float32"),
           ("causal", masks_lib.CausalMask(), "bfloat16"),
           (f"local({local})", masks_lib.LocalMask(local), "bfloat16"),
           ("causal&(local|global)", masks_lib.And(masks_lib.CausalMask(), masks_lib.Or(
               masks_lib.LocalMask(t // 32 - 1), masks_lib.GlobalMask(t // 64))),
            "bfloat16")]
  cases = []
  for name, mask, dtype in masks:
    key, kq, kk, kv = jax.random.split(key, 4)
    dt, e = DTYPES[dtype], jnp.dtype(dtype).itemsize
    nnz = masks_lib.mask_info(mask, t, t, block or 128, block or 128).nnz
    pairs = b * (hq * int(nnz[0]) if len(nnz) == 1 else int(nnz.sum()))
    flops = 2.0 * pairs * (d + d)
    op = lambda q, k, v, impl, mask=mask: block_sparse_attention(
        q, k, v, mask, block_q=block, block_kv=block, impl=impl)
    cases.append(Case(
        "attention", f"{name} T={t}", dtype, op,
        (_normal(kq, (b, t, hq, d), dt), _normal(kk, (b, t, hkv, d), dt),
         _normal(kv, (b, t, hkv, d), dt)), (0, 1, 2), ("dq", "dk", "dv"),
        dict(B=b, T=t, Hq=hq, Hkv=hkv, D=d, block=block or "default", mask=repr(mask),
             density=pairs / (b * hq * t * t)),
        b * (hq + hkv) * t * 2 * d * e + 4 * b * hq * t,
        b * hq * t * 4 * d * e + b * hkv * t * 4 * d * e + 8 * b * hq * t,
        flops, 2.5 * flops))
  return cases


def nsa_cases(key, size) -> list[Case]:
  """Selection branch: q [B, T, Hq, D], k/v [B, T, Hkv, D], n blocks of l' tokens per
  (token, kv head) from `select_blocks` (1 initial + 2 local forced) on random scores.
  FLOPs_fwd = 2·G·(allowed (token, key) pairs per kv head)·(D + Dv), backward 2.5×;
  bytes: q, f32 out, K/V once, the index tables and LSE (backward as for attention)."""
  b, t, hq, hkv, d, lsel, n = size
  cases = []
  for dtype in ("float32", "bfloat16"):
    key, kq, kk, kv, ks = jax.random.split(key, 5)
    dt, e = DTYPES[dtype], jnp.dtype(dtype).itemsize
    ns = -(-t // lsel)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    scores = jax.random.uniform(ks, (b, t, hkv, ns))
    idx, valid = select_blocks(scores, pos, n, lsel, num_initial=1, num_local=2)
    first = np.asarray(idx) * lsel                     # keys of a block: <= t and < S
    keys = np.clip(np.arange(t)[None, :, None, None] + 1 - first, 0, lsel)
    pairs = int(np.sum(keys * np.asarray(valid)))
    flops = 2.0 * (hq // hkv) * pairs * (d + d)
    tables = idx.size * 5
    op = lambda q, k, v, idx, valid, impl: selected_attention(
        q, k, v, idx, valid, lsel, impl=impl)
    cases.append(Case(
        "nsa", f"T={t} n={n} l'={lsel}", dtype, op,
        (_normal(kq, (b, t, hq, d), dt), _normal(kk, (b, t, hkv, d), dt),
         _normal(kv, (b, t, hkv, d), dt), idx, valid), (0, 1, 2), ("dq", "dk", "dv"),
        dict(B=b, T=t, Hq=hq, Hkv=hkv, D=d, select_block=lsel, num_selected=n,
             keys_per_query=pairs / (b * t * hkv)),
        b * t * (hq * d * e + hq * d * 4 + hkv * 2 * d * e) + tables + 4 * b * hq * t,
        b * hq * t * 4 * d * e + b * hkv * t * 4 * d * e + tables + 8 * b * hq * t,
        flops, 2.5 * flops))
  return cases


def sparse_matmul_cases(key, size) -> list[Case]:
  """x [M, K] · W [K, N] stored as (blk × blk) blocks, `density` of the row blocks of
  every column block. Roofline: FLOPs 2·M·nnz·blk² forward, twice that backward (dx,
  d w_blocks); bytes forward stored blocks + x + y, backward x, dy and the blocks read,
  dx and d w_blocks written."""
  m, k, n, blk, density = size
  index = block_pattern((k, n), (blk, blk), density, "random", 0, "device_check")
  stored = len(index) * blk * blk
  op = lambda x, w, impl: block_sparse_matmul(x, w, index, out_features=n, impl=impl)
  cases = []
  for dtype in ("float32", "bfloat16"):
    key, kx, kw = jax.random.split(key, 3)
    dt, b = DTYPES[dtype], jnp.dtype(dtype).itemsize
    w_blocks = (_normal(kw, (len(index), blk, blk), jnp.float32)
                / math.sqrt(k * density)).astype(dt)
    cases.append(Case(
        "sparse_matmul", f"x[{m},{k}] W[{k},{n}] {blk}x{blk} d={density:g}", dtype, op,
        (_normal(kx, (m, k), dt), w_blocks), (0, 1), ("dx", "dw_blocks"),
        dict(M=m, K=k, N=n, block=blk, density=density, nnz_blocks=len(index)),
        (stored + m * (k + n)) * b, (2 * stored + m * (2 * k + n)) * b,
        2 * m * stored, 4 * m * stored))
  return cases


BUILDERS = {"topk": topk_cases, "memory": memory_cases, "attention": attention_cases,
            "nsa": nsa_cases, "sparse_matmul": sparse_matmul_cases}


# -------------------------------------------------------------------------- checking


def programs(case: Case, impl: str):
  """(jitted forward(*args), jitted forward+backward(*args, ct) -> (out, *grads))."""
  def fwd(*args):
    return case.op(*args, impl=impl)
  return jax.jit(fwd), fwd_bwd_program(fwd, case.diff)


@jax.jit
def _rel_err(got, ref):
  """(max|got − ref| / max|ref| in f32, all got finite, all ref finite)."""
  g, r = got.astype(jnp.float32), ref.astype(jnp.float32)
  scale = jnp.maximum(jnp.max(jnp.abs(r)), jnp.finfo(jnp.float32).tiny)
  return (jnp.max(jnp.abs(g - r)) / scale, jnp.all(jnp.isfinite(g)),
          jnp.all(jnp.isfinite(r)))


@jax.jit
def _bit_diff(got, ref):
  """Fraction of entries whose bits differ."""
  unsigned = jnp.dtype(f"uint{8 * got.dtype.itemsize}")
  bits = lambda x: jax.lax.bitcast_convert_type(x, unsigned)
  return jnp.mean(bits(got) != bits(ref))


def compare(name: str, got, ref, tol: float, exact: bool) -> tuple[float, str | None]:
  """(error, failure reason or None) of one output against the reference."""
  if got.shape != ref.shape or got.dtype != ref.dtype:
    return math.inf, (f"{name}: {got.dtype}{list(got.shape)} vs reference "
                      f"{ref.dtype}{list(ref.shape)}")
  if exact:
    err = float(_bit_diff(got, ref))
    return err, (f"{name}: {err:.3%} of entries differ bitwise" if err else None)
  err, got_finite, ref_finite = (bool(x) if x.dtype == bool else float(x)
                                 for x in map(np.asarray, _rel_err(got, ref)))
  if not ref_finite:
    return math.inf, f"{name}: the XLA reference is not finite"
  if not got_finite:
    return math.inf, f"{name}: non-finite values"
  if not err <= tol:
    return err, f"{name}: max|err|/max|ref| = {err:.3g} > {tol:g}"
  return err, None


def check_case(case: Case, key, impl: str, timing: bool, roof: dict | None,
               repeats: int, min_sample_s: float) -> dict:
  """Runs one case: correctness against the XLA reference, then (timing) the clocks."""
  rec = dict(kernel=case.kernel, case=case.name, dtype=case.dtype, shapes=case.shapes,
             impl=impl, bytes_fwd=case.bytes_fwd,
             bytes_fwd_bwd=case.bytes_fwd + case.bytes_bwd, flops_fwd=case.flops_fwd,
             flops_fwd_bwd=case.flops_fwd + case.flops_bwd, errors={}, failures=[])
  t0 = time.perf_counter()
  try:
    ker_fwd, ker_fwd_bwd = programs(case, impl)
    with jax.default_matmul_precision("highest"):
      _, ref_fwd_bwd = programs(case, "xla")
      out_shape = jax.eval_shape(lambda *a: case.op(*a, impl="xla"), *case.args)
      ct = _normal(key, out_shape.shape, out_shape.dtype)   # the output cotangent
      want = jax.block_until_ready(ref_fwd_bwd(*case.args, ct))
    got_fwd = jax.block_until_ready(ker_fwd(*case.args))
    got = jax.block_until_ready(ker_fwd_bwd(*case.args, ct))
    rec["tolerance"] = tol = 0.0 if case.exact else TOLERANCE[case.dtype]
    names = ("out", "out (vjp)", *case.grad_names)
    for name, g, w in zip(names, (got_fwd, *got), (want[0], *want)):
      rec["errors"][name], reason = compare(name, g, w, tol, case.exact)
      if reason:
        rec["failures"].append(reason)
    if timing:
      rec.update(time_case(case, ker_fwd, ker_fwd_bwd, ct, roof, repeats, min_sample_s))
  except Exception as e:  # noqa: BLE001  (one failing kernel must not hide the others)
    rec["failures"].append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    rec["traceback"] = traceback.format_exc()
  rec["status"] = "FAIL" if rec["failures"] else "PASS"
  rec["wall_s"] = time.perf_counter() - t0
  return rec


def time_case(case: Case, ker_fwd, ker_fwd_bwd, ct, roof, repeats: int,
              min_sample_s: float) -> dict:
  """Median times of pallas and xla (default precision), forward and fwd+bwd, with
  their fractions of the roofline."""
  xla_fwd, xla_fwd_bwd = programs(case, "xla")
  args = case.args
  methods = {"pallas_fwd": ker_fwd, "xla_fwd": xla_fwd, "pallas_fwd_bwd": ker_fwd_bwd,
             "xla_fwd_bwd": xla_fwd_bwd}
  samples = time_methods(methods, {"pallas_fwd": args, "xla_fwd": args,
                                   "pallas_fwd_bwd": (*args, ct),
                                   "xla_fwd_bwd": (*args, ct)}, repeats, min_sample_s)
  out = {"times_s": {m: [float(s) for s in v] for m, v in samples.items()}}
  for m, v in samples.items():
    out[f"{m}_s"] = float(np.median(v))
  for pass_, nbytes, flops in (("fwd", case.bytes_fwd, case.flops_fwd),
                               ("fwd_bwd", case.bytes_fwd + case.bytes_bwd,
                                case.flops_fwd + case.flops_bwd)):
    ideal = (max(nbytes / roof["hbm"], flops / roof[case.dtype]) if roof else None)
    out[f"ideal_{pass_}_s"] = ideal
    for impl in ("pallas", "xla"):
      t = out[f"{impl}_{pass_}_s"]
      out[f"{impl}_{pass_}_roofline"] = ideal / t if ideal else None
  return out


# ----------------------------------------------------------------------------- output


def _ms(t) -> str:
  if t is None:
    return "-"
  return f"{t * 1e6:.0f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def _pct(f) -> str:
  return "-" if f is None else f"{100 * f:.1f}%"


def _ratio(a, b) -> str:
  return "-" if a is None or b is None else f"{a / b:.2f}×"


def format_table(records: list[dict]) -> str:
  cols = ["kernel", "case", "dtype", "check", "max error (tol)", "pallas fwd",
          "xla fwd", "xla/pallas", "roofline fwd", "pallas fwd+bwd", "xla fwd+bwd",
          "xla/pallas", "roofline fwd+bwd"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in records:
    err = max(r["errors"].values()) if r["errors"] else None
    err_s = "-" if err is None else f"{err:.2g} ({r.get('tolerance', 0):g})"
    g = r.get
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [
        r["kernel"], r["case"], r["dtype"], f"**{r['status']}**", err_s,
        _ms(g("pallas_fwd_s")), _ms(g("xla_fwd_s")),
        _ratio(g("xla_fwd_s"), g("pallas_fwd_s")), _pct(g("pallas_fwd_roofline")),
        _ms(g("pallas_fwd_bwd_s")), _ms(g("xla_fwd_bwd_s")),
        _ratio(g("xla_fwd_bwd_s"), g("pallas_fwd_bwd_s")),
        _pct(g("pallas_fwd_bwd_roofline"))]) + " |")
  return "\n".join(lines)


def verdict(records: list[dict]) -> str:
  failed = [r for r in records if r["status"] == "FAIL"]
  if not failed:
    return f"DEVICE CHECK PASSED: {len(records)}/{len(records)} cases"
  lines = [f"DEVICE CHECK FAILED: {len(failed)} of {len(records)} cases"]
  for r in failed:
    lines.append(f"  FAIL {r['kernel']} {r['case']} {r['dtype']}: "
                 + "; ".join(r["failures"]))
  return "\n".join(lines)


def markdown_section(report: dict) -> str:
  h = report["header"]
  roof = h["roofline"]
  roof_s = (f"roofline {h['roofline_chip']}: {roof['hbm'] / 1e12:.3g} TB/s HBM, "
            f"{roof['bfloat16'] / 1e12:.0f} / {roof['float32'] / 1e12:.0f} TFLOP/s "
            "bf16 / f32" if roof else "no roofline on record for this chip")
  return (f"\n## Device check: {h['device_kind']} ({h['platform']}), {h['date']}\n\n"
          f"jax {h['jax_version']}, commit {h['git_commit']}"
          f"{' (dirty tree)' if h['git_dirty'] else ''}, {h['mode']} shapes, impl "
          f"{h['impl']} vs xla, seed {h['seed']}, {roof_s}.\n\n"
          f"```\n{h['command']}\n```\n\n{format_table(report['records'])}\n\n"
          f"**{verdict(report['records'])}**\n"
          + (f"\nGPU launch sweep (`launch_sweep.py`; bold: the fastest launch):\n\n"
             f"{launch_sweep.markdown_table(report['sweep'])}\n" if report.get("sweep")
             else ""))


def append_markdown(path: str, report: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(markdown_section(report))


def default_json_path(device_kind: str, date: str, out_dir: str | None) -> str:
  device = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "device"
  stamp = date.replace(":", "-").split("+")[0]
  return os.path.join(out_dir or os.path.join(REPO, "benchmarks"),
                      f"device_check_{device}_{stamp}.json")


# -------------------------------------------------------------------------------- run


def print_progress(rec: dict) -> None:
  detail = ("; ".join(rec["failures"]) if rec["failures"] else
            f"max error {max(rec['errors'].values()):.2g}")
  times = (f", pallas fwd {_ms(rec['pallas_fwd_s'])}, xla fwd {_ms(rec['xla_fwd_s'])}"
           if "pallas_fwd_s" in rec else "")
  print(f"{rec['status']} {rec['kernel']:9s} {rec['case']} {rec['dtype']}: {detail} "
        f"[{rec.get('wall_s', 0):.1f} s{times}]", flush=True)
  if "traceback" in rec:
    print(rec["traceback"], flush=True)


def check_imports() -> list[str]:
  """Imports every kernel module and op; returns the failures."""
  failures = []
  for name in KERNEL_MODULES:
    try:
      importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
      failures.append(f"{name}: {type(e).__name__}: {e}")
  return failures


def run(*, mode: str, impl: str, kernels, repeats: int = 5, min_sample_ms: float = 10.0,
        seed: int = -1, out: str | None = None, out_dir: str | None = None,
        results_md: str | None = None, command: str | None = None,
        timing: bool | None = None, sweep: bool = False) -> dict:
  """Builds and checks the cases of `kernels` at `mode` ("full" | "quick" | "tiny")
  sizes, timed when `timing` (default: impl == "pallas"); prints progress, the table
  and the verdict; writes the JSON (and the markdown section when `results_md`).
  Returns {"header", "records", "json"}."""
  unknown = set(kernels) - set(KERNELS)
  if unknown or not kernels:
    raise app.UsageError(f"--kernels must be a non-empty subset of {KERNELS}, "
                         f"got {kernels}")
  dev = jax.devices()[0]
  seed = seed if seed >= 0 else int(time.time()) % 2**31
  chip, roof = chip_roofline(dev.device_kind)
  commit, dirty = git_commit()
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  header = dict(date=date, device=str(dev), device_kind=dev.device_kind,
                platform=dev.platform, jax_version=jax.__version__, git_commit=commit,
                git_dirty=dirty, mode=mode, impl=impl, seed=seed, repeats=repeats,
                roofline_chip=chip, roofline=roof,
                command=command or " ".join([".venv/bin/python", *sys.argv]))
  timing = impl == "pallas" if timing is None else timing
  print(f"# device check — {dev.device_kind} ({dev.platform}), "
        f"jax {jax.__version__}, commit {commit}{'+dirty' if dirty else ''}, "
        f"{mode} shapes, impl {impl} vs xla, seed {seed}; roofline: "
        f"{chip or 'n/a (chip not in ROOFLINES)'}", flush=True)
  records = []
  key = jax.random.key(seed)
  for kernel in (k for k in KERNELS if k in kernels):
    key, sub = jax.random.split(key)
    try:
      cases = BUILDERS[kernel](sub, SIZES[mode][kernel])
    except Exception as e:  # noqa: BLE001
      cases = []
      records.append(dict(kernel=kernel, case="(building inputs)", dtype="-", errors={},
                          status="FAIL", traceback=traceback.format_exc(),
                          failures=[f"{type(e).__name__}: {e}"]))
      print_progress(records[-1])
    for case in cases:
      key, sub = jax.random.split(key)
      records.append(check_case(case, sub, impl, timing, roof, repeats,
                                min_sample_ms / 1e3))
      print_progress(records[-1])
  report = dict(header=header, records=records)
  print("\n" + format_table(records) + "\n")
  if sweep:
    report["sweep"] = launch_sweep.sweep(
        key, mode=mode, interpret=impl == "interpret", timing=timing, repeats=repeats,
        min_sample_s=min_sample_ms / 1e3)
    print("# GPU launch sweep (num_stages x num_warps)\n\n"
          + launch_sweep.markdown_table(report["sweep"]) + "\n")
    for r in report["sweep"]:
      if r["status"] == "FAIL":
        print(f"LAUNCH SWEEP FAIL {r['kernel']} num_stages={r['num_stages']} "
              f"num_warps={r['num_warps']}: max error {r['max_error']:.3g} vs the "
              "default launch", flush=True)
  path = out or default_json_path(dev.device_kind, date, out_dir)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  report["json"] = path
  print(f"# JSON: {path}")
  if results_md:
    append_markdown(results_md, report)
    print(f"# appended to {results_md}")
  banner = "=" * 72
  print(f"{banner}\n{verdict(records)}\n{banner}", flush=True)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _RECORD_FROM.value:
    with open(_RECORD_FROM.value) as f:
      report = json.load(f)
    path = _RESULTS_MD.value or RESULTS_MD
    append_markdown(path, report)
    print(f"appended the device check of {_RECORD_FROM.value} to {path}\n"
          f"{verdict(report['records'])}")
    return
  accelerator = jax.devices()[0].platform in ("gpu", "tpu")
  if not accelerator and not _INTERPRET.value:
    failures = check_imports()
    imports = ("all import." if not failures else
               "IMPORT FAILED:\n  " + "\n  ".join(failures))
    print(f"device_check needs an accelerator (TPU or NVIDIA GPU); the default backend "
          f"is {jax.default_backend()!r}. Kernel modules: {imports}\n"
          "Run with --interpret for a tiny interpret-mode check on CPU.")
    if failures:
      sys.exit(1)
    return
  results_md = _RESULTS_MD.value
  if results_md is None:
    results_md = None if _INTERPRET.value else RESULTS_MD
  report = run(mode="tiny" if _INTERPRET.value else "quick" if _QUICK.value else "full",
               impl="interpret" if _INTERPRET.value else "pallas",
               kernels=_KERNELS.value,
               repeats=_REPEATS.value, min_sample_ms=_MIN_SAMPLE_MS.value,
               seed=_SEED.value, out=_OUT.value, out_dir=_OUT_DIR.value,
               results_md=results_md or None,
               sweep=(jax.devices()[0].platform == "gpu" if _SWEEP.value is None
                      else _SWEEP.value))
  if any(r["status"] == "FAIL" for r in report["records"] + report.get("sweep", [])):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
