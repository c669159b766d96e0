"""Trainer: learning, exact resume after interruption, NaN stop, aux losses, model state."""

import dataclasses
import glob
import math
import os
import shutil
import signal
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config_dict
from sparsejax.layers import registry
from sparsejax.layers.ffn import GatedFFN
from sparsejax.train.config import config_to_dict, parse_config
from sparsejax.train.metrics import MetricsWriter, read_metrics
from sparsejax.train.checkpoint import CheckpointError
from sparsejax.train.report import write_report
from sparsejax.train.trainer import Trainer, restore_run, train, trainer_for
from sparsejax.validation import ConfigError


class _Interrupt:
  """A hook raising KeyboardInterrupt after `at` steps (a user's Ctrl-C)."""

  def __init__(self, at):
    self.at = at

  def __call__(self, step, state):
    if step == self.at:
      raise KeyboardInterrupt


def _params(result_or_state):
  state = getattr(result_or_state, "state", result_or_state)
  return jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """(workdir, result) of the tiny config trained 6 steps uninterrupted: the reference
  of the resume tests and a finished run to start from. Tests only read it."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, train(parse_config(tiny_config_dict()), workdir)


@pytest.fixture
def straight(straight_run):
  return straight_run[1]


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_params(tmp_path, straight):
  config = parse_config(tiny_config_dict())
  with pytest.raises(KeyboardInterrupt):
    train(config, str(tmp_path / "resumed"), hooks=[_Interrupt(4)])
  # Saved on interruption at step 4 (between the step-3 and step-6 checkpoints).
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints"))[-1] == "4"
  resumed = train(config, str(tmp_path / "resumed"))
  assert resumed.metrics["step"] == straight.metrics["step"] == 6
  chex.assert_trees_all_close(_params(resumed), _params(straight), rtol=1e-6, atol=1e-6)
  records = read_metrics(str(tmp_path / "resumed" / "metrics.jsonl"))
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
  assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], rel=1e-5)


def test_crash_without_final_save_resumes_from_last_checkpoint(tmp_path, straight):
  """A hard crash (no interrupt handler) loses at most the steps since the checkpoint."""
  config = parse_config(tiny_config_dict())

  def crash(step, state):
    if step == 5:
      raise RuntimeError("power cut")

  with pytest.raises(RuntimeError):
    train(config, str(tmp_path / "crashed"), hooks=[crash])
  assert sorted(os.listdir(tmp_path / "crashed" / "checkpoints")) == ["3"]
  resumed = train(config, str(tmp_path / "crashed"))
  chex.assert_trees_all_close(_params(resumed), _params(straight), rtol=1e-6, atol=1e-6)


def test_training_lowers_loss_and_writes_metrics(tmp_path):
  config = parse_config(tiny_config_dict(train=dict(num_steps=30, log_every=5,
                                                    eval_every=15, checkpoint_every=0)))
  result = train(config, str(tmp_path))
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  val = [r["loss"] for r in records if r["split"] == "val"]
  assert len(val) == 2 and val[-1] < val[0] < np.log(256) + 0.1
  train_records = [r for r in records if r["split"] == "train"]
  assert {"loss", "ce", "grad_norm", "lr", "tokens_per_s"} <= set(train_records[0])
  assert result.metrics["bpb"] == pytest.approx(result.metrics["loss"] / np.log(2))


def test_pretokenized_data_reports_bits_per_byte_as_unknown(tmp_path, rng_seed):
  """.npy shards carry no byte count: bpb is NaN (not loss / ln 2) and the report
  says why; the same ids as a byte text file give loss / ln 2."""
  ids = np.random.default_rng(rng_seed).integers(1, 256, 8000).astype(np.uint16)
  np.save(tmp_path / "ids.npy", ids)
  (tmp_path / "ids.txt").write_bytes(ids.astype(np.uint8).tobytes())
  results = {}
  for name in ("ids.npy", "ids.txt"):
    config = parse_config(tiny_config_dict(data=dict(path=str(tmp_path / name))))
    trainer = Trainer(config)
    results[name] = trainer.evaluate(trainer.init_state(), num_batches=1)
  npy, text = results["ids.npy"], results["ids.txt"]
  assert npy["loss"] == pytest.approx(text["loss"], rel=1e-6)   # the same tokens
  assert math.isnan(npy["bpb"])
  assert text["bpb"] == pytest.approx(text["loss"] / np.log(2))
  MetricsWriter(str(tmp_path / "metrics.jsonl")).write(0, "val", npy)
  report = write_report(str(tmp_path), config=config_to_dict(config),
                        metrics={**npy, "step": 0}, num_params=1, sample_prompt="x",
                        sample="")
  assert "| 0 | " in open(report).read() and \
      "n/a (pre-tokenized data: its byte count is unknown)" in open(report).read()


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = parse_config(tiny_config_dict(train=dict(num_steps=8, checkpoint_every=2)))
  poisoned = {"done": False}

  def poison(step, state):  # corrupt the params after step 4 (as a bad update would)
    if step == 4 and not poisoned["done"]:
      poisoned["done"] = True
      leaf = state.params["embedding"]
      leaf.copy_to_host_async()
      object.__setattr__(state, "params", {**state.params,
                                           "embedding": leaf * jnp.nan})

  with pytest.raises(FloatingPointError, match="last good checkpoint is step 4"):
    train(config, str(tmp_path), hooks=[poison])
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "4"


@dataclasses.dataclass(frozen=True)
class _AuxOptions:
  aux: float = 0.5


class _CountingFFN(nn.Module):
  """A SwiGLU FFN that sows a constant aux loss and a metric and counts its training calls."""
  cfg: object
  aux: float

  @nn.compact
  def __call__(self, x):
    calls = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
    if self.is_mutable_collection("counters") and not self.is_initializing():
      calls.value += 1
    self.sow("aux_loss", "const", jnp.asarray(self.aux))
    self.sow("metrics", "calls", calls.value.astype(jnp.float32))
    return GatedFFN(self.cfg)(x)


registry.register("ffn", "_test_counting", options=_AuxOptions)(
    lambda cfg, options, layer: _CountingFFN(cfg, options.aux, name="ffn"))


@pytest.mark.slow
def test_aux_losses_metrics_and_model_state_are_trained_and_checkpointed(tmp_path):
  config = parse_config(tiny_config_dict(model=dict(ffn="_test_counting",
                                                    ffn_options={"aux": 0.25})))
  result = train(config, str(tmp_path))
  records = [r for r in read_metrics(str(tmp_path / "metrics.jsonl"))
             if r["split"] == "train"]
  # 2 layers x 0.25 sown -> aux_loss 0.5 added to the CE.
  assert records[-1]["aux_loss"] == pytest.approx(0.5)
  batch = {"inputs": jnp.ones((2, 8), jnp.int32), "targets": jnp.ones((2, 8), jnp.int32)}
  total, (ce, aux, _, _) = result.trainer.loss(result.state.params,
                                               result.state.model_state, batch)
  assert float(aux) == pytest.approx(0.5)
  assert float(total) == pytest.approx(float(ce) + 0.5, rel=1e-6)
  counters = result.state.model_state["counters"]
  np.testing.assert_array_equal(counters["block_0"]["ffn"]["calls"], 6)
  assert records[-1]["block_0/ffn/calls"] == pytest.approx(6.0)  # sown at step 6
  # Resume continues the state from the checkpoint.
  more = parse_config(tiny_config_dict(model=dict(ffn="_test_counting",
                                                  ffn_options={"aux": 0.25}),
                                       train=dict(num_steps=8)))
  resumed = train(more, str(tmp_path))
  np.testing.assert_array_equal(
      resumed.state.model_state["counters"]["block_1"]["ffn"]["calls"], 8)


@pytest.mark.slow
def test_resume_refuses_another_model_and_logs_other_changes(tmp_path, capsys):
  train(parse_config(tiny_config_dict()), str(tmp_path))
  other = parse_config(tiny_config_dict(model=dict(num_layers=3)))
  with pytest.raises(ConfigError, match=r"different config\.model "
                                        r"\(config\.model\.num_layers=2, now 3\)"):
    train(other, str(tmp_path))
  capsys.readouterr()
  train(parse_config(tiny_config_dict(optim=dict(learning_rate=1e-3),
                                      train=dict(num_steps=7))), str(tmp_path))
  changed = [l for l in capsys.readouterr().out.splitlines() if "changed" in l]
  assert changed == ["Resuming with changed config.optim.learning_rate (0.003 -> 0.001), "
                     "config.train.num_steps (6 -> 7)"]


@pytest.mark.parametrize("section,overrides,field", [
    ("train", {"num_steps": 0}, "config.train.num_steps"),
    ("optim", {"learning_rate": -1.0}, "config.optim.learning_rate"),
    ("optim", {"lr_multipliers": {"(": 2.0}}, "config.optim.lr_multipliers"),
    ("mesh", {"data": 0}, "config.mesh.data"),
    ("model", {"kernel_impl": "cuda"}, "config.model.kernel_impl"),
    ("data", {"seq_len": 0}, "config.data.seq_len"),
])
def test_config_validation_names_field(section, overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    parse_config(tiny_config_dict(**{section: overrides}))


def test_unknown_section_is_rejected():
  with pytest.raises(ConfigError, match="config.modle"):
    parse_config({**tiny_config_dict(), "modle": {}})


@pytest.mark.slow
def test_init_from_dense_run_continues_as_qsparse(tmp_path, straight_run):
  dense_dir, dense = straight_run
  sparse_cfg = parse_config(tiny_config_dict(
      model=dict(linear="qsparse", linear_options={"topk_ratio": 0.5}),
      train=dict(num_steps=2, init_from=dense_dir)))
  seen = {}
  result = train(sparse_cfg, str(tmp_path / "sparse"),
                 hooks=[lambda step, state: seen.setdefault(step, _params(state))])
  del result
  # Step 1 started from the dense params: one Adam step away from them, not a fresh init.
  first = seen[1]
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - np.asarray(b))), first,
                       dense.state.params)
  assert max(jax.tree.leaves(moved)) < 3e-3 * 1.5
  records = read_metrics(str(tmp_path / "sparse" / "metrics.jsonl"))
  val = [r for r in records if r["split"] == "val"][-1]
  assert val["block_0/attention/q_proj/act_sparsity"] == pytest.approx(0.5, abs=1e-6)
  with pytest.raises(ValueError, match="init_from=.*holds no checkpoint"):
    train(parse_config(tiny_config_dict(train=dict(init_from=str(tmp_path / "none")))),
          str(tmp_path / "x"))
  with pytest.raises(ValueError, match="do not match"):
    train(parse_config(tiny_config_dict(model=dict(num_layers=3),
                                        train=dict(init_from=dense_dir))),
          str(tmp_path / "y"))


# ------------------------------------------------ interruption, corruption, bad settings


def _sigint_after_dispatch(monkeypatch, trainer, at, times=1):
  """Sends SIGINT `times` times right after step `at` is dispatched (its input state is
  already donated, its result not yet computed): a user's Ctrl-C mid-step."""
  step_fn, calls = trainer._train_step, []

  def step_then_sigint(state, batch):
    out = step_fn(state, batch)
    calls.append(1)
    if len(calls) == at:
      for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
    return out

  monkeypatch.setattr(trainer, "_train_step", step_then_sigint)


def test_ctrl_c_mid_step_saves_that_step_and_resumes_exactly(tmp_path, monkeypatch,
                                                               capsys, straight):
  config = parse_config(tiny_config_dict())
  handler = signal.getsignal(signal.SIGINT)    # SIG_IGN in a background job
  with monkeypatch.context() as m:
    _sigint_after_dispatch(m, trainer_for(config), at=4)
    with pytest.raises(KeyboardInterrupt):
      train(config, str(tmp_path / "resumed"))
  assert signal.getsignal(signal.SIGINT) is handler    # restored
  assert "Interrupted: saved step 4;" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints"), key=int) == ["3", "4"]
  resumed = train(config, str(tmp_path / "resumed"))
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(straight))


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path,
                                                                     monkeypatch, capsys):
  config = parse_config(tiny_config_dict())
  handler = signal.getsignal(signal.SIGINT)
  with monkeypatch.context() as m:
    _sigint_after_dispatch(m, trainer_for(config), at=5, times=2)
    with pytest.raises(KeyboardInterrupt):
      train(config, str(tmp_path))
  assert "nothing saved; the last checkpoint is step 3" in capsys.readouterr().out
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert signal.getsignal(signal.SIGINT) is handler


def _corrupt(step_dir, how):
  if how == "truncated array file":
    for name in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                          recursive=True):
      with open(name, "r+b") as f:
        f.truncate(os.path.getsize(name) // 2)
  elif how == "broken metadata":
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
      f.write("{not json")
  else:
    shutil.rmtree(os.path.join(step_dir, "state"))


@pytest.mark.slow
def test_corrupt_newest_checkpoints_are_skipped_and_set_aside(tmp_path, capsys):
  config = parse_config(tiny_config_dict(train=dict(checkpoint_every=1,
                                                    keep_checkpoints=4)))
  straight = train(config, str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  kinds = {6: "truncated array file", 5: "broken metadata", 4: "missing state/"}
  for step, how in kinds.items():
    _corrupt(str(ckpts / str(step)), how)
  capsys.readouterr()
  # Reading a run (e.g. to generate) falls back without touching anything.
  _, state, step = restore_run(str(tmp_path))
  assert step == 3 and sorted(os.listdir(ckpts), key=int) == ["3", "4", "5", "6"]
  assert capsys.readouterr().err.count("warning: skipped unreadable checkpoint") == 3
  # Resuming trains steps 4-6 again from step 3 and ends where the first run ended.
  resumed = train(config, str(tmp_path))
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(lines) == 3
  for line, (step, how) in zip(lines, kinds.items()):
    assert f"checkpoint step {step} does not restore (" in line
    assert f"moved it to {ckpts}.unreadable/{step}" in line
    assert os.path.isdir(f"{ckpts}.unreadable/{step}")   # kept, never deleted
  assert "missing" not in lines[0] and "state" in lines[2]   # the reasons differ
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(straight))
  assert sorted(os.listdir(ckpts), key=int) == ["3", "4", "5", "6"]


@pytest.mark.parametrize("log_every,error", [(100, CheckpointError),
                                             (1, FileNotFoundError)])
def test_deleted_workdir_stops_at_the_next_write(tmp_path, log_every, error):
  config = parse_config(tiny_config_dict(train=dict(
      num_steps=8, checkpoint_every=2, log_every=log_every, eval_every=0)))
  workdir, seen = str(tmp_path / "run"), []

  def delete_at_3(step, state):   # between saves: after step 2's (async) save landed
    seen.append(step)
    while step == 3 and not os.path.isdir(os.path.join(workdir, "checkpoints", "2")):
      time.sleep(0.05)
    if step == 3:
      shutil.rmtree(workdir)

  with pytest.raises(error, match=r"step 4: .*no longer exists \(was the workdir "
                                  r"deleted\?\)"):
    train(config, workdir, hooks=[delete_at_3])
  assert seen == [1, 2, 3]


def test_bad_settings_fail_before_training_naming_the_field(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ConfigError, match="--workdir=.*afile is a file"):
    train(parse_config(tiny_config_dict()), str(afile))
  with pytest.raises(ConfigError, match="--workdir=.*afile/run is not writable"):
    train(parse_config(tiny_config_dict()), str(afile / "run"))
  with pytest.raises(ConfigError, match=r"config\.data\.batch_size=6 is invalid: must "
                                        r"be divisible by the 8 data-parallel devices"):
    train(parse_config(tiny_config_dict(data=dict(batch_size=6))), str(tmp_path / "b"))
  shards = tmp_path / "shards"
  shards.mkdir()
  np.save(shards / "a.npy", np.arange(2000, dtype=np.int32) % 256)
  np.save(shards / "b.npy", np.full(2000, 300, np.int32))
  with pytest.raises(ConfigError, match=r"b\.npy'.*token id 300 at index 0 is outside "
                                        r"\[0, 256\)"):
    train(parse_config(tiny_config_dict(data=dict(path=str(shards), val_fraction=0.5))),
          str(tmp_path / "c"))
  assert not os.listdir(tmp_path / "c")   # nothing written
