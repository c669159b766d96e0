"""config.sparsity in the trainer: off by default, masks checkpointed (exact resume),
masked forward, sparsity metrics and report, shardings, and the five sparse configs."""

from __future__ import annotations

import os
import runpy

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config_dict
from sparsejax.models import accounting
from sparsejax.sparsity.param_filter import named_leaves
from sparsejax.sparsity.sparsifier import SparsifierState
from sparsejax.train.config import Config, config_to_dict, parse_config
from sparsejax.train.metrics import read_metrics
from sparsejax.train.report import write_report
from sparsejax.train.trainer import Trainer, inference_params, train
from sparsejax.validation import ConfigError

RIGL = dict(algorithm="rigl", sparsity=0.8, distribution="erk", update_every=1,
            end_step=6)


def _ctrl_c_after_step_4(step, state):
  del state
  if step == 4:
    raise KeyboardInterrupt


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def test_sparsity_is_off_by_default():
  assert not Config().sparsity.enabled
  config = parse_config(tiny_config_dict())
  assert config.sparsity == Config().sparsity
  trainer = Trainer(config)
  assert trainer.sparsifier is None
  assert not isinstance(trainer.abstract_state.opt_state, SparsifierState)


@pytest.fixture(scope="module")
def rigl_runs(tmp_path_factory):
  """The tiny config with RIGL: 6 steps straight (`root/straight`), and 4 steps,
  Ctrl-C, resumed to 6 (`root/resumed`); one set of compiled programs for both tests
  that read them."""
  root = tmp_path_factory.mktemp("rigl")
  config = parse_config(tiny_config_dict(sparsity=RIGL))
  straight = train(config, str(root / "straight"))
  with pytest.raises(KeyboardInterrupt):
    train(config, str(root / "resumed"), hooks=[_ctrl_c_after_step_4])
  resumed = train(config, str(root / "resumed"))
  return config, root, straight, resumed


@pytest.mark.slow   # trains (about 30-70 s on a 2-core CPU)
def test_rigl_run_resumes_bitwise_and_logs_sparsity(rigl_runs):
  """train 6 steps straight == train 4, stop, resume to 6: bitwise equal params and
  masks; masks change every step and pruned weights stay 0."""
  config, root, straight, resumed = rigl_runs
  sp = straight.trainer.sparsifier
  masks, params = _host(sp.masks(straight.state.opt_state)), _host(straight.state.params)
  got_masks = _host(sp.masks(resumed.state.opt_state))
  assert masks.keys() == got_masks.keys() and len(masks) == 2 * 7   # 2 layers x 7 kernels
  for name in masks:
    np.testing.assert_array_equal(got_masks[name], masks[name])
  jax.tree.map(np.testing.assert_array_equal, _host(resumed.state.params), params)
  flat = dict(named_leaves(params))
  for name, m in masks.items():   # (weights grown at the last update are still 0)
    assert np.all(flat[name][~m] == 0) and np.mean(flat[name][m] != 0) > 0.9
  assert "embedding" not in masks and not any("norm" in n for n in masks)

  records = [r for r in read_metrics(str(root / "resumed" / "metrics.jsonl"))
             if r["split"] == "train"]
  assert [r["step"] for r in records] == [2, 4, 6]
  for r in records:
    assert r["sparsity/density"] == pytest.approx(0.2, abs=2e-3)
    assert {f"sparsity/density/{n}" for n in masks} <= r.keys()
  # last record = final state: savings from the masks (dense model: no routed tensors)
  pruned = sum(int((~m).sum()) for m in masks.values())
  total = sum(x.size for x in jax.tree.leaves(params))
  flops = accounting.flops_per_token(config.model, config.data.seq_len)
  assert records[-1]["sparsity/pruned"] == pruned
  assert records[-1]["sparsity/param_saving"] == pytest.approx(pruned / total, rel=1e-6)
  assert records[-1]["sparsity/flops_saving"] == pytest.approx(2 * pruned / flops,
                                                               rel=1e-6)
  assert records[0]["sparsity/mask_changes"] > 0
  report = write_report(str(root / "resumed"), config=config_to_dict(config),
                        metrics=resumed.metrics, num_params=1, sample_prompt="def ",
                        sample="")
  text = open(report).read()
  assert "## Sparsity" in text and "overall density 0.2" in text
  assert "| `block_0/ffn/up_proj/kernel` |" in text


def _config_file(name: str) -> tuple[dict, Config]:
  """(the namespace of experiments/configs/<name>.py, its config at the tiny model's
  size and data, 2 steps, 1 eval batch); its sparsity section is what is tested."""
  module = runpy.run_path(os.path.join(REPO, "experiments", "configs", f"{name}.py"))
  config = module["get_config"]()
  config.train.update(num_steps=2, eval_batches=1, eval_every=0, checkpoint_every=0,
                      sample_tokens=0)
  config.data.update(batch_size=8, seq_len=32)
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)
  return module, parse_config(config)


@pytest.mark.slow   # trains (about 30-70 s on a 2-core CPU)
def test_ste_forward_uses_the_masked_weights(tmp_path):
  """STE 2:4 (the nm_2_4 config, as test_sparse_config_trains_two_steps trains it: the
  same compiled programs): dense weights, masked forward, sample and eval."""
  _, config = _config_file("nm_2_4")
  sparsity = config.sparsity
  assert (sparsity.algorithm, sparsity.granularity, sparsity.n, sparsity.m,
          sparsity.sparsity) == ("ste", "nm", 2, 4, 0.5)
  result = train(config, str(tmp_path))
  trainer, state = result.trainer, result.state
  masks = _host(trainer.sparsifier.masks(state.opt_state))
  dense = dict(named_leaves(_host(state.params)))
  forward = dict(named_leaves(_host(trainer.forward_params(state))))
  deployed = dict(named_leaves(_host(inference_params(config, state))))
  for name, m in masks.items():
    assert np.all(dense[name] != 0)                     # STE keeps dense weights
    np.testing.assert_array_equal(forward[name], np.where(m, dense[name], 0))
    np.testing.assert_array_equal(deployed[name], forward[name])  # sample / export
    assert m.mean() == 0.5
  batch = trainer.global_batch({"inputs": np.ones((8, 32), np.int32),
                                "targets": np.ones((8, 32), np.int32)})
  with trainer.activate():
    got = trainer._eval_step(state, batch)["loss"]
  loss, _ = trainer.loss(trainer.forward_params(state), state.model_state, batch)
  assert float(got) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize("sparsity,selects", [
    (RIGL, 0), (dict(algorithm="static", sparsity=0.5), 0),
    (dict(algorithm="ste", granularity="nm", n=2, m=4, sparsity=0.5), 2 * 7)])
def test_forward_masks_only_ste_weights(sparsity, selects):
  """The train and eval steps' forward runs on state.params as they are for algorithms
  that hold exact zeros at pruned entries (no per-step w ⊙ m); STE masks its dense
  weights, one select per masked tensor (2 layers x 7 kernels)."""
  trainer = Trainer(parse_config(tiny_config_dict(sparsity=sparsity)))
  state = trainer.abstract_state
  jaxpr = jax.make_jaxpr(trainer.forward_params)(state).jaxpr
  assert _count(jaxpr, "select_n") == selects
  if not selects:
    assert trainer.forward_params(state) is state.params and not jaxpr.eqns


def _count(jaxpr, primitive: str) -> int:
  """Equations of `primitive` in a jaxpr and the jaxprs nested in it (jnp.where is a
  nested jit)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == primitive
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        n += _count(inner, primitive) if hasattr(inner, "eqns") else 0
  return n


MOE = dict(ffn="moe", ffn_options=dict(num_experts=4, top_k=2))


@pytest.mark.parametrize("model,mesh,sharded", [
    ({}, dict(data=2, fsdp=2, tensor=2), "block_0/ffn/up_proj/kernel"),
    pytest.param(MOE, dict(data=2, fsdp=1, tensor=2, expert=2), "block_0/ffn/w_up",
                 marks=pytest.mark.slow)])
def test_masks_are_sharded_like_their_params(model, mesh, sharded):
  config = parse_config(tiny_config_dict(sparsity=RIGL, model=model, mesh=mesh))
  trainer = Trainer(config)
  state = trainer.init_state()
  params = dict(named_leaves(state.params))
  masks = trainer.sparsifier.masks(state.opt_state)
  assert sharded in masks and not masks[sharded].sharding.is_fully_replicated
  for name, m in masks.items():
    assert m.sharding.is_equivalent_to(params[name].sharding, m.ndim)
    assert np.all(np.asarray(params[name])[~np.asarray(m)] == 0)


@pytest.mark.slow   # trains (about 30-70 s on a 2-core CPU)
def test_resume_refuses_another_sparsity_config(rigl_runs):
  """Resuming the finished RIGL run (sparsity 0.8) at sparsity 0.5 fails naming the
  field, before anything is written."""
  workdir = rigl_runs[1] / "straight"
  before = sorted(os.listdir(workdir / "checkpoints"))
  other = parse_config(tiny_config_dict(sparsity={**RIGL, "sparsity": 0.5}, train=dict(
      num_steps=2, eval_every=0, checkpoint_every=0)))
  with pytest.raises(ConfigError, match=r"config\.sparsity\.sparsity=0\.8, now 0\.5"):
    train(other, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before


@pytest.mark.parametrize("overrides,field", [
    (dict(algorithm="lottery"), "config.sparsity.algorithm"),
    (dict(algorithm="rigl", sparsity=1.0), "config.sparsity.sparsity"),
    (dict(algorithm="magnitude", sparsity=0.5, granularity="nm", n=6, m=4),
     "config.sparsity.n"),
    (dict(algorithm="magnitude", sparsity=0.5, distribution="erdos"),
     "config.sparsity.distribution"),
    (dict(algorithm="magnitude", sparsity=0.5, include=["nonexistent"]),
     "config.sparsity.include[0]"),
    (dict(algorithm="magnitude", sparsity=0.5, granularity="block", block=[3, 3]),
     "config.sparsity.block"),
])
def test_bad_sparsity_config_names_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
    Trainer(parse_config(tiny_config_dict(sparsity=overrides)))


def test_gradient_scored_sparsity_with_gradient_compression_is_refused():
  config = parse_config(tiny_config_dict(
      sparsity=RIGL, train=dict(grad_compression=dict(method="topk_ef"))))
  with pytest.raises(ConfigError,
                     match=r"config\.sparsity\.algorithm='rigl'.*grad_compression"):
    Trainer(config)


@pytest.mark.slow   # trains (about 40 s on a 2-core CPU)
def test_static_sparsity_trains_with_gradient_compression(tmp_path):
  config = parse_config(tiny_config_dict(
      sparsity=dict(algorithm="static", sparsity=0.8),
      train=dict(num_steps=2, eval_every=0, checkpoint_every=0,
                 grad_compression=dict(method="topk_ef"))))
  result = train(config, str(tmp_path))
  params = dict(named_leaves(_host(result.state.params)))
  for name, m in _host(result.trainer.sparsifier.masks(result.state.opt_state)).items():
    assert m.mean() == pytest.approx(0.2, abs=0.01)
    assert np.all(params[name][~m] == 0)
  record = [r for r in read_metrics(str(tmp_path / "metrics.jsonl"))
            if r["split"] == "train"][-1]
  assert record["sparsity/density"] == pytest.approx(0.2, abs=2e-3)


CONFIGS = ["prune_gradual", "rigl", "set", "static_sparse", "nm_2_4"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_sparse_config_trains_two_steps(name, tmp_path):
  module, config = _config_file(name)
  assert f"--config=experiments/configs/{name}.py" in module["__doc__"]
  assert config.sparsity.enabled
  result = train(config, str(tmp_path))
  assert result.metrics["step"] == 2 and np.isfinite(result.metrics["loss"])
  record = [r for r in read_metrics(str(tmp_path / "metrics.jsonl"))
            if r["split"] == "train"][-1]
  want = {"nm_2_4": 0.5, "prune_gradual": 1.0}.get(name, 0.2)   # pruning starts at 30
  assert record["sparsity/density"] == pytest.approx(want, abs=2e-3)
