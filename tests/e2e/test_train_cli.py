"""End to end: the training CLI on the tiny config — metrics, checkpoints, report,
resume, Ctrl-C, and one `error:` line (no traceback) for each known mistake."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")


def _cmd(workdir, *args):
  return [sys.executable, os.path.join(REPO, "experiments", "train.py"),
          f"--config={TINY}", f"--workdir={workdir}", *args]


def _env(**extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def _run(workdir, *overrides):
  proc = subprocess.run(_cmd(workdir, *overrides), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def _fails_with_one_line(cmd, env=None):
  """The stderr `error:` line of a CLI run that must fail cleanly."""
  proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True,
                        timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(workdir, output) of the CLI training the tiny config (6 steps, with a sample);
  tests that change the run work on a copy."""
  workdir = str(tmp_path_factory.mktemp("tiny") / "run")
  return workdir, _run(workdir)


@pytest.mark.slow
def test_cli_trains_reports_and_resumes(tiny_run, tmp_path):
  workdir, out = tiny_run
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
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)
  out = _run(workdir, "--config.train.num_steps=8", "--config.train.eval_every=4")
  assert "Resumed from" in out and "final: step 8" in out
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir,
                                                                  "metrics.jsonl"))]
  assert steps == sorted(steps) and steps[-1] == 8


def _mistakes(tmp_path):
  """(args, env, expected text of the error line) per known mistake."""
  afile = tmp_path / "afile"
  afile.write_text("x")
  (tmp_path / "empty").mkdir()
  np.save(tmp_path / "ids.npy", np.r_[np.arange(3000) % 256, 256].astype(np.int32))
  run = tmp_path / "run"
  return {
      "bad value": ([f"--workdir={run}", "--config.model.num_heads=3"], {},
                    "config.model.num_heads=3 is invalid"),
      "config file missing": ([f"--workdir={run}", "--config=nope/tiny.py"], {},
                              "--config=nope/tiny.py: cannot load it ([Errno 2]"),
      "unknown field": ([f"--workdir={run}", "--config.model.num_layrs=3"], {},
                        "config.model.num_layrs (did you mean config.model.num_layers?)"),
      "unknown parent field": (
          [f"--workdir={run}", "--config.model.atention_options.pattern=local"], {},
          "unknown config field 'atention_options' Did you mean \"attention_options\""),
      "bad flag value": ([f"--workdir={run}", "--config.train.num_steps=abc"], {},
                         "--config.train.num_steps=abc"),
      "data path missing": ([f"--workdir={run}", f"--config.data.path={tmp_path}/no"],
                            {}, f"config.data.path='{tmp_path}/no': path does not exist"),
      "data path empty": ([f"--workdir={run}", f"--config.data.path={tmp_path}/empty"],
                          {}, "no usable files"),
      "token id out of range": (
          [f"--workdir={run}", f"--config.data.path={tmp_path}/ids.npy"], {},
          "ids.npy': token id 256 at index 3000 is outside [0, 256)"),
      "mesh size": ([f"--workdir={run}", "--config.mesh.data=2"], {},
                    "multiply to 2, but there are 1 devices"),
      "batch not divisible": ([f"--workdir={run}"], {"JAX_NUM_CPU_DEVICES": "3"},
                              "config.data.batch_size=8 is invalid: must be divisible "
                              "by the 3 data-parallel devices"),
      "workdir is a file": ([f"--workdir={afile}"], {}, f"--workdir={afile} is a file"),
  }


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [
    "bad value", "config file missing", "unknown field", "unknown parent field",
    "bad flag value",
    "data path missing", "data path empty", "token id out of range", "mesh size",
    "batch not divisible", "workdir is a file"])
def test_cli_prints_one_error_line_per_known_mistake(tmp_path, mistake):
  args, env, expected = _mistakes(tmp_path)[mistake]
  cmd = [sys.executable, os.path.join(REPO, "experiments", "train.py"),
         f"--config={TINY}", *args]
  line = _fails_with_one_line(cmd, _env(**env))
  assert expected in line, line
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_cli_refuses_to_resume_another_model(tiny_run):
  workdir = tiny_run[0]
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  line = _fails_with_one_line(_cmd(workdir, "--config.model.num_layers=3"))
  assert ("different config.model (config.model.num_layers=2, now 3); resume it with "
          "its own config or use a new --workdir") in line
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.slow
def test_cli_help_lists_the_config_sections_and_overrides():
  out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "train.py"),
                        "--help"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300).stdout
  assert "--config.<section>.<field>=value" in out and "--[no]debug" in out
  for section in ("model: vocab_size, d_model", "data: path, seq_len", "optim:",
                  "train: num_steps", "mesh: data, fsdp, tensor, expert"):
    assert section in out


@pytest.mark.slow
def test_cli_ctrl_c_saves_the_current_step_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      _cmd(workdir, "--config.train.num_steps=1000", "--config.train.log_every=1",
           "--config.train.eval_every=0", "--config.train.checkpoint_every=0"),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
  while time.time() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "error:" not in err, err[-3000:]
  saved = [l for l in out.splitlines() if l.startswith("Interrupted: saved step")]
  assert len(saved) == 1, out[-2000:]
  step = int(saved[0].split()[3].rstrip(";"))
  assert step >= 2 and os.listdir(workdir / "checkpoints") == [str(step)]
  out = _run(workdir, f"--config.train.num_steps={step + 1}",
             "--config.train.sample_tokens=0")
  assert f"Resumed from {workdir}/checkpoints/{step}" in out
  assert f"config.train.num_steps (1000 -> {step + 1})" in out
  assert f"final: step {step + 1}," in out
