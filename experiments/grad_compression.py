"""Sparse gradient exchange vs the dense all-reduce: a tiny LM trained data parallel on
8 devices (fake CPU devices on a CPU host) with the plain step, DGC's dense counterpart,
top-k + error feedback and DGC at 99% to 99.9% sparsity
(experiments/configs/grad_compression.py), same data, seed and steps.

  python experiments/grad_compression.py --record      # ≈8 min on an idle 2-core CPU
  python experiments/grad_compression.py --workdir=/tmp/gc --steps=40 --variants=dense,dgc_999

Writes to --workdir: report.md (table + setup), results.json, val_curves.png and
train_curves.png (the loss of every variant); --record appends the table to benchmarks/RESULTS.md.
Interrupted? Rerun the same command: finished variants are kept, the running one resumes.

Columns:
  val loss        final val cross-entropy (nats / byte) and its change vs dense (%).
  vs counterpart  the change vs the dense run with the same optimizer: dgc_dense for
                  the dgc_* variants (DGC's optimizer at ratio 1, the comparison of Lin
                  et al. 2018), dense for top-k + error feedback (same AdamW).
  bytes / step    bytes of the arrays one device sends per step after the warm-up
                  (values + indices of every sparsified matrix in the variant's wire
                  format, plus the vectors, sent dense in float32), read from
                  `comm_bytes` in metrics.jsonl; dense: the float32 gradient one device
                  contributes to the all-reduce.
  ×               dense bytes / sent bytes after the warm-up; "run ×" the same over the
                  whole run (warm-up included, from the logged steps).
  wall s, tok/s   wall-clock of the variant (compile included) and training tokens per
                  second. The 8 fake devices share the host's cores and exchange
                  through memory, so the time says nothing about network savings: the
                  byte ratio is the portable number.

The claim under test (Lin et al. 2018, DGC): 270-600× fewer gradient bytes without
loss of accuracy. Target here: ≥ 100× fewer bytes per step than the dense all-reduce
with a final val loss within 1% of dense; the verdict is given against both dense
baselines (plain AdamW and the same-optimizer counterpart).
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import sys

from absl import flags, logging
import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import configs  # noqa: E402  (sibling packages)
import results_log  # noqa: E402

from sparsejax.train import sweep  # noqa: E402
from sparsejax.train.report import read_metrics  # noqa: E402
from sparsejax.validation import run_cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdir/grad_compression", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps of every variant (0: the "
                              "config's num_steps; DGC's warm-up scales with it).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "dgc_dense", "topk_ef_99",
                                           "topk_ef_999", "dgc_99", "dgc_993", "dgc_995",
                                           "dgc_999"], "Variants to train.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices on a CPU host (the data "
                                "axis); ignored on GPU/TPU, which use their devices.")
_OVERRIDES = flags.DEFINE_string("overrides", "", "JSON dict deep-merged into every "
                                 "variant's config, e.g. '{\"optim\": {\"eps\": 1.0}}'.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")
CONFIG = "grad_compression"
TARGET_RATIO, TARGET_LOSS = 100.0, 0.01


def variant_config(name: str, steps: int, overrides: dict | None = None) -> dict:
  config = sweep.deep_update(configs.load(CONFIG, name).to_dict(), overrides or {})
  if steps:
    config["train"].update(num_steps=steps, eval_every=max(steps // 6, 1),
                           log_every=max(min(10, steps // 10), 1),
                           checkpoint_every=max(steps // 2, 1))
    gc = config["train"]["grad_compression"]
    if gc.get("warmup_steps"):
      gc["warmup_steps"] = steps // 4
  return config


def comm_stats(metrics_path: str, dense_bytes: float) -> dict[str, float]:
  """Bytes one device sent per step: after the warm-up (last logged step) and the mean
  over the logged steps; the dense variant sends `dense_bytes`."""
  records = [r for r in read_metrics(metrics_path) if r["split"] == "train"]
  sent = [r["comm_bytes"] for r in records if "comm_bytes" in r] or [dense_bytes]
  rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
  return {"sent_bytes": sent[-1], "mean_sent_bytes": float(np.mean(sent)),
          "dense_bytes": dense_bytes, "ratio": dense_bytes / sent[-1],
          "run_ratio": dense_bytes / float(np.mean(sent)),
          "tokens_per_s": float(np.mean(rates)) if rates else float("nan")}


def counterpart(name: str) -> str:
  """The dense variant with the same optimizer as `name` (DGC's optimizer: dgc_dense;
  the momentum-SGD variants: sgd_dense)."""
  if name.startswith("sgd"):
    return "sgd_dense"
  return "dgc_dense" if name.startswith("dgc") else "dense"


def gaps(row: dict, rows: list[dict]) -> dict[str, float]:
  """Relative val-loss change of `row` vs dense and vs its counterpart, by baseline
  name (baselines not run are left out; one entry when the counterpart is dense)."""
  by_name = {r["name"]: r for r in rows}
  return {base: row["val_loss"] / by_name[base]["val_loss"] - 1
          for base in ("dense", counterpart(row["name"])) if base in by_name}


def markdown_table(rows: list[dict]) -> str:
  lines = ["| variant | val loss | Δ vs dense | Δ vs counterpart | bytes / step / device "
           "| × fewer bytes | run × (incl. warm-up) | train tok/s | wall s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    gap = {base: f"{g:+.2%}" for base, g in gaps(r, rows).items()}
    other = counterpart(r["name"])
    lines.append(f"| {r['name']} | {r['val_loss']:.4f} | {gap.get('dense', '-')} | "
                 f"{gap.get(other, '-')} ({other}) | "
                 f"{r['sent_bytes']:,.0f} | {r['ratio']:.1f}× | {r['run_ratio']:.1f}× | "
                 f"{r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |")
  return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
  """One sentence per compressed variant against the target, vs dense and vs its
  same-optimizer counterpart (generated from numbers)."""
  out = []
  for r in rows:
    if counterpart(r["name"]) == r["name"] or not gaps(r, rows):   # a baseline
      continue
    parts = []
    for base, gap in gaps(r, rows).items():
      ok = r["ratio"] >= TARGET_RATIO and gap <= TARGET_LOSS
      why = ([f"bytes ratio < {TARGET_RATIO:.0f}×"] if r["ratio"] < TARGET_RATIO else []
             ) + ([f"loss gap > {TARGET_LOSS:.0%}"] if gap > TARGET_LOSS else [])
      parts.append(f"{gap:+.2%} vs {base} — target {'met' if ok else 'not met'}"
                   + ("" if ok else f" ({', '.join(why)})"))
    out.append(f"{r['name']}: {r['ratio']:.0f}× fewer bytes, val loss "
               + "; ".join(parts) + ".")
  return " ".join(out) or "No dense baseline in this run."


def wire_format(cfgs: dict) -> str:
  """The sparse variants' wire formats, in words."""
  formats = sorted({(c["train"]["grad_compression"].get("value_dtype", "float32"),
                     c["train"]["grad_compression"].get("index_dtype", "int32"))
                    for c in cfgs.values()
                    if c["train"]["grad_compression"]["method"] != "none"})
  return " / ".join(f"{v} values + {i} indices"
                    + (" (top-k per chunk of 65,536 entries)" if i == "uint16" else "")
                    for v, i in formats) or "-"


def main(argv):
  del argv
  if jax.config.jax_num_cpu_devices != _DEVICES.value:   # before any JAX op
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  logging.set_verbosity(logging.WARNING)
  known = runpy.run_path(configs.path(CONFIG))["VARIANTS"]
  unknown = sorted(set(_VARIANTS.value) - set(known))
  if unknown:
    sys.exit(f"error: --variants has unknown {unknown}; allowed: {list(known)}")
  names = list(_VARIANTS.value)
  overrides = json.loads(_OVERRIDES.value) if _OVERRIDES.value else {}
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  rows, cfgs = [], {}
  for name in names:
    cfgs[name] = variant_config(name, _STEPS.value, overrides)
    print(f"=== {name}: grad_compression {cfgs[name]['train']['grad_compression']}",
          flush=True)
    result = sweep.run_variant(name, cfgs[name], root)
    rows.append({**dataclasses.asdict(result), **comm_stats(
        os.path.join(root, name, "metrics.jsonl"), 4.0 * result.total_params)})
  devices = jax.devices()
  first = cfgs[names[0]]
  steps = first["train"]["num_steps"]
  title = f"Sparse gradient exchange, {len(devices)} data-parallel devices, {steps} steps"
  plots = [sweep.plot_curves(root, names, os.path.join(root, f"{split}_curves.png"),
                             title, split=split) for split in ("val", "train")]
  body = (
      f"{markdown_table(rows)}\n\n"
      f"Setup: {len(devices)} × {devices[0].platform} devices on the data axis (params "
      f"replicated), d_model {first['model']['d_model']}, {first['model']['num_layers']} "
      f"blocks, seq_len {first['data']['seq_len']}, global batch "
      f"{first['data']['batch_size']}, {steps} steps, {rows[0]['total_params']:,} params "
      f"({rows[0]['dense_bytes']:,.0f} bytes of float32 gradient). Matrices send "
      f"{wire_format(cfgs)}; norm gains (vectors) are sent dense in float32. DGC: "
      "momentum 0.9 with factor masking, local clipping at grad_clip_norm·√N, ratio "
      "warm-up 25% → 6.25% → 1.56% → max(0.4%, ratio) over the first quarter of the "
      "steps, AdamW with b1 = 0 and no clipping of the aggregate (dgc_dense: the same "
      "at ratio 1); top-k EF and dense: AdamW b1 = 0.9, global-norm clipping at 1; "
      "sgd_*: momentum SGD (0.9, L2 weight decay), whose DGC runs move the momentum "
      "and the clipping into the devices. Val loss in nats per byte.\n\n"
      f"Target: ≥ {TARGET_RATIO:.0f}× fewer bytes with val loss within "
      f"{TARGET_LOSS:.0%} of dense. Measured: {verdict(rows)}\n\n"
      "Wall-clock: the fake devices share the CPU cores and exchange through memory, "
      "so times compare compute (the top-k selection and scatter-add cost CPU time "
      "here), not communication.")
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"variants": rows, "configs": cfgs}, f, indent=1)
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write(f"# Sparse gradient exchange\n\n{body}\n\n![val loss](val_curves.png)\n"
            "![train loss](train_curves.png)\n")
  print(body)
  print(f"report: {os.path.join(root, 'report.md')}; plots: {', '.join(plots)}")
  if _RECORD.value:
    results_log.append_section(
        "Sparse gradient exchange: top-k + error feedback and DGC "
        "(experiments/grad_compression.py)", body,
        command=" ".join(["python experiments/grad_compression.py", *sys.argv[1:]]))


if __name__ == "__main__":
  run_cli(main)
