"""experiments/lottery.py in-process on the tiny config: round densities 0.8^r (exact
counts), global-magnitude masks of the trained weights, tickets trained under their
masks from the rewound state, the reinit control, per-round resume (a finished round
is never recomputed; Ctrl-C inside a round resumes it bitwise), one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO, experiment_module, run_main, tiny_config_dict
from sparsejax.sparsity import lottery
from sparsejax.sparsity.param_filter import named_leaves
from sparsejax.train.trainer import restore_run
from sparsejax.validation import ConfigError

TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")
CONFIG = tiny_config_dict(train=dict(num_steps=4, eval_every=0, checkpoint_every=2,
                                     log_every=2, sample_tokens=0))


@pytest.fixture(scope="module")
def cli():
  from absl import flags
  with experiment_module("lottery") as module:
    before = set(flags.FLAGS)
    module.define_flags()
    try:
      yield module
    finally:   # defined from this test module: experiment_module would keep them
      for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)


def _run(cli, workdir, **setup):
  cli.Lottery(CONFIG, str(workdir), cli.LotterySetup(**setup)).run()
  with open(os.path.join(workdir, "lottery.json")) as f:
    return json.load(f)["rounds"]


def _final(workdir):
  _, state, step = restore_run(str(workdir))
  return state, step


def _host(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def one_round(cli, tmp_path_factory):
  """(workdir, rounds) of a finished one-round experiment rewound to step 1: dense +
  ticket + reinit tiny runs, shared by the tests that read it (~10 s of CPU)."""
  workdir = tmp_path_factory.mktemp("one_round")
  return workdir, _run(cli, workdir, rounds=1, rewind_step=1)


@pytest.mark.slow
def test_rounds_masks_tickets_and_no_recompute(cli, one_round, monkeypatch):
  tmp_path, rows = one_round
  total = rows[0]["total"]
  assert [r["kept"] for r in rows] == lottery.round_counts(total, 1)
  assert rows[1]["density"] == pytest.approx(0.8, abs=1 / total)
  assert np.isfinite(rows[1]["ticket_val_loss"]) and np.isfinite(rows[1]["reinit_val_loss"])

  # masks_1 keeps the largest |w| of the trained dense weights, one global threshold
  dense_state, _ = _final(tmp_path / "dense")
  dense = dict(named_leaves(_host(dense_state.params)))
  with np.load(tmp_path / "masks_1.npz") as f:
    masks = {n: f[n] for n in f.files}
  kept = np.concatenate([np.abs(dense[n][m]) for n, m in masks.items()])
  pruned = np.concatenate([np.abs(dense[n][~m]) for n, m in masks.items()])
  assert kept.size == rows[1]["kept"] and kept.size + pruned.size == total
  assert kept.min() >= pruned.max()
  assert "embedding/embedding" not in masks and not any("norm" in n for n in masks)

  # ticket and reinit trained (steps 1..4) under exactly these masks, from different
  # starting values; the rewound start is the dense run's step-1 state
  finals = {}
  for run in ("ticket", "reinit"):
    state, step = _final(tmp_path / "round_1" / run)
    assert step == 4
    params = dict(named_leaves(_host(state.params)))
    got = {n: np.asarray(m) for n, m in state.opt_state.masks.items()}
    for n, m in masks.items():
      np.testing.assert_array_equal(got[n], m)
      assert np.all(params[n][~m] == 0) and np.mean(params[n][m] != 0) > 0.99
    finals[run] = params
  name = next(iter(masks))
  assert not np.allclose(finals["ticket"][name], finals["reinit"][name])
  metrics = [json.loads(line) for line in
             open(tmp_path / "round_1" / "ticket" / "metrics.jsonl")]
  assert [r["step"] for r in metrics if r["split"] == "train"] == [2, 4]

  # rerun: every finished round is read back, nothing trains
  monkeypatch.setattr(cli, "train", lambda *a, **k: pytest.fail("retrained"))
  assert _run(cli, tmp_path, rounds=1, rewind_step=1) == rows


def test_bad_flags_name_the_flag(cli, tmp_path):
  with pytest.raises(ConfigError, match="--rewind_step=6 is invalid"):
    cli.Lottery(tiny_config_dict(), str(tmp_path), cli.LotterySetup(rewind_step=6))
  with pytest.raises(ConfigError, match="--prune_fraction=1.0 is invalid"):
    cli.Lottery(tiny_config_dict(), str(tmp_path), cli.LotterySetup(prune_fraction=1.0))
  with pytest.raises(ConfigError, match="--rounds=-1 is invalid"):
    run_main(cli, ["lottery", f"--config={TINY}", f"--workdir={tmp_path}", "--rounds=-1"])


@pytest.mark.slow   # trains round 1 again: an interrupted ticket, the ticket, the reinit
def test_ctrl_c_inside_a_round_resumes_it_bitwise(cli, one_round, tmp_path, monkeypatch):
  straight_dir, straight = one_round
  # The resumed experiment starts with straight's finished round 0 (read back, not
  # retrained): the interruption under test is inside round 1.
  for name in ("dense", "rewind"):
    shutil.copytree(straight_dir / name, tmp_path / "resumed" / name)
  real_train, calls = cli.train, []

  def interrupted(config, workdir, hooks=()):
    def ctrl_c(step, state):
      del state
      if step == 3 and workdir.endswith("round_1/ticket") and not calls:
        calls.append(step)
        raise KeyboardInterrupt
    return real_train(config, workdir, hooks=[*hooks, ctrl_c])

  monkeypatch.setattr(cli, "train", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _run(cli, tmp_path / "resumed", rounds=1, rewind_step=1)
  assert calls == [3]
  resumed = _run(cli, tmp_path / "resumed", rounds=1, rewind_step=1)
  assert resumed == straight
  a, _ = _final(straight_dir / "round_1" / "ticket")
  b, _ = _final(tmp_path / "resumed" / "round_1" / "ticket")
  jax.tree.map(np.testing.assert_array_equal, _host(a.params), _host(b.params))
