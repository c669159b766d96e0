"""Training an SAE on a model's activations, checkpointed and resumable like the trainer.

`train_sae(config, workdir)` loads the language model (`load_lm`: a sparsejax run's
latest checkpoint, or a Hugging Face checkpoint), streams token batches through a grain
pipeline and the model to the activation site, and trains the SAE on each batch
(nothing but the current batch is held). It writes `workdir/metrics.jsonl` (train:
loss, nmse, l0, aux_loss, dead_fraction; val: nmse, l0, ce_clean, ce_sae, ce_zero,
delta_ce = ce_sae − ce_clean, delta_ce_zero = ce_zero − ce_clean, ce_recovered =
1 − delta_ce / delta_ce_zero) and `workdir/checkpoints/` (SAE state, the token
iterator's position, the config) with `sparsejax.train.checkpoint.Checkpointer`.

Rerunning with the same workdir resumes exactly (a changed source or SAE config is
refused, naming the fields). The first Ctrl-C finishes the step in flight, saves it and
raises KeyboardInterrupt; a second one stops at once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import sharding
from sparsejax.interop import hf
from sparsejax.models import DecoderLM
from sparsejax.sae.capture import capture_fn, check_site
from sparsejax.sae.config import RunConfig, SourceConfig, run_config_to_dict
from sparsejax.sae.trainer import SAETrainer
from sparsejax.train import data as data_lib
from sparsejax.train.checkpoint import Checkpointer, abstract_with_shardings
from sparsejax.train.metrics import MetricsWriter, progress_bar
from sparsejax.train.state import TrainState
from sparsejax.train.tokenizer import BYTES
from sparsejax.train.trainer import (_DeferredInterrupt, _prepare_workdir, config_changes,
                                     restore_run, save_on_interrupt)
from sparsejax.validation import ConfigError, check


@dataclasses.dataclass
class LanguageModel:
  model: DecoderLM
  variables: dict
  data: data_lib.DataConfig    # token batches of the source's batch size and length


def load_lm(source: SourceConfig, mesh: jax.sharding.Mesh) -> LanguageModel:
  """The source's model, variables (placed on `mesh`) and data config; ConfigError
  naming `config.source.site` (with the valid sites) for a site the model lacks."""
  if source.workdir:
    try:
      run, state, _ = restore_run(source.workdir, mesh=mesh)
    except FileNotFoundError as e:
      raise ConfigError(f"config.source.workdir={source.workdir!r} holds no "
                        f"checkpoint ({e})") from None
    model_cfg, variables = run.model, {"params": state.params, **state.model_state}
    data = dataclasses.replace(run.data, path=source.data_path or run.data.path)
  else:
    model_cfg, params = hf.load_hf(source.hf_path, mesh=mesh)
    variables = {"params": params}
    tokenizer = os.path.join(source.hf_path, "tokenizer.json")
    data = data_lib.DataConfig(path=source.data_path, tokenizer=tokenizer
                               if os.path.exists(tokenizer) else BYTES)
  check_site(model_cfg, source.site, "config.source.site")
  data = dataclasses.replace(data, batch_size=source.batch_size, seq_len=source.seq_len)
  return LanguageModel(DecoderLM(model_cfg), variables, data)


def _check_resumable(saved: dict, current: dict, workdir: str) -> None:
  changes = config_changes_sae(saved, current)
  refused = [f"{k}={a!r}, now {b!r}" for k, (a, b) in changes.items()
             if k.startswith(("config.source.", "config.sae."))]
  if refused:
    raise ConfigError(f"--workdir={workdir} holds an SAE run with a different config "
                      f"({'; '.join(refused)}); resume it with its own config or use a "
                      "new --workdir")


def config_changes_sae(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (saved, current)} of the fields that differ between two run
  configs (dicts of `RunConfig`)."""
  changes = config_changes({"sae_run": saved}, {"sae_run": current})
  return {k.replace("config.sae_run.", "config.", 1): v for k, v in changes.items()}


@dataclasses.dataclass
class SAEResult:
  trainer: SAETrainer
  state: TrainState
  lm: LanguageModel
  metrics: dict[str, float]   # the final evaluation, with "step"


def evaluate(run, lm: LanguageModel, state: TrainState, mesh: jax.sharding.Mesh,
             num_batches: int) -> dict[str, float]:
  """Mean val metrics (`SAETrainer.eval_fn`'s `run`) over the first `num_batches` val
  batches (the same each time)."""
  val = iter(data_lib.make_dataset(lm.data, "val", vocab_size=lm.model.cfg.vocab_size))
  rows = [jax.device_get(run(lm.variables, sharding.global_batch(next(val), mesh),
                             state)) for _ in range(num_batches)]
  out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  out["delta_ce"] = out["ce_sae"] - out["ce_clean"]
  out["delta_ce_zero"] = out["ce_zero"] - out["ce_clean"]
  out["ce_recovered"] = (1.0 - out["delta_ce"] / out["delta_ce_zero"]
                         if out["delta_ce_zero"] else float("nan"))
  return out


def _activations(lm: LanguageModel, trainer: SAETrainer, site: str, tokens: Iterator
                 ) -> Iterator[jax.Array]:
  run = capture_fn(lm.model, site)
  while True:
    batch = sharding.global_batch(next(tokens), trainer.mesh)["inputs"]
    with trainer.activate():
      x = run(lm.variables, batch)
    yield x


def train_sae(config: RunConfig, workdir: str) -> SAEResult:
  """Trains (or resumes) the SAE run in `workdir`; returns the final state and metrics.

  Bad settings raise ConfigError naming the field before any step.
  """
  cfg, site = config.train, config.source.site
  _prepare_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  ways = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  check(config.source.batch_size % ways == 0, "config.source.batch_size",
        config.source.batch_size, f"divisible by the {ways} data-parallel devices")
  lm = load_lm(config.source, mesh)
  tokens = iter(data_lib.make_dataset(lm.data, "train", vocab_size=lm.model.cfg.vocab_size))
  trainer = SAETrainer(config.sae, config.optim, lm.model.cfg.d_model, mesh)
  acts = _activations(lm, trainer, site, tokens)
  sample = jnp.concatenate([next(acts) for _ in range(cfg.init_batches)])
  state = trainer.init_state(cfg.seed, sample)
  del sample
  config_dict = run_config_to_dict(config)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=cfg.keep_checkpoints)
  target = abstract_with_shardings(state, trainer.state_shardings(state))

  def resume_target(saved: dict) -> Any:
    _check_resumable(saved, config_dict, workdir)
    return target

  restored = ckpt.restore_latest(resume_target)
  start = 0
  if restored is not None:
    for step, why in restored.skipped:
      print(f"warning: checkpoint step {step} does not restore ({why}); moved it to "
            f"{ckpt.set_aside(step)}", file=sys.stderr)
    start, state = restored.step, restored.state
    tokens.set_state(restored.data_state)
    print(f"Resumed from {ckpt.directory}/{start}")
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), resume_step=start)

  def save(step: int) -> None:
    ckpt.save(step, state, tokens.get_state(), config_dict)

  eval_run = trainer.eval_fn(lm.model, site)
  bar = progress_bar(cfg.num_steps, start)
  bar.set_description("sae")
  final = None
  with _DeferredInterrupt() as interrupt:
    try:
      for step in range(start + 1, cfg.num_steps + 1):
        state, metrics = trainer.train_step(state, next(acts))
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.num_steps:
          record = {k: float(v) for k, v in metrics.items()}
          if not np.isfinite(record["loss"]):
            raise FloatingPointError(
                f"SAE loss={record['loss']} at step {step}: lower "
                "config.optim.learning_rate; the last good checkpoint is step "
                f"{ckpt.latest_step()} in {ckpt.directory}")
          writer.write(step, "train", record)
          bar.set_postfix(nmse=f"{record['nmse']:.3f}",
                          dead=f"{record['dead_fraction']:.2f}")
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.num_steps:
          final = evaluate(eval_run, lm, state, mesh, cfg.eval_batches)
          writer.write(step, "val", final)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or \
            step == cfg.num_steps:
          save(step)
        ckpt.check()
        if interrupt.requested:
          raise KeyboardInterrupt
    except KeyboardInterrupt:
      bar.close()
      save_on_interrupt(state, ckpt, save)
      raise
    finally:
      bar.close()
  ckpt.wait()
  ckpt.close()
  final = final or evaluate(eval_run, lm, state, mesh, cfg.eval_batches)
  final["step"] = int(state.step)
  return SAEResult(trainer, state, lm, final)
