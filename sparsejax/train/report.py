"""Run report: a loss-curve PNG and a short `report.md` in the workdir."""

from __future__ import annotations

import datetime
import os
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.train.metrics import read_metrics  # noqa: E402


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def plot_loss_curve(metrics_path: str, out_path: str, title: str = "") -> str:
  """Train (per log interval) and val loss vs step from metrics.jsonl -> PNG."""
  records = read_metrics(metrics_path)
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  for split, style in (("train", "-"), ("val", "o-")):
    points = [(r["step"], r["loss"]) for r in records if r["split"] == split]
    if points:
      steps, losses = zip(*points)
      ax.plot(steps, losses, style, label=f"{split} loss", markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / byte)")
  ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(out_path))))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path)
  plt.close(fig)
  return out_path


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
      f"{model['num_heads']} heads ({model['num_kv_heads']} kv), attention "
      f"`{model['attention']}`, ffn `{model['ffn']}`, memory `{model['memory']}`; "
      f"{num_params:,} parameters",
      f"- data: `{data['path'] or 'embedded stdlib corpus'}`, seq_len {data['seq_len']}, "
      f"batch {data['batch_size']}; {train['num_steps']} steps = "
      f"{train['num_steps'] * data['batch_size'] * data['seq_len']:,} tokens",
      "", "## Result", "",
      "| step | val loss (nats/byte) | val bits-per-byte | train tokens/s |",
      "|---:|---:|---:|---:|",
      f"| {metrics['step']} | {metrics['loss']:.4f} | {metrics['bpb']:.4f} | "
      f"{metrics.get('tokens_per_s', 0):,.0f} |",
      "", "![loss curve](loss_curve.png)", "",
      "## Sample", "", f"Prompt `{sample_prompt!r}`, temperature 0.8, top-p 0.95:", "",
      "```", sample_prompt + sample, "```", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
