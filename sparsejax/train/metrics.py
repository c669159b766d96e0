"""Metrics of a run: `workdir/metrics.jsonl` (one JSON object per line) and the
progress bar, plus the loss → bits-per-byte conversion.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import tqdm


def bits_per_byte(loss_nats: float, bytes_per_token: float = 1.0) -> float:
  """Mean cross-entropy in nats per token -> bits per byte, Σ nats / (Σ bytes · ln 2),
  for tokens of `bytes_per_token` UTF-8 bytes on average (1 for byte-level tokens; NaN,
  unknown, gives NaN)."""
  return loss_nats / math.log(2) / bytes_per_token


def format_bpb(bpb: float) -> str:
  """A bits-per-byte value for printouts and reports; NaN says why it is missing."""
  return "n/a (pre-tokenized data: its byte count is unknown)" if math.isnan(bpb) \
      else f"{bpb:.4f}"


class MetricsWriter:
  """Appends records {"step": int, "split": "train"|"val", ...} to metrics.jsonl.

  On resume from step s, records with step > s (written after the checkpoint the run
  resumes from) are dropped first, so the file describes exactly one history.
  """

  def __init__(self, path: str, resume_step: int = 0):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    """Appends one record; FileNotFoundError if the file was removed since (a deleted
    workdir must stop the run, not start a new partial history)."""
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"cannot log step {step}: {self.path} no longer exists "
                              "(was the workdir deleted?)")
    record = {"step": int(step), "split": split,
              **{k: _to_python(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def progress_bar(total: int, initial: int) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
