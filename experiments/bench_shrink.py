"""Benchmark shape shrink: step time of a dense DecoderLM vs the same model shrunk to a
fraction of its FFN channels and attention heads, side by side in one run.

  .venv/bin/python experiments/bench_shrink.py --keep=0.75,0.5,0.25 --record

For each kept fraction f, `sparsejax.sparsity.channel_masks` keeps round(f·n) of every
block's FFN channels and kv head groups (by magnitude) and `shrink` builds the smaller
dense model; its logits are asserted equal to the masked model's (to --atol) before any
timing. Timed, all jitted and warmed up, interleaved round-robin over --repeats samples
(`timing.time_methods`, median per call):

  forward      logits of a [batch, seq_len] token batch;
  train step   forward + backward of the next-token cross-entropy and an SGD update.

Claim checked: the shrunk model's step time ∝ its size. "Size" is the forward FLOPs
per token (`sparsejax.models.accounting.flops_per_token`: matmuls incl. the LM head and
the attention scores; the embedding and LM head are not shrunk, so FLOPs fall a little
slower than f); the table also gives the non-embedding params. The claim holds for a
model when time ratio / FLOPs ratio is within ±--tolerance of 1. On CPU absolute times
are not meaningful (shared cores): read the ratios.

Results: a table on stdout, one JSON line per (model, measurement) appended to --out
(date, device, JAX version, commit, load average), and with --record a section appended
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
  sys.path.insert(0, REPO)

from flax import traverse_util  # noqa: E402

from sparsejax.models import DecoderLM, accounting, parse_model_config  # noqa: E402
from sparsejax.sharding import unbox  # noqa: E402
from sparsejax.sparsity.shrink import channel_masks, shrink  # noqa: E402
from sparsejax.validation import ConfigError, check, run_cli  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_log  # noqa: E402  (sibling modules)
from timing import time_methods  # noqa: E402

_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model dim D.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Blocks.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Query heads.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 8, "KV heads (GQA when fewer).")
_D_FF = flags.DEFINE_integer("d_ff", 1024, "SwiGLU hidden size.")
_VOCAB = flags.DEFINE_integer("vocab_size", 256, "Vocabulary.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_KEEP = flags.DEFINE_list("keep", ["0.75", "0.5", "0.25"],
                          "Fractions of channels and heads kept, each in (0, 1).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed samples per method (median).")
_MIN_SAMPLE_MS = flags.DEFINE_float(
    "min_sample_ms", 50.0, "Each sample repeats the call until it lasts at least this.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.15,
                                "The claim holds when time ratio / FLOPs ratio is "
                                "within 1 ± this.")
_ATOL = flags.DEFINE_float("atol", 1e-4, "Max |shrunk − masked| logits allowed.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for weights and tokens.")
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "benchmarks", "shrink.jsonl"),
                           "JSONL file to append one line per measurement to.")
_RECORD = flags.DEFINE_bool("record", False,
                            "Append a section to benchmarks/RESULTS.md.")

MEASUREMENTS = ("forward", "train_step")
CPU_NOTE = " (CPU: absolute times in parentheses are not meaningful)"


def steps(cfg):
  """{measurement: jit(params, tokens)} for DecoderLM(cfg)."""
  model = DecoderLM(cfg)

  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  def train_step(params, tokens):
    value, grads = jax.value_and_grad(loss)(params, tokens)
    return value, jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

  return {"forward": jax.jit(lambda p, t: model.apply({"params": p}, t)),
          "train_step": jax.jit(train_step)}


def masked(params, masks):
  """params with the entries `masks` (a subset of the params' tensors) prunes zeroed."""
  flat_masks = traverse_util.flatten_dict(masks)
  return traverse_util.unflatten_dict(
      {k: jnp.where(flat_masks[k], v, 0) if k in flat_masks else v
       for k, v in traverse_util.flatten_dict(params).items()})


def models(cfg, keeps, tokens, seed: int, atol: float) -> dict:
  """{name: (config, params, max |logits − masked logits|)}: the dense model and one
  shrunk model per kept fraction (asserted equal to the masked model)."""
  params = jax.jit(lambda k: unbox(DecoderLM(cfg).init(k, tokens)["params"]))(
      jax.random.key(seed))
  out = {"dense": (cfg, params, 0.0)}
  forward = steps(cfg)["forward"]
  for keep in keeps:
    masks = channel_masks(params, cfg, keep)
    small, small_params = shrink(params, masks, cfg)
    want = forward(masked(params, masks), tokens)
    diff = float(jnp.max(jnp.abs(steps(small)["forward"](small_params, tokens) - want)))
    if not diff <= atol:
      raise AssertionError(f"keep={keep}: shrunk logits differ from the masked model's "
                           f"by {diff:.3g} > atol={atol}")
    out[f"keep {keep:g}"] = (small, small_params, diff)
  return out


def bench(cfg, keeps, *, batch, seq_len, repeats, min_sample_s, seed, atol, tolerance,
          header) -> list[dict]:
  """One record per (model, measurement) with times and ratios to the dense model."""
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len), 0,
                              cfg.vocab_size)
  built = models(cfg, keeps, tokens, seed, atol)
  records = []
  for measurement in MEASUREMENTS:
    fns = {name: steps(c)[measurement] for name, (c, _, _) in built.items()}
    args = {name: (p, tokens) for name, (_, p, _) in built.items()}
    samples = time_methods(fns, args, repeats, min_sample_s)
    for name, (c, p, diff) in built.items():
      records.append(dict(
          header, measurement=measurement, model=name,
          keep=1.0 if name == "dense" else float(name.split()[1]),
          d_ff=c.resolved_d_ff, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
          params=accounting.count_params(p)["total_params"],
          nonembedding_params=accounting.activated_params(c, p),
          flops_per_token=accounting.flops_per_token(c, seq_len),
          time_s=float(np.median(samples[name])),
          times_s=[float(t) for t in samples[name]], max_abs_logit_diff=diff))
  dense = {r["measurement"]: r for r in records if r["model"] == "dense"}
  for r in records:
    base = dense[r["measurement"]]
    r["time_ratio"] = r["time_s"] / base["time_s"]
    r["flops_ratio"] = r["flops_per_token"] / base["flops_per_token"]
    r["params_ratio"] = r["nonembedding_params"] / base["nonembedding_params"]
    r["time_over_flops"] = r["time_ratio"] / r["flops_ratio"]
    r["proportional"] = abs(r["time_over_flops"] - 1) <= tolerance
  return records


def table(records, cpu: bool) -> str:
  lines = ["| model | d_ff | heads (kv) | non-emb. params | FLOPs/token ratio | "
           "forward | train step | time / FLOPs ratio (fwd, step) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  by = {(r["model"], r["measurement"]): r for r in records}
  fmt = lambda r: (f"{'(' if cpu else ''}{r['time_s'] * 1e3:.1f} ms{')' if cpu else ''}"
                   f" {r['time_ratio']:.2f}×")
  for name in dict.fromkeys(r["model"] for r in records):
    fwd, step = by[(name, "forward")], by[(name, "train_step")]
    lines.append(
        f"| {name} | {fwd['d_ff']} | {fwd['num_heads']} ({fwd['num_kv_heads']}) | "
        f"{fwd['nonembedding_params'] / 1e6:.2f}M ({fwd['params_ratio']:.2f}×) | "
        f"{fwd['flops_ratio']:.2f}× | {fmt(fwd)} | {fmt(step)} | "
        f"{fwd['time_over_flops']:.2f}, {step['time_over_flops']:.2f} |")
  return "\n".join(lines)


def verdict(records, tolerance: float) -> str:
  shrunk = [r for r in records if r["model"] != "dense"]
  held = [r for r in shrunk if r["proportional"]]
  no_slower = [r for r in shrunk if r["time_over_flops"] <= 1 + tolerance]
  worst = max(shrunk, key=lambda r: abs(r["time_over_flops"] - 1))
  ratios = ", ".join(f"{r['time_over_flops']:.2f}" for r in shrunk)
  return (f"Claim (step time ∝ size: time ratio / FLOPs ratio within 1 ± "
          f"{tolerance:g}) holds for {len(held)} of {len(shrunk)} (model, measurement) "
          f"pairs (ratios {ratios}); the shrunk model is no slower than its size "
          f"predicts (ratio ≤ {1 + tolerance:g}) in {len(no_slower)} of {len(shrunk)}. "
          f"Farthest: {worst['model']} {worst['measurement']} at "
          f"{worst['time_over_flops']:.2f} (time {worst['time_ratio']:.2f}× vs FLOPs "
          f"{worst['flops_ratio']:.2f}×). Below 1 the shrunk model is faster than its "
          "FLOPs predict (smaller activations and attention-score arrays [B, H, T, T], "
          "whose softmax traffic scales with the heads but is no matmul FLOP, fit the "
          "caches better); above 1 slower (fixed per-step costs — dispatch, norms, the "
          "unshrunk embedding and LM head — weigh more in a smaller model).")


def run(*, d_model, num_layers, num_heads, num_kv_heads, d_ff, vocab_size, batch,
        seq_len, keep, repeats, min_sample_ms, tolerance, atol, seed, out, record,
        command=None) -> list[dict]:
  """Runs the benchmark; prints the table, appends JSON lines to `out`; returns rows."""
  keeps = [float(k) for k in keep]
  for k in keeps:
    check(0 < k < 1, "--keep", k, "fractions in (0, 1)")
  for name, value in dict(batch=batch, seq_len=seq_len, repeats=repeats).items():
    check(value >= 1, f"--{name}", value, ">= 1")
  try:
    cfg = parse_model_config(dict(
        vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, d_ff=d_ff), "FLAGS")
  except ConfigError as e:   # name the flag: FLAGS.num_heads -> --num_heads
    raise ConfigError(str(e).replace("FLAGS.", "--")) from None
  dev = jax.devices()[0]
  cpu = dev.platform == "cpu"
  command = command or " ".join([".venv/bin/python", *sys.argv])
  env = results_log.environment()
  header = dict(env, command=command, batch=batch, seq_len=seq_len, repeats=repeats)
  print(f"# shrink benchmark — {env['device']}, jax {env['jax']}, commit "
        f"{env['commit']}, load average {env['loadavg']}")
  records = bench(cfg, keeps, batch=batch, seq_len=seq_len, repeats=repeats,
                  min_sample_s=min_sample_ms / 1e3, seed=seed, atol=atol,
                  tolerance=tolerance, header=header)
  load_after = results_log.load_average()
  for r in records:
    r["loadavg_after"] = load_after
  text, summary = table(records, cpu), verdict(records, tolerance)
  print(f"\n{text}\n\n{summary}\n# load average after {load_after}")
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as fh:
      for r in records:
        fh.write(json.dumps(r) + "\n")
  if record:
    body = (f"SwiGLU DecoderLM, D={d_model}, {num_layers} blocks, {num_heads} heads "
            f"({num_kv_heads} kv), d_ff={d_ff}, vocab {vocab_size}; batch {batch} × "
            f"{seq_len} tokens; median of {repeats} interleaved samples; load average "
            f"{env['loadavg']} → {load_after}. Shrunk by `channel_masks` (magnitude) "
            "+ `shrink`; every shrunk model's logits were asserted equal to the masked "
            f"model's (max |diff| ≤ {atol:g}) before timing. Times relative to the "
            f"dense model{CPU_NOTE if cpu else ''}.\n\n{text}\n\n{summary}")
    results_log.append_section("Shape shrink: dense vs shrunk step time", body,
                               command=command)
  return records


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  run(d_model=_D_MODEL.value, num_layers=_NUM_LAYERS.value, num_heads=_NUM_HEADS.value,
      num_kv_heads=_NUM_KV_HEADS.value, d_ff=_D_FF.value, vocab_size=_VOCAB.value,
      batch=_BATCH.value, seq_len=_SEQ_LEN.value, keep=_KEEP.value,
      repeats=_REPEATS.value, min_sample_ms=_MIN_SAMPLE_MS.value,
      tolerance=_TOLERANCE.value, atol=_ATOL.value, seed=_SEED.value, out=_OUT.value,
      record=_RECORD.value)


if __name__ == "__main__":
  run_cli(main)
