"""Orbax checkpoints of a run: train state, data-iterator state and config, atomically.

Layout: `workdir/checkpoints/<step>/{state,data,config}`. Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never leaves a
half-written checkpoint that `latest_step()` would pick.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves/restores (state, data_state, config) with `ocp.CheckpointManager`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "config"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    """Starts an (async) save of `step`; `wait()` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def restore_config(self, step: int) -> dict:
    """The config saved with `step` (cheap: read before restoring the state)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`; the state lands on `abstract_state`'s
    ShapeDtypeStructs (shapes, dtypes and target shardings: resharding is allowed)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` annotated with `shardings` (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
