"""Side-by-side comparisons: train config variants at equal steps and tokens, then
tabulate and plot them (used by experiments/qsparse.py and the model comparisons).

Each variant trains in `root/<name>/` with the ordinary trainer, so an interrupted sweep
resumes where it stopped: finished variants are read back from their `result.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax

from sparsejax.train.config import parse_config
from sparsejax.train.optim import param_path
from sparsejax.train.report import loss_points, plot_lines
from sparsejax.train.trainer import train

SPARSITY_SUFFIX = "/act_sparsity"
_EMBEDDING = re.compile(r"^(embedding|lm_head)$")


@dataclasses.dataclass
class VariantResult:
  name: str
  val_loss: float                    # nats per token (byte)
  val_bpb: float
  act_sparsity: float                # mean measured input sparsity over sparsified projections
  total_params: int                  # all parameters
  nonembedding_params: int           # without the embedding / lm_head
  activated_params: float            # non-embedding params used per token (see below)
  tokens: int
  wall_s: float
  description: str = ""


def deep_update(base: dict, overrides: Mapping[str, Any]) -> dict:
  """`base` with nested `overrides` applied (neither is modified)."""
  out = copy.deepcopy(base)
  for key, value in overrides.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = deep_update(dict(out[key]), value)
    else:
      out[key] = copy.deepcopy(value)
  return out


def activated_params(params: Any, sparsity: Mapping[str, float]) -> tuple[int, float]:
  """(non-embedding params, activated non-embedding params per token).

  A projection whose input has measured sparsity s (metric "<module path>/act_sparsity")
  multiplies only (1 − s) of its weight rows per token (Q-Sparse's activated
  parameters); all other non-embedding params count fully.
  """
  total, active = 0, 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = param_path(path)
    if _EMBEDDING.match(name):
      continue
    module = name.rsplit("/", 1)[0]
    total += leaf.size
    active += leaf.size * (1.0 - sparsity.get(module, 0.0))
  return total, active


def run_variant(name: str, config_dict: dict, root: str, description: str = ""
                ) -> VariantResult:
  """Trains (or resumes) one variant in root/name and returns its measured result."""
  workdir = os.path.join(root, name)
  result_path = os.path.join(workdir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return VariantResult(**json.load(f))
  config = parse_config(config_dict)
  start = time.perf_counter()
  result = train(config, workdir)
  wall = time.perf_counter() - start
  sparsity = {k[:-len(SPARSITY_SUFFIX)]: v for k, v in result.metrics.items()
              if k.endswith(SPARSITY_SUFFIX)}
  nonembed, active = activated_params(result.state.params, sparsity)
  out = VariantResult(
      name=name, val_loss=result.metrics["loss"], val_bpb=result.metrics["bpb"],
      act_sparsity=(sum(sparsity.values()) / len(sparsity)) if sparsity else 0.0,
      total_params=sum(int(x.size) for x in jax.tree.leaves(result.state.params)),
      nonembedding_params=nonembed, activated_params=active,
      tokens=config.train.num_steps * config.data.batch_size * config.data.seq_len,
      wall_s=wall, description=description)
  with open(result_path, "w") as f:
    json.dump(dataclasses.asdict(out), f, indent=1)
  return out


def markdown_table(results: list[VariantResult], baseline: str | None = None) -> str:
  """A markdown table of the results (Δ loss against `baseline` if given)."""
  base = next((r for r in results if r.name == baseline), None)
  lines = ["| variant | val loss | Δ vs " + (baseline or "-") + " | bits/byte | "
           "act. sparsity | activated / non-emb. params | tokens | wall s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    delta = f"{r.val_loss - base.val_loss:+.4f}" if base else "-"
    lines.append(
        f"| {r.name} | {r.val_loss:.4f} | {delta} | {r.val_bpb:.4f} | "
        f"{r.act_sparsity:.1%} | {r.activated_params / 1e6:.3f}M / "
        f"{r.nonembedding_params / 1e6:.3f}M ({r.activated_params / max(r.nonembedding_params, 1):.0%}) | "
        f"{r.tokens:,} | {r.wall_s:.0f} |")
  return "\n".join(lines)


def plot_curves(root: str, names: list[str], out_path: str, title: str,
                split: str = "val") -> str:
  """Loss vs step of every variant (from their metrics.jsonl) in one PNG."""
  style = "o-" if split == "val" else "-"
  return plot_lines({name: (*loss_points(os.path.join(root, name, "metrics.jsonl"),
                                         split), style) for name in names},
                    out_path, title=title,
                    ylabel=f"{split} cross-entropy (nats / byte)")
