"""The compressed data-parallel train step on 8 fake devices: ratio 1 equals the plain
step, bytes logged from the arrays sent, exact resume of the per-device state, errors."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import experiment_module, run_main, tiny_config_dict
from sparsejax.sparsity import gradient
from sparsejax.train import compressed_step
from sparsejax.train import data as data_lib
from sparsejax.train.config import parse_config
from sparsejax.train.metrics import read_metrics
from sparsejax.train.trainer import Trainer, train
from sparsejax.validation import ConfigError


def _run(config, steps):
  trainer = Trainer(config)
  state = trainer.init_state()
  it = iter(data_lib.make_dataset(config.data, "train", vocab_size=config.model.vocab_size))
  for _ in range(steps):
    state, metrics = trainer.train_step(state, trainer.global_batch(next(it)))
  return state, jax.device_get(metrics)


WIRE = dict(value_dtype="bfloat16", index_dtype="uint16")


@pytest.mark.slow
@pytest.mark.parametrize("wire", [{}, WIRE])
def test_ratio_one_gives_the_plain_step_params(wire):
  plain, plain_metrics = _run(parse_config(tiny_config_dict()), 3)
  config = parse_config(tiny_config_dict(
      train=dict(grad_compression=dict(method="topk_ef", ratio=1.0, **wire))))
  dense, metrics = _run(config, 3)
  chex.assert_trees_all_close(jax.device_get(dense.params), jax.device_get(plain.params),
                              rtol=2e-5, atol=2e-6)
  assert metrics["loss"] == pytest.approx(float(plain_metrics["loss"]), rel=1e-5)
  assert metrics["comm_bytes"] == metrics["dense_bytes"]
  # Nothing is left behind: every residual is zero.
  assert all(np.all(np.asarray(r) == 0) for r in jax.tree.leaves(dense.grad_comm))


def _expected_bytes(params, ratio, entry_bytes=8):
  """(bytes one device sends, dense bytes); the tiny model's matrices are below 2^16
  entries, so uint16 indices use one chunk per tensor."""
  sent = 0
  for p in jax.tree.leaves(params):
    assert p.size < 1 << 16
    k = gradient.num_kept(ratio, p.size)
    sent += k * entry_bytes if p.ndim >= 2 and k < p.size else p.size * 4
  return sent, sum(p.size * 4 for p in jax.tree.leaves(params))


@pytest.mark.slow
def test_train_logs_bytes_and_resumes_dgc_state_exactly(tmp_path):
  """DGC with bfloat16 values + uint16 indices (4 bytes per sent entry), two warm-up
  stages of two steps each (DGC's first two ratios), stopped inside the second."""
  config = parse_config(tiny_config_dict(
      optim=dict(b1=0.0),
      train=dict(grad_compression=dict(method="dgc", ratio=0.01, warmup_steps=4,
                                       warmup_ratios=(0.25, 0.0625), **WIRE))))
  straight = train(config, str(tmp_path / "straight"))
  def stop_at_3(step, state):
    if step == 3:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    train(config, str(tmp_path / "resumed"), hooks=[stop_at_3])
  resumed = train(config, str(tmp_path / "resumed"))
  chex.assert_trees_all_close(jax.device_get(resumed.state.params),
                              jax.device_get(straight.state.params), rtol=0, atol=0)
  chex.assert_trees_all_close(jax.device_get(resumed.state.grad_comm),
                              jax.device_get(straight.state.grad_comm), rtol=0, atol=0)
  # The per-device state differs between devices (each compressed its own gradient).
  velocity = np.asarray(jax.tree.leaves(resumed.state.grad_comm["velocity"])[0])
  assert velocity.shape[0] == 8 and not np.allclose(velocity[0], velocity[1])

  records = [r for r in read_metrics(str(tmp_path / "straight" / "metrics.jsonl"))
             if r["split"] == "train"]
  sent, dense = _expected_bytes(straight.state.params, 0.01, entry_bytes=4)
  last = records[-1]
  assert last["step"] == 6 and last["grad_ratio"] == pytest.approx(0.01)
  assert last["comm_bytes"] == sent and last["dense_bytes"] == dense
  assert last["compression"] == pytest.approx(dense / sent, rel=1e-6)
  for warm, ratio in zip(records, (0.25, 0.0625)):   # steps 2 and 4: one per stage
    assert warm["grad_ratio"] == pytest.approx(ratio)
    assert warm["comm_bytes"] == _expected_bytes(straight.state.params, ratio, 4)[0]


@pytest.mark.parametrize("overrides,match", [
    (dict(mesh=dict(data=2, fsdp=4)), r"grad_compression\.method='topk_ef' supports only "
     r"a pure data-parallel mesh"),
    (dict(optim=dict(b1=0.9), train=dict(grad_compression=dict(method="dgc"))),
     r"config\.optim\.b1=0\.9 is invalid: must be 0 with "
     r"config\.train\.grad_compression\.method='dgc'"),
])
def test_unsupported_settings_raise(overrides, match):
  sections = {"train": dict(grad_compression=dict(method="topk_ef")), **overrides}
  with pytest.raises(ConfigError, match=match):
    Trainer(parse_config(tiny_config_dict(**sections)))


def test_ratio_out_of_range_names_the_field():
  with pytest.raises(ConfigError, match=r"config\.train\.grad_compression\.ratio=0\.0 "
                     r"is invalid: must be in \(0, 1\]"):
    parse_config(tiny_config_dict(train=dict(grad_compression=dict(method="topk_ef",
                                                                    ratio=0.0))))


# The experiment's variants at the tiny config's sizes (the byte counts and the report
# are computed from whatever model it trains).
TINY = {"model": {"d_model": 32}, "data": {"seq_len": 32, "batch_size": 8},
        "train": {"eval_batches": 1}}


@pytest.mark.slow
def test_experiment_reports_bytes_and_verdict(tmp_path, monkeypatch):
  with experiment_module("grad_compression") as module:
    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(module.results_log, "RESULTS_MD", str(md))
    workdir = tmp_path / "gc"
    run_main(module, ["grad_compression", f"--workdir={workdir}", "--steps=3",
                      "--variants=dense,topk_ef_999", f"--overrides={json.dumps(TINY)}",
                      "--record"])
  rows = json.loads((workdir / "results.json").read_text())["variants"]
  assert [r["name"] for r in rows] == ["dense", "topk_ef_999"]
  dense, sparse = rows
  params = Trainer(parse_config(module.variant_config("dense", 3, TINY))
                   ).abstract_state.params
  sent, dense_bytes = _expected_bytes(params, 0.001, entry_bytes=4)   # bf16 + uint16
  assert dense["sent_bytes"] == dense["dense_bytes"] == dense_bytes
  assert sparse["sent_bytes"] == sent and sparse["ratio"] == pytest.approx(dense_bytes / sent)
  report = (workdir / "report.md").read_text()
  assert "| topk_ef_999 |" in report and f"{dense_bytes / sent:.1f}×" in report
  assert "target not met" in report or "target met" in report
  assert (workdir / "val_curves.png").stat().st_size > 0
  assert (workdir / "train_curves.png").stat().st_size > 0
  assert "grad_compression.py" in md.read_text()
  assert "d_model 32, 2 blocks, seq_len 32, global batch 8" in report


def test_dgc_moves_the_clipping_to_the_devices():
  def optim(method, b1):
    config = parse_config(tiny_config_dict(
        optim=dict(b1=b1, grad_clip_norm=0.5),
        train=dict(grad_compression=dict(method=method))))
    return compressed_step.optimizer_config(config)
  assert optim("dgc", 0.0).grad_clip_norm == 0.0
  assert optim("topk_ef", 0.9).grad_clip_norm == 0.5
  assert optim("none", 0.9).grad_clip_norm == 0.5


@pytest.mark.slow
def test_compressed_step_compiles_for_tpu():
  """The whole compressed step (shard_map, top_k, all_gather, scatter-add, the warm-up
  switch) compiled by XLA:TPU for an 8-chip v5e slice (libtpu AOT): DGC (top-k EF is
  its subset) with bfloat16 values and uint16 chunk indices. One warm-up stage: each
  stage is a switch branch with its own top-k of every tensor (XLA:TPU: ~2 s a branch;
  17 s with the default four stages, 12 s with one)."""
  from tpu_aot import compile_for_tpu, tpu_mesh   # pylint: disable=g-import-not-at-top
  mesh_axes = {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
  config = parse_config(tiny_config_dict(
      optim=dict(b1=0.0), mesh=mesh_axes,
      train=dict(grad_compression=dict(method="dgc", ratio=0.01, warmup_steps=4,
                                       warmup_ratios=(0.25,), value_dtype="bfloat16",
                                       index_dtype="uint16"))))
  trainer = Trainer(config, mesh=tpu_mesh("v5e:2x4", mesh_axes))
  tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)
  with trainer.activate():
    compiled = compile_for_tpu(trainer._train_step, trainer.abstract_state,
                               {"inputs": tokens, "targets": tokens}, mesh=trainer.mesh)
  assert "all-gather" in compiled.hlo and "conditional" in compiled.hlo


def test_verdict_against_dense_and_the_counterpart():
  """The table and verdict compare each variant with dense and with its same-optimizer
  counterpart (dgc_* → dgc_dense, topk_ef_* → dense, sgd_dgc_* → sgd_dense)."""
  with experiment_module("grad_compression") as module:
    row = lambda name, loss, ratio: dict(name=name, val_loss=loss, ratio=ratio,
                                         sent_bytes=1.0, run_ratio=ratio,
                                         tokens_per_s=1.0, wall_s=1.0)
    rows = [row("dense", 2.0, 1.0), row("dgc_dense", 2.1, 1.0), row("dgc_993", 2.115, 101.0),
            row("topk_ef_99", 2.01, 50.0), row("sgd_dense", 2.4, 1.0),
            row("sgd_dgc_993", 2.41, 101.0)]
    assert module.gaps(rows[2], rows) == pytest.approx({"dense": 0.0575,
                                                       "dgc_dense": 0.015 / 2.1})
    assert module.gaps(rows[3], rows) == pytest.approx({"dense": 0.005})
    text = module.verdict(rows)
    assert ("dgc_993: 101× fewer bytes, val loss +5.75% vs dense — target not met (loss "
            "gap > 1%); +0.71% vs dgc_dense — target met.") in text
    assert ("topk_ef_99: 50× fewer bytes, val loss +0.50% vs dense — target not met "
            "(bytes ratio < 100×).") in text
    assert module.gaps(rows[5], rows) == pytest.approx({"dense": 0.205,
                                                       "sgd_dense": 0.01 / 2.4})
    assert "sgd_dense:" not in text and "dgc_dense:" not in text
    assert "+0.42% vs sgd_dense — target met." in text
    assert "| dgc_993 | 2.1150 | +5.75% | +0.71% (dgc_dense) |" in module.markdown_table(rows)
