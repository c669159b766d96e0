"""experiments/sae.py and sparsejax.sae.run: training on a tiny trained model, metrics,
exact resume, Ctrl-C, and one-line errors naming the field."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config_dict
from sparsejax.sae.config import parse_run_config
from sparsejax.sae.run import train_sae
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import train
from sparsejax.validation import ConfigError

pytestmark = pytest.mark.slow   # trains a tiny model first (~30 s on a busy 2-core CPU)


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm"))
  # The tiny config's own 6 steps: the same programs as the suite's other tiny runs.
  train(parse_config(tiny_config_dict(train=dict(eval_every=0, checkpoint_every=0))),
        workdir)
  return workdir


def _config(lm_workdir, **sections):
  config = {"source": dict(workdir=lm_workdir, site="resid_1", batch_size=4, seq_len=16),
            "sae": dict(num_latents=64, k=4, k_aux=8, dead_tokens=64, impl="xla"),
            "optim": dict(learning_rate=1e-2, warmup_steps=0),
            "train": dict(num_steps=4, init_batches=2, log_every=1, eval_every=2,
                          eval_batches=1, checkpoint_every=2),
            "mesh": dict(data=2, tensor=4)}
  for name, overrides in sections.items():
    config[name] = {**config[name], **overrides}
  return parse_run_config(config)


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_trains_logs_metrics_and_resumes_exactly(lm_workdir, tmp_path):
  full = train_sae(_config(lm_workdir), str(tmp_path / "full"))
  train_rows, val_rows = _records(tmp_path / "full", "train"), _records(tmp_path / "full",
                                                                        "val")
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  assert {"nmse", "l0", "dead_fraction", "aux_loss", "loss"} <= set(train_rows[0])
  assert all(r["l0"] <= 4 for r in train_rows)
  val = val_rows[-1]
  assert {"ce_clean", "ce_sae", "ce_zero", "delta_ce", "delta_ce_zero",
          "ce_recovered"} <= set(val)
  np.testing.assert_allclose(val["delta_ce"], val["ce_sae"] - val["ce_clean"], rtol=1e-6)
  assert full.metrics["step"] == 4
  # 2 steps, then rerun to 4: the same params as the uninterrupted run
  train_sae(_config(lm_workdir, train=dict(num_steps=2)), str(tmp_path / "split"))
  resumed = train_sae(_config(lm_workdir), str(tmp_path / "split"))
  for name, want in jax.device_get(full.state.params).items():
    np.testing.assert_array_equal(jax.device_get(resumed.state.params[name]), want)
  np.testing.assert_array_equal(
      jax.device_get(resumed.state.model_state["sae"]["tokens_since_fired"]),
      jax.device_get(full.state.model_state["sae"]["tokens_since_fired"]))
  with pytest.raises(ConfigError, match=r"config\.sae\.k=4, now 8"):
    train_sae(_config(lm_workdir, sae=dict(k=8)), str(tmp_path / "split"))


def test_bad_source_fails_naming_the_field(lm_workdir, tmp_path):
  with pytest.raises(ConfigError, match=r"config\.source\.site='ffn_in_9'.*resid_0"):
    train_sae(_config(lm_workdir, source=dict(site="ffn_in_9")), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match=r"config\.source\.workdir"):
    train_sae(_config(str(tmp_path / "none")), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match=r"config\.source\.workdir"):
    _config("", source=dict(hf_path=""))


def _cli(args, **kwargs):
  return subprocess.run([sys.executable, os.path.join(REPO, "experiments", "sae.py"),
                         *args], cwd=REPO, capture_output=True, text=True, **kwargs)


def test_cli_one_line_errors_and_ctrl_c_saves(lm_workdir, tmp_path):
  common = [f"--config.source.workdir={lm_workdir}", "--config.sae.num_latents=64",
            "--config.source.batch_size=4", "--config.source.seq_len=16"]
  bad = _cli([*common, "--config.sae.k=64", f"--workdir={tmp_path}/w"])
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: config.sae.k=64 is "
                                                        "invalid: must be in [1, 63]")
  site = _cli([*common, "--config.sae.k=4", "--config.source.site=resid_7",
               f"--workdir={tmp_path}/w"])
  assert "error: config.source.site='resid_7'" in site.stderr and "ffn_in_1" in site.stderr
  # Ctrl-C during training: the last completed step is saved, exit status 130
  workdir = tmp_path / "int"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "experiments", "sae.py"), *common,
       "--config.sae.k=4", "--config.sae.k_aux=8", "--config.train.num_steps=100000",
       "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
       "--config.train.log_every=1", f"--workdir={workdir}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  try:
    for _ in range(600):
      if metrics.exists() and metrics.read_text().count("\n") >= 3:
        break
      try:
        proc.wait(timeout=0.5)
        break
      except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, out
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved and "Interrupted: saved step" in out


def test_trains_on_a_hugging_face_checkpoint(lm_workdir, tmp_path):
  from sparsejax.interop.hf import save_hf
  from sparsejax.train.trainer import restore_run
  run, state, _ = restore_run(lm_workdir)
  save_hf(str(tmp_path / "hf"), run.model, state.params)
  config = _config("", source=dict(workdir="", hf_path=str(tmp_path / "hf"),
                                   site="ffn_in_0"), train=dict(num_steps=2))
  result = train_sae(config, str(tmp_path / "sae"))
  assert result.metrics["step"] == 2 and result.metrics["l0"] <= 4
  # the same model from its sparsejax run gives the same clean loss
  same = train_sae(_config(lm_workdir, source=dict(site="ffn_in_0"),
                           train=dict(num_steps=2)), str(tmp_path / "sae_run"))
  np.testing.assert_allclose(result.metrics["ce_clean"], same.metrics["ce_clean"],
                             rtol=1e-5)
