"""The config of an SAE run (`experiments/sae.py`): one typed validation step.

`parse_run_config(config_dict)` returns a frozen `RunConfig` or raises `ConfigError`
naming the bad field (e.g. `config.sae.k=64 is invalid: must be in [1, 63] ...`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparsejax import validation
from sparsejax.sae.model import SAEConfig
from sparsejax.sharding import MeshConfig
from sparsejax.validation import check


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """Where the activations come from: a trained model, a site, and the token batches."""
  workdir: str = ""          # a sparsejax training workdir (its latest checkpoint)
  hf_path: str = ""          # or a Hugging Face checkpoint directory
  site: str = "resid_0"      # sparsejax.sae.capture.site_names of the model
  data_path: str = ""        # "" = the run's data (the embedded corpus for hf_path)
  batch_size: int = 8        # token windows per step (tokens per step = batch · seq)
  seq_len: int = 128

  def validate(self, prefix: str = "config.source") -> None:
    check(bool(self.workdir) != bool(self.hf_path), f"{prefix}.workdir", self.workdir,
          f"set, or else {prefix}.hf_path (exactly one of the two)")
    check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, ">= 1")
    check(self.seq_len >= 1, f"{prefix}.seq_len", self.seq_len, ">= 1")


@dataclasses.dataclass(frozen=True)
class SAEOptimConfig:
  """Adam (the paper's ε = 6.25e-10) with a linear warmup to a constant rate."""
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 6.25e-10
  grad_clip_norm: float = 0.0   # 0 = off

  def validate(self, prefix: str = "config.optim") -> None:
    check(self.learning_rate > 0, f"{prefix}.learning_rate", self.learning_rate, "> 0")
    check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, ">= 0")
    for name in ("b1", "b2"):
      check(0 <= getattr(self, name) < 1, f"{prefix}.{name}", getattr(self, name),
            "in [0, 1)")
    check(self.eps > 0, f"{prefix}.eps", self.eps, "> 0")
    check(self.grad_clip_norm >= 0, f"{prefix}.grad_clip_norm", self.grad_clip_norm,
          ">= 0 (0 = off)")


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
  num_steps: int = 500
  seed: int = 0
  init_batches: int = 4          # batches whose activations set b_pre and the scales
  log_every: int = 25
  eval_every: int = 100          # 0: only at the end
  eval_batches: int = 4
  checkpoint_every: int = 100    # 0: only at the end (and on interruption)
  keep_checkpoints: int = 2

  def validate(self, prefix: str = "config.train") -> None:
    for name in ("num_steps", "init_batches", "log_every", "eval_batches",
                 "keep_checkpoints"):
      check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), ">= 1")
    for name in ("eval_every", "checkpoint_every"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name),
            ">= 0 (0 = off)")
    check(self.seed >= 0, f"{prefix}.seed", self.seed, ">= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  source: SourceConfig = SourceConfig()
  sae: SAEConfig = SAEConfig()
  optim: SAEOptimConfig = SAEOptimConfig()
  train: SAETrainConfig = SAETrainConfig()
  mesh: MeshConfig = MeshConfig()


def parse_run_config(config: Any) -> RunConfig:
  """ConfigDict / dict -> validated frozen `RunConfig`."""
  return validation.from_mapping(RunConfig, config, "config")


def run_config_to_dict(config: RunConfig) -> dict:
  return validation.to_dict(config)
