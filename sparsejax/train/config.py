"""The whole run's config: one typed validation step from `ml_collections.ConfigDict`.

`parse_config(config_dict)` returns a frozen `Config` or raises `ConfigError` naming the
bad field and its allowed values (e.g. `config.train.num_steps=0 is invalid: must be >= 1`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from sparsejax import validation
from sparsejax.models.config import ModelConfig
from sparsejax.sharding import MeshConfig
from sparsejax.sparsity.config import SparsityConfig
from sparsejax.sparsity.gradient import GradCompressionConfig
from sparsejax.train.data import DataConfig
from sparsejax.train.optim import OptimConfig
from sparsejax.validation import check


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 1000
  seed: int = 0                  # parameter init seed
  log_every: int = 25            # train metrics to metrics.jsonl and the progress bar
  eval_every: int = 200          # 0: only at the end
  eval_batches: int = 8          # val batches per evaluation
  checkpoint_every: int = 200    # 0: only at the end (and on interruption)
  keep_checkpoints: int = 2
  sample_prompt: str = "def "    # prompt for the sample printed at the end
  sample_tokens: int = 200       # 0: no sample
  init_from: str = ""            # a run's workdir: start from its latest params
  init_from_hf: str = ""         # a Hugging Face checkpoint dir: its architecture and
                                 # params (sparsejax.interop.hf.with_hf_model)
  # sparse gradient exchange (top-k + error feedback / DGC): sparsejax.train.compressed_step
  grad_compression: GradCompressionConfig = GradCompressionConfig()

  def validate(self, prefix: str = "config.train") -> None:
    check(self.num_steps >= 1, f"{prefix}.num_steps", self.num_steps, ">= 1")
    check(self.log_every >= 1, f"{prefix}.log_every", self.log_every, ">= 1")
    for name in ("eval_every", "checkpoint_every", "sample_tokens"):
      value = getattr(self, name)
      check(value >= 0, f"{prefix}.{name}", value, ">= 0 (0 = off)")
    check(self.eval_batches >= 1, f"{prefix}.eval_batches", self.eval_batches, ">= 1")
    check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints",
          self.keep_checkpoints, ">= 1")
    check(self.sample_tokens == 0 or self.sample_prompt != "", f"{prefix}.sample_prompt",
          self.sample_prompt, "non-empty when sample_tokens > 0")
    check(not (self.init_from and self.init_from_hf), f"{prefix}.init_from_hf",
          self.init_from_hf, f"empty when init_from={self.init_from!r} is set")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  sparsity: SparsityConfig = SparsityConfig()   # training-time sparsity; off by default

  def validate(self, prefix: str = "config") -> None:
    check(self.model.vocab_size >= 256 or bool(self.data.path)
          or self.data.tokenizer != "bytes", f"{prefix}.model.vocab_size",
          self.model.vocab_size, ">= 256 for the byte-level default corpus")


def sections_help() -> str:
  """One line per config section naming its fields (the CLIs' --help)."""
  hints = typing.get_type_hints(Config)
  fields = lambda cls: ", ".join(f.name for f in dataclasses.fields(cls))
  return "\n".join(f"  {name}: {fields(hints[name])}" for name in hints)


def parse_config(config: Any) -> Config:
  """ConfigDict / dict -> validated frozen `Config`."""
  return validation.from_mapping(Config, config, "config")


def config_to_dict(config: Config) -> dict:
  return validation.to_dict(config)
