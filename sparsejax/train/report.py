"""Run report: a loss-curve PNG and a short `report.md` in the workdir."""

from __future__ import annotations

import datetime
import os
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.train.metrics import format_bpb, read_metrics  # noqa: E402


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def loss_points(metrics_path: str, split: str) -> tuple[list[int], list[float]]:
  """(steps, losses) of one split's records in a metrics.jsonl."""
  points = [(r["step"], r["loss"]) for r in read_metrics(metrics_path)
            if r["split"] == split]
  return tuple(map(list, zip(*points))) if points else ([], [])


def plot_lines(lines: dict[str, tuple[list, list, str]], out_path: str, *, title: str,
               ylabel: str = "cross-entropy (nats / byte)") -> str:
  """{label: (steps, values, matplotlib style)} -> one PNG with a line per label."""
  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
  for label, (steps, values, style) in lines.items():
    if steps:
      ax.plot(steps, values, style, label=label, markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path)
  plt.close(fig)
  return out_path


def plot_loss_curve(metrics_path: str, out_path: str, title: str = "") -> str:
  """Train (per log interval) and val loss vs step of one run -> PNG."""
  return plot_lines(
      {f"{split} loss": (*loss_points(metrics_path, split), style)
       for split, style in (("train", "-"), ("val", "o-"))}, out_path,
      title=title or os.path.basename(os.path.dirname(os.path.abspath(out_path))),
      ylabel="cross-entropy (nats / token)")


def sparsity_lines(metrics_path: str) -> list[str]:
  """The report's "Sparsity" section from the last train record that has the
  sparsifier's metrics (`Trainer.sparsity_metrics`); [] for a dense run."""
  records = [r for r in read_metrics(metrics_path)
             if r["split"] == "train" and "sparsity/density" in r]
  if not records:
    return []
  last = records[-1]
  prefix = "sparsity/density/"
  saving = lambda key: f"{last[key]:.1%}" if key in last else "n/a"
  lines = ["## Sparsity", "",
           f"At step {last['step']}: overall density {last['sparsity/density']:.4f} of "
           f"the masked tensors, {int(last['sparsity/pruned']):,} weights pruned; "
           f"parameters saved {saving('sparsity/param_saving')}, forward FLOPs per "
           f"token saved {saving('sparsity/flops_saving')}; "
           f"{int(last['sparsity/mask_changes']):,} mask entries changed at the last "
           "mask update.", "",
           "| tensor | density |", "|---|---:|"]
  lines += [f"| `{key[len(prefix):]}` | {value:.4f} |" for key, value in last.items()
            if key.startswith(prefix)]
  return [*lines, ""]


def _sizes(model: dict, field: str) -> str:
  """`field`'s value, or its per-block sizes (a shrunk model) joined by '/'."""
  per_layer = model.get(f"{field}_per_layer")
  return "/".join(map(str, per_layer)) if per_layer else str(model[field])


def write_report(workdir: str, *, config: dict, metrics: dict[str, float],
                 num_params: int, sample_prompt: str, sample: str) -> str:
  """Writes workdir/report.md and workdir/loss_curve.png; returns the report path."""
  plot_loss_curve(os.path.join(workdir, "metrics.jsonl"),
                  os.path.join(workdir, "loss_curve.png"))
  model, data, train = config["model"], config["data"], config["train"]
  lines = [
      "# sparsejax training report", "",
      f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- device: {jax.devices()[0].device_kind} × {jax.device_count()}, "
      f"JAX {jax.__version__}",
      f"- model: {model['num_layers']} layers, d_model {model['d_model']}, "
      f"{_sizes(model, 'num_heads')} heads ({_sizes(model, 'num_kv_heads')} kv), "
      f"attention "
      f"`{model['attention']}`, ffn `{model['ffn']}`, memory `{model['memory']}`; "
      f"{num_params:,} parameters",
      f"- data: `{data['path'] or 'embedded stdlib corpus'}`, seq_len {data['seq_len']}, "
      f"batch {data['batch_size']}; {train['num_steps']} steps = "
      f"{train['num_steps'] * data['batch_size'] * data['seq_len']:,} tokens",
      "", "## Result", "",
      "| step | val loss (nats/token) | val bits-per-byte | train tokens/s |",
      "|---:|---:|---:|---:|",
      f"| {metrics['step']} | {metrics['loss']:.4f} | {format_bpb(metrics['bpb'])} | "
      f"{metrics.get('tokens_per_s', 0):,.0f} |",
      "", "![loss curve](loss_curve.png)", "",
      *sparsity_lines(os.path.join(workdir, "metrics.jsonl")),
      "## Sample", "", f"Prompt `{sample_prompt!r}`, temperature 0.8, top-p 0.95:", "",
      "```", sample_prompt + sample, "```", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
