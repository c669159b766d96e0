"""Benchmark the MoE FFN dispatch implementations against dense FFNs, side by side.

  .venv/bin/python experiments/bench_moe.py --tokens=2048 --d_model=256 \
      --num_experts=8 --top_k=2 --d_expert=256 --batch_sizes=1,2,4,8,16,32,64 \
      --repeats=5 --min_sample_ms=50 --record

(the CPU run recorded in benchmarks/RESULTS.md). Two measurements in one run:

(a) training-shaped throughput: tokens/s of forward + backward (gradients w.r.t. the
    router, the expert weights and x) of the routed MoE FFN on x [T, D] for
    impl = loop / dropless / capacity (`sparsejax.ops.moe.moe_ffn`, routing included),
    against a dense `GatedFFN` of EQUAL ACTIVATED params per token
    (d_ff = top_k · d_expert).
(b) decode latency vs batch size B (one token per sequence, x [B, D], forward only) for
    impl = decode / dropless / capacity, a dense GatedFFN of equal activated params
    (d_ff = k·F) and one of equal total params (d_ff = E·F), with the bytes of FFN
    weights each reads per step: decode the unique experts actually selected (counted
    from this batch's routing) × per-expert bytes; dropless / capacity all E experts;
    dense its whole weight; and the same per token.

Before timing, every impl is asserted to agree numerically (forward and, for (a),
gradients) with the loop reference: dropless and decode exactly as is; capacity with
the reference's weights of the slots it dropped set to 0 (it drops slots past its
capacity C = ceil(k·T/E · capacity_factor); the dropped fraction is reported).

Every function is jitted and warmed up; each sample times `inner` back-to-back calls
(enough for >= --min_sample_ms) ending with `block_until_ready`, methods are interleaved
round-robin across --repeats samples, and the median per-call time is reported. On CPU
absolute times are not meaningful (shared cores, no HBM): read the ratios only.

Results: tables on stdout, one JSON line per measurement appended to --out (with date,
device, JAX version, git commit and load average), and with --record a section appended
to benchmarks/RESULTS.md via `results_log.append_section`.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, REPO)

from sparsejax.layers.ffn import GatedFFN  # noqa: E402
from sparsejax.models import accounting, parse_model_config  # noqa: E402
from sparsejax.ops import moe as moe_ops  # noqa: E402
from sparsejax.sharding import unbox  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_log  # noqa: E402  (sibling modules)
from timing import time_methods  # noqa: E402

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens T of the training-shaped run.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model dim D.")
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Routed experts E.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token k.")
_D_EXPERT = flags.DEFINE_integer("d_expert", 256, "Hidden size F of each expert.")
_CAPACITY_FACTOR = flags.DEFINE_float("capacity_factor", 1.25,
                                      "dispatch=capacity: C = ceil(k·T/E · factor).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32", "64"],
                                 "Decode batch sizes (one token per sequence).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed samples per method (median).")
_MIN_SAMPLE_MS = flags.DEFINE_float(
    "min_sample_ms", 20.0, "Each sample repeats the call until it lasts at least this.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for weights and inputs.")
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "moe.jsonl"),
                           "JSONL file to append one line per measurement to.")
_RECORD = flags.DEFINE_bool("record", False,
                            "Append a section to benchmarks/RESULTS.md.")

TRAIN_IMPLS = ("loop", "dropless", "capacity")
DECODE_IMPLS = ("decode", "dropless", "capacity")


# ------------------------------------------------------------------------------ models


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def init_moe(key, d: int, e: int, f: int, init_std: float = 0.02) -> dict:
  """Router [D,E] and expert weights w_gate, w_up [E,D,F], w_down [E,F,D] (f32)."""
  kr, kg, ku, kd = jax.random.split(key, 4)
  return {"router": init_std * jax.random.normal(kr, (d, e)) * 10.0,  # spread routing
          "w_gate": init_std * jax.random.normal(kg, (e, d, f)),
          "w_up": init_std * jax.random.normal(ku, (e, d, f)),
          "w_down": init_std * jax.random.normal(kd, (e, f, d))}


def route(params, x, k):
  return moe_ops.route(x @ params["router"], k)


def moe_apply(params, x, *, k: int, impl: str, capacity_factor: float):
  """(y [T,D], dropped fraction) of the routed MoE FFN, routing included."""
  weights, experts, _ = route(params, x, k)
  return moe_ops.moe_ffn(x, weights, experts, params["w_gate"], params["w_up"],
                         params["w_down"], dispatch=impl, capacity_factor=capacity_factor)


def capacity_keep(experts, num_experts: int, capacity_factor: float):
  """bool [T,k]: the slots `dispatch="capacity"` keeps (slot-major positions < C)."""
  t, k = experts.shape
  c = moe_ops.capacity(t, k, num_experts, capacity_factor)
  onehot = jax.nn.one_hot(experts.T, num_experts, dtype=jnp.int32)   # [k, T, E]
  position = jnp.cumsum(onehot.reshape(k * t, num_experts), axis=0).reshape(
      k, t, num_experts) - 1
  return jnp.sum(position * onehot, axis=-1).T < c


def masked_reference(params, x, *, k: int, capacity_factor: float):
  """The loop reference with the weights of the slots capacity drops set to 0."""
  weights, experts, _ = route(params, x, k)
  keep = capacity_keep(experts, params["w_up"].shape[0], capacity_factor)
  y, _ = moe_ops.moe_ffn(x, weights * keep, experts, params["w_gate"], params["w_up"],
                         params["w_down"], dispatch="loop")
  return y, jnp.mean(~keep)


def dense_ffn(d: int, d_ff: int, key):
  """(apply(params, x [T,D]) -> y, params) of a GatedFFN (SwiGLU) with hidden d_ff."""
  cfg = parse_model_config(dict(d_model=d, d_ff=d_ff, num_heads=1, num_kv_heads=1))
  module = GatedFFN(cfg)
  params = jax.jit(lambda key: unbox(module.init(key, jnp.zeros((1, 1, d)))["params"])
                   )(key)
  return (lambda p, x: module.apply({"params": p}, x[None])[0]), params


@functools.partial(jax.jit, static_argnums=(1, 2))
def normals(key, n: int, shape) -> jax.Array:
  """n independent standard-normal f32 arrays of `shape`, [n, *shape]."""
  return jax.random.normal(key, (n, *shape), jnp.float32)


def nbytes(tree) -> int:
  return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def moe_accounts(params, k: int) -> dict:
  """Total and activated-per-token params of the MoE FFN `params` (router + experts)
  and expert_bytes(n): the bytes of n experts' weights, by `sparsejax.models.accounting`
  with the FFN as block 0's of a one-block model."""
  e, d, f = params["w_gate"].shape
  model = parse_model_config(dict(d_model=d, num_layers=1, num_heads=1, num_kv_heads=1,
                                  ffn="moe", ffn_options=dict(num_experts=e, top_k=k,
                                                              d_expert=f)))
  tree = lambda p: {"block_0": {"ffn": p}}
  experts = {n: params[n] for n in ("w_gate", "w_up", "w_down")}
  return dict(total=accounting.count_params(params)["total_params"],
              activated=accounting.activated_params(model, tree(params)),
              expert_bytes=lambda n: accounting.decode_bytes_per_step(
                  model, tree(experts), {"block_0/ffn": n}))


def train_step_fn(forward):
  """jit(params, x, g) -> ((loss, dropped fraction), grads w.r.t. params and x), with
  loss = Σ y·g and forward(params, x) -> (y, dropped fraction)."""
  def loss(params, x, g):
    y, dropped = forward(params, x)
    return jnp.sum(y * g), dropped
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


# ------------------------------------------------------------------------------ checks


def assert_close(name: str, ref, got, rtol: float = 2e-4) -> float:
  """Asserts |got − ref| <= rtol · max|ref| elementwise over pytrees; returns the max
  difference relative to max|ref|."""
  worst = 0.0
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
    if r.shape != g.shape:
      raise AssertionError(f"{name}: shape {g.shape} vs reference {r.shape}")
    scale = max(float(np.max(np.abs(r))), 1e-30)
    rel = float(np.max(np.abs(g - r))) / scale
    if not rel <= rtol:
      raise AssertionError(f"{name} disagrees with the loop reference: max |diff| = "
                           f"{rel:.3g} × max|ref| > {rtol}")
    worst = max(worst, rel)
  return worst


# ------------------------------------------------------------------------------ timing


def bench_train(*, t, d, e, k, f, capacity_factor, repeats, min_sample_s, seed, header):
  key_p, key_x, key_d = jax.random.split(jax.random.key(seed), 3)
  params = init_moe(key_p, d, e, f)
  x, g = normals(key_x, 2, (t, d))
  dense, dense_params = dense_ffn(d, k * f, key_d)

  steps = {impl: train_step_fn(
      lambda p, x, impl=impl: moe_apply(p, x, k=k, impl=impl,
                                        capacity_factor=capacity_factor))
           for impl in TRAIN_IMPLS}
  steps["dense"] = train_step_fn(lambda p, x: (dense(p, x), jnp.zeros(())))
  ref_step = train_step_fn(
      lambda p, x: masked_reference(p, x, k=k, capacity_factor=capacity_factor))

  # Agreement (forward loss and all gradients) before timing.
  outs = {impl: jax.block_until_ready(steps[impl](params, x, g)) for impl in TRAIN_IMPLS}
  diffs = {"loop": 0.0,
           "dropless": assert_close(f"train dropless (T={t})", outs["loop"],
                                    outs["dropless"]),
           "capacity": assert_close(f"train capacity (T={t}, dropped slots zeroed in "
                                    "the reference)", ref_step(params, x, g),
                                    outs["capacity"])}
  dropped = float(outs["capacity"][0][1])

  args = {name: (dense_params if name == "dense" else params, x, g) for name in steps}
  samples = time_methods(steps, args, repeats, min_sample_s)
  t_dense = float(np.median(samples["dense"]))
  moe_params = moe_accounts(params, k)
  records = []
  for name, ts in samples.items():
    tm = float(np.median(ts))
    moe = name != "dense"
    records.append(dict(
        header, bench="train", impl=name, tokens=t, d_model=d, num_experts=e,
        top_k=k, d_expert=f, d_ff=None if moe else k * f,
        capacity_factor=capacity_factor if name == "capacity" else None,
        time_s=tm, times_s=[float(v) for v in ts], tokens_per_s=t / tm,
        throughput_vs_dense=t_dense / tm,
        total_ffn_params=moe_params["total"] if moe else nbytes(dense_params) // 4,
        activated_ffn_params=moe_params["activated"] if moe else
        nbytes(dense_params) // 4,
        dropped_fraction=dropped if name == "capacity" else 0.0,
        max_rel_diff=diffs.get(name), agreed=True))
  return records


def bench_decode(*, batch_sizes, d, e, k, f, capacity_factor, repeats, min_sample_s,
                 seed, header):
  key_p, key_x, key_a, key_t = jax.random.split(jax.random.key(seed + 1), 4)
  params = init_moe(key_p, d, e, f)
  dense_act, p_act = dense_ffn(d, k * f, key_a)
  dense_tot, p_tot = dense_ffn(d, e * f, key_t)
  fwd = {impl: jax.jit(lambda p, x, impl=impl: moe_apply(
      p, x, k=k, impl=impl, capacity_factor=capacity_factor)[0]) for impl in DECODE_IMPLS}
  fwd["dense_activated"] = jax.jit(dense_act)
  fwd["dense_total"] = jax.jit(dense_tot)

  @jax.jit
  def reference(p, x):
    """(loop output, loop output with capacity's dropped slots zeroed, its dropped
    fraction, selected experts [B,k])."""
    y = moe_apply(p, x, k=k, impl="loop", capacity_factor=capacity_factor)[0]
    return (y, *masked_reference(p, x, k=k, capacity_factor=capacity_factor),
            route(p, x, k)[1])
  expert_bytes = moe_accounts(params, k)["expert_bytes"]
  weight_bytes = {"dropless": expert_bytes(e), "capacity": expert_bytes(e),
                  "dense_activated": nbytes(p_act), "dense_total": nbytes(p_tot)}
  fparams = {"dense_activated": p_act, "dense_total": p_tot}

  records = []
  for b in batch_sizes:
    x = normals(jax.random.fold_in(key_x, b), 1, (b, d))[0]
    ref, ref_cap, dropped, experts = reference(params, x)
    diffs = {"decode": assert_close(f"decode (B={b})", ref, fwd["decode"](params, x)),
             "dropless": assert_close(f"dropless (B={b})", ref,
                                      fwd["dropless"](params, x))}
    diffs["capacity"] = assert_close(f"capacity (B={b}, dropped slots zeroed in the "
                                     "reference)", ref_cap, fwd["capacity"](params, x))
    unique = int(np.unique(np.asarray(experts)).size)
    touched = dict(weight_bytes, decode=expert_bytes(unique))
    args = {name: (fparams.get(name, params), x) for name in fwd}
    samples = time_methods(fwd, args, repeats, min_sample_s)
    t_act = float(np.median(samples["dense_activated"]))
    for name, ts in samples.items():
      tm = float(np.median(ts))
      records.append(dict(
          header, bench="decode", impl=name, batch=b, d_model=d, num_experts=e,
          top_k=k, d_expert=f,
          capacity_factor=capacity_factor if name == "capacity" else None,
          time_s=tm, times_s=[float(v) for v in ts],
          time_vs_dense_activated=tm / t_act,
          unique_experts=unique if name != "dense_activated" and name != "dense_total"
          else None,
          weight_bytes=touched[name], weight_bytes_per_token=touched[name] / b,
          dropped_fraction=float(dropped) if name == "capacity" else 0.0,
          max_rel_diff=diffs.get(name), agreed=True))
  return records


def _t(seconds: float, cpu: bool) -> str:
  s = f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"
  return f"({s})" if cpu else s


def train_table(records, cpu: bool) -> str:
  lines = ["| impl | fwd+bwd time | tokens/s | throughput vs dense | activated / total "
           "FFN params | dropped slots | max rel. diff |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    diff = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
    name = r["impl"] if r["impl"] != "dense" else f"dense (d_ff={r['d_ff']})"
    lines.append(f"| {name} | {_t(r['time_s'], cpu)} | "
                 f"{'(' if cpu else ''}{r['tokens_per_s']:,.0f}{')' if cpu else ''} | "
                 f"{r['throughput_vs_dense']:.2f}× | "
                 f"{r['activated_ffn_params'] / 1e6:.2f}M / "
                 f"{r['total_ffn_params'] / 1e6:.2f}M | "
                 f"{r['dropped_fraction']:.1%} | {diff} |")
  return "\n".join(lines)


def decode_table(records, cpu: bool) -> str:
  impls = list(dict.fromkeys(r["impl"] for r in records))
  batches = list(dict.fromkeys(r["batch"] for r in records))
  by = {(r["impl"], r["batch"]): r for r in records}
  head = ["B", "unique experts"] + [f"{i} time (× dense_act)" for i in impls] + [
      "weight KiB/token: " + "/".join(impls)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
  for b in batches:
    row = [str(b), str(by[("decode", b)]["unique_experts"])]
    for i in impls:
      r = by[(i, b)]
      drop = (f", {r['dropped_fraction']:.0%} dropped" if i == "capacity"
              and r["dropped_fraction"] else "")
      row.append(f"{_t(r['time_s'], cpu)} {r['time_vs_dense_activated']:.2f}×{drop}")
    row.append(" / ".join(f"{by[(i, b)]['weight_bytes_per_token'] / 1024:.0f}"
                          for i in impls))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def interpretation(train_recs, decode_recs) -> str:
  tr = {r["impl"]: r for r in train_recs}
  by = {(r["impl"], r["batch"]): r for r in decode_recs}
  batches = sorted({r["batch"] for r in decode_recs})
  b0, b1 = batches[0], batches[-1]
  dec = lambda i, b: by[(i, b)]["time_vs_dense_activated"]
  return (
      f"Training-shaped fwd+bwd (T={tr['dense']['tokens']}): dropless runs at "
      f"{tr['dropless']['throughput_vs_dense']:.2f}×, capacity (factor "
      f"{tr['capacity']['capacity_factor']}, {tr['capacity']['dropped_fraction']:.1%} of "
      f"slots dropped) at {tr['capacity']['throughput_vs_dense']:.2f}× and the loop "
      f"reference at {tr['loop']['throughput_vs_dense']:.2f}× the tokens/s of the dense "
      "GatedFFN with the same activated params (the MoE also pays for routing, "
      "sorting/dispatch and, for loop/capacity, padded or extra rows). "
      f"Decode: at B={b0} the gather path (decode) costs {dec('decode', b0):.2f}× the "
      f"equal-activated dense FFN vs {dec('dropless', b0):.2f}× dropless, "
      f"{dec('capacity', b0):.2f}× capacity and {dec('dense_total', b0):.2f}× the "
      f"equal-total dense FFN; at B={b1} decode is {dec('decode', b1):.2f}× (it reads "
      f"T·k slices, {by[('decode', b1)]['unique_experts']} unique experts) vs "
      f"{dec('dropless', b1):.2f}× dropless. Weight bytes per token follow "
      "the routing (decode reads only the selected experts; dropless/capacity all E), "
      "but on CPU these small ops are largely dispatch/overhead-bound, so the time "
      "ratios need not track the bytes as they would on a bandwidth-bound "
      "accelerator; absolute CPU times (in parentheses) are not meaningful.")


def run(*, tokens, d_model, num_experts, top_k, d_expert, capacity_factor, batch_sizes,
        repeats, min_sample_ms, seed, out, record, command=None) -> list[dict]:
  """Runs both benchmarks; prints tables, appends JSON lines to `out`; returns rows."""
  batch_sizes = [int(b) for b in batch_sizes]
  if min(tokens, d_model, num_experts, d_expert, repeats, *batch_sizes) < 1 or not (
      1 <= top_k <= num_experts) or not capacity_factor > 0:
    raise ValueError("sizes and --repeats must be positive, 1 <= top_k <= num_experts "
                     "and capacity_factor > 0")
  dev = jax.devices()[0]
  cpu = dev.platform == "cpu"
  command = command or " ".join([".venv/bin/python", *sys.argv])
  env = results_log.environment()
  header = dict(env, platform=dev.platform, device_kind=dev.device_kind,
                command=command, repeats=repeats)
  print(f"# MoE benchmark — {env['device']}, jax {env['jax']}, commit {env['commit']}, "
        f"load average {env['loadavg']}")
  if cpu:
    print("# CPU: absolute times are NOT meaningful (shared cores, no HBM); "
          "read the ratios only.")
  common = dict(d=d_model, e=num_experts, k=top_k, f=d_expert,
                capacity_factor=capacity_factor, repeats=repeats,
                min_sample_s=min_sample_ms / 1e3, seed=seed, header=header)
  train_recs = bench_train(t=tokens, **common)
  decode_recs = bench_decode(batch_sizes=batch_sizes, **common)
  load_after = results_log.load_average()
  records = train_recs + decode_recs
  for r in records:
    r["loadavg_after"] = load_after

  t_table, d_table = train_table(train_recs, cpu), decode_table(decode_recs, cpu)
  text = interpretation(train_recs, decode_recs)
  print(f"\n(a) training-shaped fwd+bwd, T={tokens}, D={d_model}, E={num_experts}, "
        f"k={top_k}, F={d_expert}\n{t_table}\n\n(b) decode, one token per sequence\n"
        f"{d_table}\n\n{text}\n# load average after {load_after}")
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as fh:
      for r in records:
        fh.write(json.dumps(r) + "\n")
  if record:
    body = (f"D={d_model}, E={num_experts}, k={top_k}, F={d_expert}, capacity factor "
            f"{capacity_factor}, repeats={repeats}, load average {env['loadavg']} → "
            f"{load_after}." + (" CPU: times in parentheses are not meaningful, read "
                                "ratios only." if cpu else "") +
            " All impls were asserted to agree with the loop reference before timing "
            "(capacity with its dropped slots zeroed in the reference).\n\n"
            f"(a) Training-shaped forward+backward, T={tokens} tokens:\n\n{t_table}\n\n"
            "(b) Decode latency (forward, one token per sequence); times relative to the "
            "dense FFN of equal activated params; weight KiB/token = FFN weight bytes "
            "read per step / B (decode: unique selected experts × per-expert bytes):\n\n"
            f"{d_table}\n\nInterpretation: {text}")
    results_log.append_section("MoE dispatch vs dense FFN (training and decode)", body,
                               command=command)
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(tokens=_TOKENS.value, d_model=_D_MODEL.value, num_experts=_NUM_EXPERTS.value,
      top_k=_TOP_K.value, d_expert=_D_EXPERT.value,
      capacity_factor=_CAPACITY_FACTOR.value, batch_sizes=_BATCH_SIZES.value,
      repeats=_REPEATS.value, min_sample_ms=_MIN_SAMPLE_MS.value, seed=_SEED.value,
      out=_OUT.value, record=_RECORD.value)


if __name__ == "__main__":
  app.run(main)
