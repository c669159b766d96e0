"""Checkpoints saved before the MoE `moe_state` bias became optional, or before
`TrainState.grad_comm` existed, still restore.

Softmax MoE runs with bias_update_rate=0 saved an always-zero `moe_state` bias in
`TrainState.model_state`; the current model no longer creates it. Restoring reads and
drops such extra model_state entries; any other difference still fails, naming paths.
"""

import os

from typing import Any

import flax
import jax
import numpy as np
import pytest

from conftest import tiny_config_dict
from sparsejax.train.checkpoint import CheckpointError, Checkpointer
from sparsejax.train.config import config_to_dict, parse_config
from sparsejax.train.trainer import Trainer, restore_run, train

_MOE = dict(ffn="moe", ffn_options=dict(num_experts=4, top_k=2))


def _config(bias_update_rate=0.0, **model):
  return parse_config(tiny_config_dict(
      model=dict(ffn="moe", ffn_options=dict(_MOE["ffn_options"],
                                             bias_update_rate=bias_update_rate), **model),
      train=dict(num_steps=4, log_every=2, eval_every=0, eval_batches=1,
                 checkpoint_every=2)))


def _old_model_state(rng):
  """The pre-change layout of a softmax MoE's model_state: {"moe_state": zero bias per
  block} (the bias-updating model's layout; fresh random values show they are read)."""
  abstract = Trainer(_config(bias_update_rate=0.01)).abstract_state.model_state
  assert set(abstract) == {"moe_state"}
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)


def _random_state(trainer, rng):
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                      trainer.abstract_state)


def _save(directory, step, state, config):
  ckpt = Checkpointer(directory)
  ckpt.save(step, state, {}, config_to_dict(config))
  ckpt.wait()
  ckpt.close()


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_extra_model_state_is_read_and_dropped(tmp_path, rng_seed):
  rng = np.random.default_rng(rng_seed)
  config = _config()
  trainer = Trainer(config)
  assert trainer.abstract_state.model_state == {}
  state = _random_state(trainer, rng)
  old = state.replace(model_state=_old_model_state(rng))
  _save(str(tmp_path), 5, old, config)

  ckpt = Checkpointer(str(tmp_path))
  restored, _ = ckpt.restore(5, trainer.restore_target())
  ckpt.close()
  assert restored.model_state == {}
  assert jax.tree.structure(restored) == jax.tree.structure(trainer.abstract_state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), want)
  placed = jax.tree.leaves(restored.params)[0].sharding
  assert placed == jax.tree.leaves(trainer.state_shardings.params)[0]

  _, via_run, step = restore_run(str(tmp_path))
  assert step == 5 and via_run.model_state == {}
  jax.tree.map(np.testing.assert_array_equal, _host(via_run.params), state.params)


@flax.struct.dataclass
class _StateBeforeGradComm:
  """TrainState as saved before the `grad_comm` field (gradient compression) existed."""
  step: Any
  params: Any
  opt_state: Any
  model_state: Any


def test_checkpoint_from_before_grad_comm_restores_and_resumes(tmp_path, rng_seed):
  rng = np.random.default_rng(rng_seed)
  config = parse_config(tiny_config_dict(train=dict(num_steps=4, log_every=2,
                                                    eval_every=0, eval_batches=1,
                                                    checkpoint_every=2)))
  trainer = Trainer(config)
  state = _random_state(trainer, rng).replace(step=np.int32(2))
  assert state.grad_comm is None
  old = _StateBeforeGradComm(state.step, state.params, state.opt_state, state.model_state)
  _save(str(tmp_path / "checkpoints"), 2, old, config)

  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  restored, _ = ckpt.restore(2, trainer.restore_target())
  ckpt.close()
  assert isinstance(restored, type(state)) and restored.grad_comm is None
  assert jax.tree.structure(restored) == jax.tree.structure(trainer.abstract_state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), want)
  _, via_run, step = restore_run(str(tmp_path / "checkpoints"))
  assert step == 2 and via_run.grad_comm is None
  jax.tree.map(np.testing.assert_array_equal, _host(via_run.params), state.params)


def test_other_differences_still_fail_naming_the_path(tmp_path, rng_seed):
  rng = np.random.default_rng(rng_seed)
  config = _config()
  trainer = Trainer(config)
  state = _random_state(trainer, rng)
  extra_param = dict(state.params, stray=np.zeros((3,), np.float32))
  _save(str(tmp_path / "a"), 1, state.replace(params=extra_param), config)
  wider = _random_state(Trainer(_config(d_model=48)), rng)
  _save(str(tmp_path / "b"), 1, wider, config)
  _save(str(tmp_path / "c"), 1, state, config)   # no moe_state: the bias model needs it

  for name, target, match in [
      ("a", trainer, r"does not match this model: params\.stray only in the checkpoint$"),
      ("b", trainer, r"model: params\.block_0\.attention\.k_proj\.kernel has shape "
                     r"\(48, 2, 12\) in the checkpoint, \(32, 2, 8\) in the model; .* "
                     r"\(\+\d+ more\)$"),
      ("c", Trainer(_config(bias_update_rate=0.01)),
       r"model_state\.moe_state\.block_0\.ffn\.bias only in the model")]:
    ckpt = Checkpointer(str(tmp_path / name))
    with pytest.raises(CheckpointError, match=match):
      ckpt.restore(1, target.restore_target())
    with pytest.raises(CheckpointError, match="can be read: step 1: CheckpointError: "
                       "checkpoint step 1 does not match this model: "):
      ckpt.restore_latest(lambda saved: target.restore_target())
    ckpt.close()


@pytest.mark.slow
def test_old_checkpoint_resumes_to_the_straight_run(tmp_path):
  """A run resumed from an old-layout copy of its step-2 checkpoint ends with the same
  params as the uninterrupted run, and saves the current layout."""
  config = _config()
  straight = train(config, str(tmp_path / "straight"))
  ckpt = Checkpointer(str(tmp_path / "straight" / "checkpoints"))
  trainer = Trainer(config)
  saved, data_state = ckpt.restore(2, trainer.restore_target())
  saved_config = ckpt.restore_config(2)
  ckpt.close()

  zeros = jax.tree.map(np.zeros_like, _old_model_state(np.random.default_rng(0)))
  old = Checkpointer(str(tmp_path / "old" / "checkpoints"))
  old.save(2, saved.replace(model_state=zeros), data_state, saved_config)
  old.wait()
  old.close()

  _, restored, _ = restore_run(str(tmp_path / "old"))
  jax.tree.map(np.testing.assert_array_equal, _host(restored.params), _host(saved.params))
  resumed = train(config, str(tmp_path / "old"))
  assert resumed.metrics["step"] == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               _host(resumed.state.params), _host(straight.state.params))
  assert sorted(os.listdir(tmp_path / "old" / "checkpoints")) == ["2", "4"]
  _, final, _ = restore_run(str(tmp_path / "old"))
  assert final.model_state == {}
