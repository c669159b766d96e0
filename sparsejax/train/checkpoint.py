"""Orbax checkpoints of a run: train state, data-iterator state and config, atomically.

Layout: `workdir/checkpoints/<step>/{state,data,config}`. Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never leaves a
half-written checkpoint that `latest_step()` would pick. Saves are asynchronous; a
failed one (a full disk, a deleted workdir) raises `CheckpointError` from the next
`check()`, `save()` or `wait()`, so the run stops at the first failed save.

A checkpoint damaged later (a truncated array file, broken metadata, a missing item) is
skipped by `restore_latest`, which falls back to the newest one that restores.

Restoring reads the saved tree from the checkpoint's metadata first. Non-parameter
`model_state` entries the checkpoint has and the restore target lacks (e.g. the
always-zero MoE `moe_state` bias that softmax routing without bias updates no longer
creates) are read and dropped, so older checkpoints still restore; any other difference
(a parameter or optimizer entry on one side only, a different shape) raises
CheckpointError naming the paths.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils


class CheckpointError(OSError):
  """A checkpoint could not be written, or no checkpoint of a run could be read."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict
  config: dict
  skipped: list[tuple[int, str]]   # (step, why) of newer checkpoints that did not restore


class Checkpointer:
  """Saves/restores (state, data_state, config) with `ocp.CheckpointManager`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
    self._pending: int | None = None   # the step of the last async save started

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    """Starts an (async) save of `step`; `wait()` blocks until it is on disk.

    Raises CheckpointError if the directory is gone or the previous save failed.
    """
    self.wait()
    if not os.path.isdir(self.directory):
      raise CheckpointError(f"cannot save step {step}: {self.directory} no longer "
                            "exists (was the workdir deleted?)")
    self._pending = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot save step {step} to {self.directory}: "
                            f"{_reason(e)}") from e

  def check(self) -> None:
    """Raises CheckpointError if a finished async save failed (does not block)."""
    if not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the pending save is on disk; CheckpointError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"saving step {self._pending} to {self.directory} failed: "
                            f"{_reason(e)}") from e

  def restore_config(self, step: int) -> dict:
    """The config saved with `step` (cheap: read before restoring the state)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`; the state lands on `abstract_state`'s
    ShapeDtypeStructs (shapes, dtypes and target shardings: resharding is allowed).

    `abstract_state` is a TrainState-like tree with a `model_state` field: saved
    `model_state` entries it lacks are read and dropped; any other difference from the
    saved tree raises CheckpointError naming the paths.
    """
    target = abstract_state
    saved_tree = self._saved_tree(step)
    extra = self._extra_model_state(step, saved_tree, abstract_state)
    if extra:
      target = abstract_state.replace(model_state=traverse_util.unflatten_dict({
          **traverse_util.flatten_dict(abstract_state.model_state, keep_empty_nodes=True),
          **extra}))
    # Fields that are None in the target and absent on disk (checkpoints written before
    # the field existed, e.g. TrainState.grad_comm) are left out of the restore.
    absent = [f.name for f in dataclasses.fields(target) if getattr(target, f.name) is None
              and saved_tree is not None and f.name not in saved_tree]
    item = ({f.name: getattr(target, f.name) for f in dataclasses.fields(target)
             if f.name not in absent} if absent else target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(item), data=ocp.args.JsonRestore()))
    state = restored.state
    if absent:
      state = target.replace(**state)
    if extra:
      state = state.replace(model_state=_like(state.model_state,
                                              abstract_state.model_state))
    return state, restored.data

  def _saved_tree(self, step: int) -> dict | None:
    """The saved state's metadata tree (nested dicts), None when it is unreadable (the
    restore itself then reports the damage)."""
    with warnings.catch_warnings():   # orbax's unawaited coroutine on broken metadata
      warnings.simplefilter("ignore", RuntimeWarning)
      try:
        return ocp.StandardCheckpointHandler().metadata(
            epath.Path(self.directory) / str(step) / "state").tree
      except Exception:  # pylint: disable=broad-except
        return None

  def _extra_model_state(self, step: int, saved_tree: dict | None,
                         abstract_state: Any) -> dict[tuple, Any]:
    """{path in model_state: replicated ShapeDtypeStruct} of the saved `model_state`
    leaves that `abstract_state` lacks; CheckpointError for any other difference.
    Unreadable metadata gives {}."""
    if saved_tree is None:
      return {}
    saved = ocp.tree.to_flat_dict(saved_tree)
    want = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state,
                                                         keep_empty_nodes=True))
    params_first = lambda keys: sorted(keys, key=lambda k: k[0] != "params")
    saved, want = ({k: t[k] for k in params_first(t)} for t in (saved, want))
    extra = [k for k in saved if k not in want and k[0] == "model_state"]
    problems = [f"{_path(k)} only in the checkpoint" for k in saved
                if k not in want and k[0] != "model_state"]
    problems += [f"{_path(k)} only in the model" for k in want if k not in saved]
    problems += [f"{_path(k)} has shape {_shape(saved[k])} in the checkpoint, "
                 f"{_shape(want[k])} in the model" for k in want
                 if k in saved and None not in (_shape(saved[k]), _shape(want[k]))
                 and _shape(saved[k]) != _shape(want[k])]
    if problems:
      more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
      raise CheckpointError(f"checkpoint step {step} does not match this model: "
                            f"{'; '.join(problems[:3])}{more}")
    sharding = _replicated(abstract_state)
    return {k[1:]: jax.ShapeDtypeStruct(saved[k].shape, saved[k].dtype, sharding=sharding)
            for k in extra}

  def restore_latest(self, abstract_state: Callable[[dict], Any]) -> Restored | None:
    """The newest checkpoint that restores, or None when there is none.

    `abstract_state(saved_config)` gives the restore target (it may raise to refuse
    the run, e.g. a different model). Newer checkpoints that fail to read are listed
    in `Restored.skipped` with the reason and left untouched; CheckpointError when no
    checkpoint restores.
    """
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        config = self.restore_config(step)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _reason(e)))
        continue
      target = abstract_state(config)
      try:
        state, data_state = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _reason(e)))
        continue
      return Restored(step, state, data_state, config, skipped)
    if skipped:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read: "
          + "; ".join(f"step {s}: {why}" for s, why in skipped))
    return None

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` (e.g. an unreadable one) out of the run to
    `<directory>.unreadable/<step>[.n]`, so the step can be saved again; returns the
    new path. Only process 0 moves; every process then rereads the step list."""
    target = os.path.join(f"{self.directory}.unreadable", str(step))
    suffix = 0
    while os.path.exists(target + (f".{suffix}" if suffix else "")):
      suffix += 1
    target += f".{suffix}" if suffix else ""
    sync = multihost_utils.sync_global_devices
    sync(f"set_aside_{step}_start")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    sync(f"set_aside_{step}_done")
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.close()


def _path(key: tuple) -> str:
  return ".".join(map(str, key))


def _shape(leaf: Any) -> tuple | None:
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)


def _replicated(abstract_state: Any) -> jax.sharding.Sharding | None:
  """Replicated sharding on the mesh of `abstract_state`'s first NamedSharding (None:
  orbax then uses the saved sharding)."""
  for leaf in jax.tree.leaves(abstract_state):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


def _like(tree: Any, target: Any) -> Any:
  """`tree` cut down to the keys of `target` (nested mappings)."""
  if not isinstance(target, Mapping):
    return tree
  return {k: _like(tree[k], v) for k, v in target.items()}


def _reason(error: BaseException) -> str:
  """A one-line, bounded description of an orbax / TensorStore error."""
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= 200 else text[:197] + "..."


class _DropOrbaxRecords(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
  """Hides orbax's log lines (its failures are raised too, as CheckpointError): for
  CLIs that print errors as one line."""
  logging.get_absl_handler().addFilter(_DropOrbaxRecords())


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` annotated with `shardings` (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
