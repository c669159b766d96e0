"""The training loop: sharded init, jitted train/eval steps, checkpoints and resume.

`train(config, workdir)` trains `DecoderLM(config.model)` on `config.data` and writes
`workdir/metrics.jsonl` and `workdir/checkpoints/`. Rerunning it with the same workdir
resumes from the latest checkpoint (params, optimizer, non-parameter model state, step
and data-iterator position), so an interrupted run continued to N steps ends with the
same params as an uninterrupted N-step run. The train step is `jax.jit` with in/out
shardings (pjit) under `jax.set_mesh`; the state is created directly sharded.

Nothing is lost on interruption: the first Ctrl-C lets the step in flight finish and
saves it (the step donates its input state, so stopping mid-step would lose it); a
second Ctrl-C stops at once. A corrupt newest checkpoint is moved aside and the run
resumes from the newest one that restores; a failed save stops the run at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import sharding
from sparsejax.interop import hf
from sparsejax.models import DecoderLM, accounting
from sparsejax.sparsity.param_filter import named_leaves
from sparsejax.sparsity.sparsifier import Sparsifier, apply_masks
from sparsejax.train import compressed_step
from sparsejax.train import data as data_lib
from sparsejax.train.checkpoint import (CheckpointError, Checkpointer,
                                       abstract_with_shardings)
from sparsejax.train.config import Config, config_to_dict, parse_config
from sparsejax.train.metrics import (MetricsWriter, bits_per_byte, format_bpb,
                                     progress_bar)
from sparsejax.train.optim import make_optimizer
from sparsejax.train.state import (TrainState, split_variables, sown_metrics,
                                   sum_aux_losses)
from sparsejax.validation import ConfigError, check

Hook = Callable[[int, TrainState], None]
# Sparsity algorithms that score masks by the gradient (need the dense one).
GRADIENT_SCORED = ("rigl", "snip")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats; logits [B, T, V] float32, targets int [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


class Trainer:
  """The model, optimizer, mesh and jitted steps of one config (no I/O)."""

  def __init__(self, config: Config, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    compressed_step.check_supported(config, self.mesh)
    self.model = DecoderLM(config.model)
    self.tx, self.schedule = make_optimizer(
        compressed_step.optimizer_config(config), config.train.num_steps,
        extra_multipliers=config.model.lr_multipliers(config.train.num_steps))
    check(config.sparsity.algorithm not in GRADIENT_SCORED
          or not config.train.grad_compression.enabled, "config.sparsity.algorithm",
          config.sparsity.algorithm, f"not one of {GRADIENT_SCORED} with "
          "config.train.grad_compression (it would score the compressed gradient)")
    self.sparsifier = (Sparsifier(config.sparsity, config.train.num_steps, self.schedule)
                       if config.sparsity.enabled else None)
    if self.sparsifier is not None:   # masks live in the optimizer state
      self.tx = self.sparsifier.wrap_optax(self.tx)
    rng = jax.random.key(0)   # before the mesh: AOT (compile-only) meshes hold no arrays
    with self.activate():
      boxed = jax.eval_shape(self._init_boxed, rng)
      self.state_shardings = compressed_step.place_comm_state(
          sharding.tree_shardings(boxed, self.mesh), self.mesh)
      self.abstract_state = sharding.unbox(boxed)
      self._init = jax.jit(lambda rng: sharding.unbox(self._init_boxed(rng)),
                           out_shardings=self.state_shardings)
      batch = sharding.batch_sharding(self.mesh)
      batch_shardings = {"inputs": batch, "targets": batch}
      step = (compressed_step.make_step(self)
              if config.train.grad_compression.enabled else self._step)
      self._train_step = jax.jit(step, donate_argnums=0,
                                 in_shardings=(self.state_shardings, batch_shardings),
                                 out_shardings=(self.state_shardings, None))
      self._eval_step = jax.jit(self._eval, in_shardings=(self.state_shardings,
                                                          batch_shardings))

  @contextlib.contextmanager
  def activate(self):
    """Context: the mesh (`jax.set_mesh`) and the logical-axis rules."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      yield

  def _example_tokens(self) -> jax.Array:
    return jnp.zeros((self.config.data.batch_size, self.config.data.seq_len), jnp.int32)

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    params, model_state = split_variables(self.model.init(rng, self._example_tokens()))
    params = self._sparse_start(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), model_state=model_state,
                      grad_comm=self._grad_comm(params))

  def _grad_comm(self, params: Any) -> Any:
    return compressed_step.init_comm(self.config.train.grad_compression, params,
                                     self.mesh)

  def init_state(self, seed: int | None = None) -> TrainState:
    """A fresh train state, created sharded (no full copy on one device)."""
    seed = self.config.train.seed if seed is None else seed
    with self.activate():
      return self._init(jax.random.key(seed))

  def loss(self, params: Any, model_state: dict, batch: dict) -> tuple[jax.Array, Any]:
    """(CE + sown aux losses, (ce, aux, new model_state, sown metrics))."""
    mutable = [*model_state.keys(), "aux_loss", "metrics"]
    logits, updates = self.model.apply({"params": params, **model_state},
                                       batch["inputs"], mutable=mutable)
    ce = cross_entropy(logits, batch["targets"])
    aux = sum_aux_losses(updates.get("aux_loss", {}))
    new_state = {k: updates[k] for k in model_state}
    return ce + aux, (ce, aux, new_state, sown_metrics(updates.get("metrics", {})))

  def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (loss, (ce, aux, model_state, sown)), grads = grad_fn(self.forward_params(state),
                                                          state.model_state, batch)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "ce": ce, "aux_loss": aux,
               "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state.step),
               **sown, **self.sparsity_metrics(opt_state)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      model_state=model_state), metrics

  def _sparse_start(self, params: Any) -> Any:
    """params with the sparsifier's initial masks applied (pruned entries 0)."""
    if self.sparsifier is None:
      return params
    return apply_masks(params, self.sparsifier.init_masks(params))

  def forward_params(self, state: TrainState) -> Any:
    """The weights the forward pass uses (`Sparsifier.pre_forward`): the params as
    they are, except under STE, whose dense weights are masked, w ⊙ m with a
    straight-through gradient. Every other algorithm keeps exact zeros at its pruned
    entries (masked at init, `state_from_params` and every update), so the params are
    already w ⊙ m and their gradient is the effective-weight gradient RigL grows by."""
    if self.sparsifier is None:
      return state.params
    return self.sparsifier.pre_forward(state.params, state.opt_state)

  def sparsity_metrics(self, opt_state: Any) -> dict[str, jax.Array]:
    """The sparsifier's densities and mask changes (`Sparsifier.metrics`) plus
    "sparsity/param_saving" (pruned / all params) and "sparsity/flops_saving" (the
    pruned multiply-adds' share of the forward FLOPs per token,
    `models.accounting.flops_per_token`; a routed tensor's pruned entries count at
    the fraction a token reads: top_k / num_experts, heads·knn / rows); {} when off."""
    if self.sparsifier is None:
      return {}
    metrics = self.sparsifier.metrics(opt_state)
    params = self.abstract_state.params
    sizes = {name: leaf.size for name, leaf in named_leaves(params)}
    routed = accounting.routed_params(self.config.model, params)
    pruned = {name: (1 - metrics[f"sparsity/density/{name}"]) * sizes[name]
              for name in self.sparsifier.masks(opt_state)}
    metrics["sparsity/param_saving"] = sum(pruned.values()) / sum(sizes.values())
    try:
      flops = accounting.flops_per_token(self.config.model, self.config.data.seq_len)
    except ValueError:   # a component without a FLOP formula
      return metrics
    read = {name: r.per_token / r.units for name, r in routed.items()}
    metrics["sparsity/flops_saving"] = sum(
        2 * p * read.get(name, 1.0) for name, p in pruned.items()) / flops
    return metrics

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch {"inputs","targets": int32 [B, T]}."""
    with self.activate():
      return self._train_step(state, batch)

  def _eval(self, state: TrainState, batch: dict) -> dict[str, jax.Array]:
    logits, sown = self.model.apply({"params": self.forward_params(state),
                                     **state.model_state},
                                    batch["inputs"], mutable=["metrics"])
    return {"loss": cross_entropy(logits, batch["targets"]),
            **sown_metrics(sown.get("metrics", {}))}

  def evaluate(self, state: TrainState, num_batches: int) -> dict[str, float]:
    """Mean val loss (nats/token), bits-per-byte and sown metrics (e.g. per-projection
    activation sparsity) over the first `num_batches` val batches.

    bpb = Σ nats / (Σ bytes · ln 2) over the evaluated tokens, each counted at the val
    split's mean UTF-8 bytes per token (`data.bytes_per_token`: 1 for bytes, the
    tokenized text's bytes / tokens for a tokenizer.json); NaN for pre-tokenized .npy
    data, whose byte count is unknown."""
    it = iter(data_lib.make_dataset(self.config.data, "val",
                                    vocab_size=self.config.model.vocab_size))
    with self.activate():
      batches = [jax.device_get(self._eval_step(state, self.global_batch(next(it))))
                 for _ in range(num_batches)]
    result = {k: float(np.mean([b[k] for b in batches])) for k in batches[0]}
    result["bpb"] = bits_per_byte(
        result["loss"], data_lib.bytes_per_token(self.config.data, "val"))
    return result

  def state_from_params(self, params: Any, model_state: Any | None = None) -> TrainState:
    """A step-0 state around given params (fresh optimizer state), placed sharded."""
    def build(params, model_state):
      params = self._sparse_start(params)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params), model_state=model_state,
                        grad_comm=self._grad_comm(params))
    if model_state is None:
      model_state = self.init_state().model_state
    with self.activate():
      return jax.jit(build, out_shardings=self.state_shardings)(params, model_state)

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.global_batch(local, self.mesh)

  def restore_target(self) -> Any:
    return abstract_with_shardings(self.abstract_state, self.state_shardings)


@functools.lru_cache(maxsize=4)
def trainer_for(config: Config) -> Trainer:
  """A Trainer per config, reused so resuming in one process does not recompile."""
  return Trainer(config)


def inference_params(config: Config, state: TrainState) -> Any:
  """The weights a trained model runs with (sampling, generate, export): `state.params`
  with the run's sparsity masks applied. STE keeps dense weights and masks them in the
  forward; every other algorithm already holds exact zeros, so this is a no-op there."""
  if not config.sparsity.enabled:
    return state.params
  sparsifier = Sparsifier(config.sparsity, config.train.num_steps)
  return apply_masks(state.params, sparsifier.masks(state.opt_state))


@dataclasses.dataclass
class TrainResult:
  trainer: Trainer
  state: TrainState
  metrics: dict[str, float]   # final val loss/bpb, tokens/s, step


def restore_run(path: str, *, step: int | None = None,
                mesh: jax.sharding.Mesh | None = None) -> tuple[Config, TrainState, int]:
  """(config, train state, step) of a run's checkpoint (the latest when step is None).

  `path` is a training workdir or its `checkpoints/` directory. The state is placed on
  `mesh` (default: all local devices on "data"), whatever mesh the run used. Without
  `step`, unreadable newer checkpoints are skipped with one line each on stderr.
  """
  directory = next((d for d in (os.path.join(path, "checkpoints"), path)
                    if os.path.isdir(d)), None)
  if directory is None:
    raise FileNotFoundError(f"{path!r} is neither a training workdir (with "
                            "checkpoints/) nor a checkpoint directory")
  run_config = lambda saved: parse_config({**saved, "mesh": {}})
  ckpt = Checkpointer(directory)
  try:
    if step is None:
      restored = ckpt.restore_latest(
          lambda saved: Trainer(run_config(saved), mesh=mesh).restore_target())
      if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
      for skipped, why in restored.skipped:
        print(f"warning: skipped unreadable checkpoint {directory}/{skipped} ({why})",
              file=sys.stderr)
      config, state, step = run_config(restored.config), restored.state, restored.step
    else:
      config = run_config(ckpt.restore_config(step))
      state, _ = ckpt.restore(step, Trainer(config, mesh=mesh).restore_target())
  finally:
    ckpt.close()
  return config, state, int(step)


def load_params(workdir: str, trainer: Trainer) -> Any:
  """Params of the latest checkpoint of the run in `workdir`, placed like `trainer`'s.

  The run may use another config (e.g. dense weights for a Q-Sparse continue-training
  run) as long as its parameter tree has the same paths and shapes.
  """
  try:
    _, state, _ = restore_run(workdir, mesh=trainer.mesh)
  except FileNotFoundError as e:
    raise ConfigError(f"config.train.init_from={workdir!r} holds no checkpoint ({e})"
                      ) from None
  params = state.params
  want = jax.tree.map(lambda a: (a.shape, a.dtype), trainer.abstract_state.params)
  have = jax.tree.map(lambda a: (a.shape, a.dtype), params)
  if jax.tree.structure(want) != jax.tree.structure(have) or want != have:
    raise ConfigError(f"config.train.init_from={workdir!r}: its parameters do not match "
                      "this model's (paths, shapes or dtypes differ)")
  return params


# Model fields that change no parameter or data order: they may differ on resume.
_RESUME_FREE_MODEL_FIELDS = ("config.model.kernel_impl",)


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
  """{"prefix.a.b": leaf} of a nested dict (an empty dict is a leaf)."""
  if not isinstance(tree, Mapping) or not tree:
    return {prefix: tree}
  return {k: v for key, sub in tree.items()
          for k, v in _flat(sub, f"{prefix}.{key}").items()}


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (saved value, current value)} of the config fields that differ; a
  field missing from an older checkpoint's config counts as its default."""
  default = _flat(config_to_dict(Config()), "config")
  old, new = _flat(saved, "config"), _flat(current, "config")
  values = {k: (old.get(k, default.get(k)), new.get(k, default.get(k)))
            for k in sorted(old.keys() | new.keys())}
  return {k: (a, b) for k, (a, b) in values.items() if a != b}


def _check_resumable(saved: dict, current: dict, workdir: str) -> None:
  """Raises ConfigError naming the fields if the run in `workdir` has another model
  or data config (a resume must continue the same model on the same data)."""
  changes = config_changes(saved, current)
  for section in ("model", "data", "sparsity"):
    refused = [f"{k}={a!r}, now {b!r}" for k, (a, b) in changes.items()
               if k.startswith(f"config.{section}.")
               and k not in _RESUME_FREE_MODEL_FIELDS]
    if refused:
      raise ConfigError(
          f"--workdir={workdir} holds a run with a different config.{section} "
          f"({'; '.join(refused)}); resume it with its own config or use a new --workdir")


def _prepare_workdir(workdir: str) -> None:
  """Creates `workdir`; ConfigError if it is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    tempfile.TemporaryFile(dir=workdir).close()
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable: {e.strerror or e}") from None


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """The global batch must split evenly over the data-parallel mesh axes (ConfigError
  naming config.data.batch_size otherwise)."""
  axes = {a: mesh.shape[a] for a in sharding.BATCH_AXES}
  ways = math.prod(axes.values())
  check(batch_size % ways == 0, "config.data.batch_size", batch_size,
        f"divisible by the {ways} data-parallel devices (mesh {axes})")


def _is_deleted(tree: Any) -> bool:
  """Whether any array of `tree` was donated to (and deleted by) a jitted step."""
  return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree))


def save_on_interrupt(state: Any, ckpt: Checkpointer, save: Callable[[int], None]) -> None:
  """After Ctrl-C: saves the last completed step (unless it is on disk already, or a
  second Ctrl-C stopped a step holding `state`), waits for the save and prints what
  was kept."""
  intact = not _is_deleted(state)
  if intact and int(state.step) > (ckpt.latest_step() or 0):
    save(int(state.step))
  ckpt.wait()
  print(f"Interrupted: saved step {int(state.step)}; rerun the same command to "
        "resume." if intact else "Interrupted mid-step: nothing saved; the last "
        f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}.")


class _DeferredInterrupt:
  """Context: the first Ctrl-C (SIGINT) only sets `requested`, so the loop finishes
  the step in flight and saves it; a second one raises KeyboardInterrupt at once.
  Python sets signal handlers in the main thread only; elsewhere this does nothing."""

  def __enter__(self) -> _DeferredInterrupt:
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle) or \
          signal.default_int_handler
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def train(config: Config, workdir: str, *, hooks: Sequence[Hook] = ()) -> TrainResult:
  """Trains (or resumes) the run in `workdir`; returns the final state and metrics.

  `hooks(step, state)` run at the end of every step (after its logging and checkpoint).
  Ctrl-C (SIGINT, main thread) finishes the step in flight; then, as for a
  KeyboardInterrupt raised by a hook, the last completed step is saved before the
  KeyboardInterrupt propagates. A NaN/Inf loss or gradient norm stops the run with
  FloatingPointError without saving it; a failed save raises CheckpointError at once.
  Bad settings (workdir, mesh, batch, data, a different model in `workdir`) raise
  ConfigError naming the field before any step.
  """
  if config.train.init_from_hf:  # the checkpoint's architecture and tokenizer
    config = hf.with_hf_model(config)
  cfg = config.train
  _prepare_workdir(workdir)
  trainer = trainer_for(config)
  check_batch(config.data.batch_size, trainer.mesh)
  config_dict = config_to_dict(config)
  train_iter = iter(data_lib.make_dataset(config.data, "train",
                                          vocab_size=config.model.vocab_size))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=cfg.keep_checkpoints)

  def resume_target(saved: dict) -> Any:
    _check_resumable(saved, config_dict, workdir)
    return trainer.restore_target()

  restored = ckpt.restore_latest(resume_target)
  if restored is None and cfg.init_from:
    start, state = 0, trainer.state_from_params(load_params(cfg.init_from, trainer))
    print(f"Initialized params from {cfg.init_from}")
  elif restored is None and cfg.init_from_hf:
    start, state = 0, trainer.state_from_params(hf.load_params_for(trainer))
    print(f"Initialized params from {cfg.init_from_hf}")
  elif restored is None:
    start, state = 0, trainer.init_state()
  else:
    for step, why in restored.skipped:
      print(f"warning: checkpoint step {step} does not restore ({why}); moved it to "
            f"{ckpt.set_aside(step)}", file=sys.stderr)
    start, state = restored.step, restored.state
    train_iter.set_state(restored.data_state)
    print(f"Resumed from {ckpt.directory}/{start}")
    changes = config_changes(restored.config, config_dict)
    if changes:
      print("Resuming with changed " + ", ".join(f"{k} ({a!r} -> {b!r})"
                                                 for k, (a, b) in changes.items()))
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), resume_step=start)

  def save(step: int) -> None:
    ckpt.save(step, state, train_iter.get_state(), config_dict)

  tokens_per_step = config.data.batch_size * config.data.seq_len
  bar = progress_bar(cfg.num_steps, start)
  window: list[float] = []
  t0, tokens_per_s, final_val = time.perf_counter(), 0.0, None
  with _DeferredInterrupt() as interrupt:
    try:
      for step in range(start + 1, cfg.num_steps + 1):
        batch = trainer.global_batch(next(train_iter))
        new_state, metrics = trainer.train_step(state, batch)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
          raise FloatingPointError(
              f"loss={loss}, grad_norm={grad_norm} at step {step}: training diverged and "
              f"was stopped. The last good checkpoint is step {ckpt.latest_step()} in "
              f"{ckpt.directory}; lower config.optim.learning_rate or raise "
              "config.optim.warmup_steps and rerun.")
        state = new_state
        window.append(loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.num_steps:
          elapsed = time.perf_counter() - t0
          tokens_per_s = tokens_per_step * len(window) / max(elapsed, 1e-9)
          record = {k: float(v) for k, v in metrics.items()}
          record.update(loss=float(np.mean(window)), tokens_per_s=tokens_per_s)
          writer.write(step, "train", record)
          bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
          window, t0 = [], time.perf_counter()
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.num_steps:
          val = trainer.evaluate(state, cfg.eval_batches)
          writer.write(step, "val", val)
          final_val = val if step == cfg.num_steps else None
          bar.write(f"step {step}: val loss {val['loss']:.4f}, bpb "
                    f"{format_bpb(val['bpb'])}")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or \
            step == cfg.num_steps:
          save(step)
        for hook in hooks:
          hook(step, state)
        ckpt.check()
        if interrupt.requested:
          raise KeyboardInterrupt
    except KeyboardInterrupt:
      bar.close()
      save_on_interrupt(state, ckpt, save)
      raise
    except BaseException:
      with contextlib.suppress(CheckpointError):  # pending saves land; keep the error
        ckpt.wait()
      raise
    finally:
      bar.close()
  ckpt.wait()
  ckpt.close()
  final = final_val or trainer.evaluate(state, cfg.eval_batches)
  final.update(step=int(state.step), tokens_per_s=tokens_per_s)
  return TrainResult(trainer, state, final)
