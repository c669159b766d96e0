"""Dense vs MoE vs PKM vs UltraMem (+ the UltraMem ablation ladder) at matched activated
params and equal tokens on the embedded corpus.

Every variant is its own config file (experiments/configs/{dense,moe,pkm,ultramem}.py
and ultramem_ablation.py:{pkm_skip,tdqkr,ive}), trained with the same data, seed, steps
and tokens. Writes to --workdir: report.md (table, definitions, the paper's expected
ordering and what we measured), results.json and val_curves.png; --record appends the
table to benchmarks/RESULTS.md.

  python experiments/compare.py --reduced --workdir=workdir/compare --record   # make compare
  python experiments/compare.py --workdir=workdir/compare_full --record        # configs' steps
  python experiments/compare.py --workdir=/tmp/c --steps=20 --variants=dense,ultramem

Interrupted? Rerun the same command: finished variants are kept, the running one resumes.

--reduced (≈18 min on a busy 2-core CPU, compile included) trains REDUCED_STEPS steps at the
configs' model, seq_len and batch; without it each variant runs its config's num_steps
(360). The MoE runs with ffn_options.dispatch=--moe_dispatch ("loop" by default: exact, like
"dropless", and the fastest on CPU; "dropless"/ragged_dot is far slower there).

Columns:
  val loss / bits/byte  final val cross-entropy in nats per byte, and that / ln 2.
  params                total = all parameters; non-emb. = without the (tied) embedding.
  activated             non-embedding params used per token
                        (`sparsejax.models.accounting.activated_params`): everything
                        counts fully except MoE routed experts (top_k/num_experts of
                        w_gate, w_up, w_down) and memory value tables (the heads·knn
                        rows read per token × the row width).
  FLOPs/token           forward FLOPs per token at seq_len
                        (`sparsejax.models.accounting.flops_per_token`: 2 × the
                        activated matmul params incl. the LM head + attention scores at
                        the mean causal context seq_len/2 + memory retrieval scoring).
  tok/s                 training tokens per second (mean of the logged windows after the
                        first, which includes compilation).

The paper's claim under test (UltraMem, arXiv 2411.12364): at matched activated params
and FLOPs, UltraMem ≲ MoE < PKM < Dense in loss, and each ablation step lowers it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import configs  # noqa: E402  (sibling packages)
import results_log  # noqa: E402

from sparsejax.models import accounting  # noqa: E402
from sparsejax.models.config import ModelConfig, parse_model_config  # noqa: E402
from sparsejax.train import sweep  # noqa: E402
from sparsejax.train.report import read_metrics  # noqa: E402

# name: (config in experiments/configs, as `configs.load` takes it; description)
VARIANTS = {
    "dense": ("dense", "dense SwiGLU decoder, d_ff 384"),
    "moe": ("moe", "8 SwiGLU experts top-2 (d_expert 192), d_ff-matched"),
    "pkm": ("pkm", "PKM 85², 2 heads × top-16, in place (1:1,2:2), d_ff 256"),
    "pkm_skip": ("ultramem_ablation:pkm_skip", "+ skip-layer (0:2,1:3)"),
    "tdqkr": ("ultramem_ablation:tdqkr",
              "+ Tucker retrieval (r 2, 1 core), W_o, 85² values × 128"),
    "ive": ("ultramem_ablation:ive", "+ IVE: E=4, 120² values × 64"),
    "ultramem": ("ultramem", "+ multi-core scoring (C=2) = full UltraMem"),
}
EXPECTED = ("UltraMem ≲ MoE < PKM < Dense (val loss at matched activated params), and "
            "pkm > pkm_skip > tdqkr > ive > ultramem along the ablation ladder")
REDUCED_STEPS = 100
REDUCED = {"train": {"eval_batches": 4}}  # + checkpoints only at half-time and the end

_WORKDIR = flags.DEFINE_string("workdir", "workdir/compare", "Output directory.")
_REDUCED = flags.DEFINE_bool("reduced", False, f"Reduced run (`make compare`): "
                             f"{REDUCED_STEPS} steps per variant, ≈18 min on 2 CPU cores.")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps of every variant (0: "
                              "REDUCED_STEPS with --reduced, else the configs' num_steps).")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to train.")
_MOE_DISPATCH = flags.DEFINE_enum(
    "moe_dispatch", "loop", ["auto", "dropless", "loop", "capacity"],
    "config.model.ffn_options.dispatch of the MoE variant.")
_OVERRIDES = flags.DEFINE_string("overrides", "", "JSON dict deep-merged into every "
                                 "variant's config, e.g. '{\"data\": {\"batch_size\": 8}}'.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")


def count_params(model: ModelConfig) -> dict[str, int]:
  """Total, embedding, non-embedding and activated-per-token params (module docstring)."""
  params = accounting.abstract_params(model)
  return {**accounting.count_params(params),
          "activated_params": accounting.activated_params(model, params)}


def train_tokens_per_s(metrics_path: str) -> float:
  """Mean tokens/s of the logged train windows after the first (compile included)."""
  rates = [r["tokens_per_s"] for r in read_metrics(metrics_path)
           if r["split"] == "train" and "tokens_per_s" in r]
  rates = rates[1:] or rates
  return float(np.mean(rates)) if rates else float("nan")


def variant_configs(names, steps: int, reduced: bool, overrides: dict,
                    moe_dispatch: str) -> dict[str, dict]:
  """{name: config dict} with the shared train settings applied."""
  out = {}
  for name in names:
    config = configs.load(VARIANTS[name][0]).to_dict()
    num_steps = steps or (REDUCED_STEPS if reduced else config["train"]["num_steps"])
    every = max(num_steps // 5, 1)
    config = sweep.deep_update(config, {"train": {
        "num_steps": num_steps, "sample_tokens": 0, "eval_every": every,
        "log_every": max(min(config["train"]["log_every"], every), 1),
        "checkpoint_every": every}})
    if reduced:
      config = sweep.deep_update(config, {**REDUCED, "train": {
          **REDUCED["train"], "checkpoint_every": max(num_steps // 2, 1)}})
    if config["model"]["ffn"] == "moe":
      config = sweep.deep_update(config, {"model": {"ffn_options": {"dispatch": moe_dispatch}}})
    out[name] = sweep.deep_update(config, overrides)
  return out


def markdown_table(rows: list[dict], baseline: str | None) -> str:
  base = next((r for r in rows if r["name"] == baseline), None)
  lines = ["| variant | val loss | Δ vs dense | bits/byte | total params (non-emb.) | "
           "activated params | FLOPs/token | train tok/s | tokens | wall s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    delta = f"{r['val_loss'] - base['val_loss']:+.4f}" if base else "-"
    lines.append(
        f"| {r['name']} | {r['val_loss']:.4f} | {delta} | {r['val_bpb']:.4f} | "
        f"{r['total_params'] / 1e6:.3f}M ({r['nonembedding_params'] / 1e6:.3f}M) | "
        f"{r['activated_params'] / 1e6:.3f}M | {r['flops_per_token'] / 1e6:.2f}M | "
        f"{r['tokens_per_s']:,.0f} | {r['tokens']:,} | {r['wall_s']:.0f} |")
  return "\n".join(lines)


def summary(rows: list[dict]) -> str:
  """1–3 sentences on the measured ordering (generated from the numbers)."""
  by = {r["name"]: r for r in rows}
  ordered = sorted(rows, key=lambda r: r["val_loss"])
  text = ["Measured order (lowest val loss first): " + " < ".join(
      f"{r['name']} ({r['val_loss']:.4f})" for r in ordered) + "."]
  main = [n for n in ("ultramem", "moe", "pkm", "dense") if n in by]
  if len(main) >= 2:
    holds = all(by[a]["val_loss"] <= by[b]["val_loss"]
                for a, b in zip(main, main[1:]))
    broken = [f"{a} > {b}" for a, b in zip(main, main[1:])
              if by[a]["val_loss"] > by[b]["val_loss"]]
    text.append(f"The paper's main ordering {' < '.join(main)} "
                + ("holds here." if holds else
                   f"does not hold here: {', '.join(broken)} (the other pairs hold)."))
  ladder = [n for n in ("pkm", "pkm_skip", "tdqkr", "ive", "ultramem") if n in by]
  if len(ladder) >= 2:
    steps = [f"{b} {by[b]['val_loss'] - by[a]['val_loss']:+.4f}"
             for a, b in zip(ladder, ladder[1:])]
    better = sum(by[b]["val_loss"] < by[a]["val_loss"] for a, b in zip(ladder, ladder[1:]))
    text.append(f"Ablation ladder: {better} of {len(ladder) - 1} steps lower the val "
                f"loss (Δ vs the previous step: {', '.join(steps)}).")
  return " ".join(text)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    sys.exit(f"error: --variants has unknown {unknown}; allowed: {list(VARIANTS)}")
  overrides = json.loads(_OVERRIDES.value) if _OVERRIDES.value else {}
  names = list(_VARIANTS.value)
  configs = variant_configs(names, _STEPS.value, _REDUCED.value, overrides,
                            _MOE_DISPATCH.value)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  rows = []
  start = time.perf_counter()
  for name in names:
    description = VARIANTS[name][1]
    print(f"=== {name}: {description}", flush=True)
    result = sweep.run_variant(name, configs[name], _WORKDIR.value, description)
    model = parse_model_config(configs[name]["model"])
    seq_len = configs[name]["data"]["seq_len"]
    rows.append({**dataclasses.asdict(result), **count_params(model),
                 "flops_per_token": accounting.flops_per_token(model, seq_len),
                 "tokens_per_s": train_tokens_per_s(
                     os.path.join(_WORKDIR.value, name, "metrics.jsonl")),
                 "steps": configs[name]["train"]["num_steps"]})
  total_wall = time.perf_counter() - start
  table = markdown_table(rows, "dense" if "dense" in names else None)
  first = configs[names[0]]
  steps = rows[0]["steps"]
  plot = sweep.plot_curves(_WORKDIR.value, names,
                           os.path.join(_WORKDIR.value, "val_curves.png"),
                           f"Dense / MoE / PKM / UltraMem, {steps} steps")
  legend = "\n".join(f"- `{r['name']}`: {r['description']}" for r in rows)
  body = (
      f"{table}\n\n{legend}\n\n"
      f"Setup: d_model {first['model']['d_model']}, {first['model']['num_layers']} "
      f"blocks, seq_len {first['data']['seq_len']}, batch {first['data']['batch_size']}, "
      f"{steps} steps ({rows[0]['tokens']:,} train tokens) per variant, same data and "
      f"seed; MoE dispatch `{_MOE_DISPATCH.value}`"
      f"{'; reduced run (`make compare`)' if _REDUCED.value else ''}. Val loss in nats "
      "per byte. Activated params: non-embedding params used per token (MoE routed "
      "experts × top_k/num_experts; memory value tables only the heads·knn rows read "
      "per token; keys, query, W_o, norms fully). FLOPs/token: forward, 2 × activated "
      "matmul params incl. the LM head + attention scores at mean causal context "
      "seq_len/2 + memory retrieval scoring (formulas in "
      "sparsejax/models/accounting.py).\n\n"
      f"Expected (paper): {EXPECTED}.\n\nMeasured: {summary(rows)}")
  with open(os.path.join(_WORKDIR.value, "results.json"), "w") as f:
    json.dump({"variants": rows, "wall_s": total_wall, "configs": configs}, f, indent=1)
  with open(os.path.join(_WORKDIR.value, "report.md"), "w") as f:
    f.write(f"# Dense / MoE / PKM / UltraMem comparison\n\n{body}\n\n"
            "![val curves](val_curves.png)\n")
  print(body)
  print(f"report: {os.path.join(_WORKDIR.value, 'report.md')}; plot: {plot}")
  if _RECORD.value:
    results_log.append_section(
        "Dense / MoE / PKM / UltraMem + ablation ladder (experiments/compare.py)",
        body, command=" ".join(["python experiments/compare.py", *sys.argv[1:]]))


if __name__ == "__main__":
  app.run(main)
