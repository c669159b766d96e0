"""End to end: the training CLI on the tiny config — metrics, checkpoints, report, resume."""

import json
import os
import subprocess
import sys

from conftest import REPO


def _run(workdir, *overrides):
  cmd = [sys.executable, os.path.join(REPO, "experiments", "train.py"),
         f"--config={os.path.join(REPO, 'experiments', 'configs', 'tiny.py')}",
         f"--workdir={workdir}", *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def test_cli_trains_reports_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  out = _run(workdir)
  assert "final: step 6, val loss" in out and "--- sample ---" in out
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
  assert all(r["loss"] < 6.0 for r in records)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")),
                key=int)[-2:] == ["3", "6"]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| 6 |" in report and "## Sample" in report
  with open(os.path.join(workdir, "loss_curve.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Same command with more steps resumes from step 6 instead of starting over.
  out = _run(workdir, "--config.train.num_steps=8", "--config.train.eval_every=4")
  assert "Resumed from" in out and "final: step 8" in out
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir,
                                                                  "metrics.jsonl"))]
  assert steps == sorted(steps) and steps[-1] == 8


def test_cli_rejects_bad_config_with_field_name(tmp_path):
  cmd = [sys.executable, os.path.join(REPO, "experiments", "train.py"),
         f"--config={os.path.join(REPO, 'experiments', 'configs', 'tiny.py')}",
         f"--workdir={tmp_path}", "--config.model.num_heads=3"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "config.model.num_heads=3 is invalid" in proc.stderr
