"""experiments/sparse_training.py: the papers' orderings judged from the numbers, and
the --quick smoke run in-process (every variant trained on the same tokens, lottery
round, report and the RESULTS.md section, a rerun that trains nothing)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import experiment_module, run_main


@pytest.fixture(scope="module")
def repro():
  with experiment_module("sparse_training") as module:
    yield module


def _losses(**overrides):
  """Seed losses that satisfy every claim at 80%, then `overrides`."""
  base = {"dense": 2.00, "prune_80": 2.01, "ste_80": 2.05, "lottery_ticket": 2.02,
          "lottery_reinit": 2.10, "lottery_density": 0.512}
  for dist, shift in (("uniform", 0.02), ("erk", 0.0)):
    base.update({f"static_80_{dist}": 2.30 + shift, f"set_80_{dist}": 2.20 + shift,
                 f"rigl_80_{dist}": 2.10 + shift})
  base.update(overrides)
  return {k: [v, v] for k, v in base.items()}


def test_orderings_follow_the_numbers(repro):
  claims = repro.orderings(_losses(), (0.8,))
  assert len(claims) == 11 and all(ok for _, ok in claims)
  # SET worse than static at 80% ERK, a ticket no better than reinit, pruning 5% off
  bad = dict(repro.orderings(_losses(set_80_erk=2.31, lottery_ticket=2.10,
                                     prune_80=2.10), (0.8,)))
  failed = sorted(c.split(" (")[0] for c, ok in bad.items() if not ok)
  assert failed == ["80% erk: static < SET", "80% set: ERK ≥ uniform",
                    "80%: pruning ≈ dense", "density 0.512: ticket > reinit"]
  text = repro.markdown(_losses(), 2)
  assert "| rigl_80_erk | 2.1000 | 2.1000 | 2.1000 | +5.00% |" in text
  assert "lottery_density" not in text


@pytest.mark.slow   # trains 9 variants + a 1-round lottery, tiny (~30 s of CPU)
def test_quick_record(repro, tmp_path, monkeypatch, capsys):
  md = tmp_path / "RESULTS.md"
  monkeypatch.setattr(repro.results_log, "RESULTS_MD", str(md))
  # One block instead of --quick's two: every variant compiles half the model (its
  # init, train and eval programs dominate the run); nothing checked depends on depth.
  monkeypatch.setattr(repro, "QUICK", repro.sweep.deep_update(
      repro.QUICK, {"model": {"num_layers": 1}}))
  argv = ["sparse_training", "--quick", f"--workdir={tmp_path / 'run'}", "--record"]
  monkeypatch.setattr(sys, "argv", argv)   # the recorded command
  run_main(repro, argv)
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  losses = results["losses"]
  assert set(losses) == {"dense", "prune_80", "ste_80", "lottery_ticket",
                         "lottery_reinit", "lottery_density"} | {
      f"{a}_80_{d}" for a in ("static", "set", "rigl") for d in ("uniform", "erk")}
  assert losses["lottery_density"] == [pytest.approx(0.8, abs=1e-3)]
  tokens = {json.loads(p.read_text())["tokens"]
            for p in (tmp_path / "run" / "seed_0").glob("*/result.json")}
  assert tokens == {8 * 8 * 32}                      # the same tokens for every run
  assert results["base"]["model"]["num_layers"] == 1
  section = md.read_text()
  assert "## Sparse training reproduction on cpu" in section
  assert "--quick" in section and "Orderings from the papers" in section
  assert section.count("\n- held") + section.count("\n- NOT held") == 11
  # a rerun reads every finished run back
  monkeypatch.setattr(repro.sweep, "train", lambda *a, **k: pytest.fail("retrained"))
  monkeypatch.setattr(repro.lottery_cli, "train", lambda *a, **k: pytest.fail("retrained"))
  run_main(repro, ["sparse_training", "--quick", f"--workdir={tmp_path / 'run'}"])
  assert json.loads((tmp_path / "run" / "results.json").read_text())["losses"] == losses
