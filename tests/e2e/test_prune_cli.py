"""experiments/prune.py end to end: a run pruned to a run directory (N:M + compressed
export), a Hugging Face fixture pruned to a Hugging Face checkpoint, the one-line input
errors — and the input checkpoint is never modified."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from conftest import REPO, experiment_module, run_main, tiny_config_dict
from sparsejax.interop import load_hf
from sparsejax.sparsity.compress import load_compressed
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import restore_run, train
from sparsejax.validation import ConfigError

HF_LLAMA = os.path.join(REPO, "tests", "fixtures", "hf", "llama")
TEXT = os.path.join(REPO, "tests", "fixtures", "hf", "text.txt")
SMALL = ["--calib_samples=8", "--calib_seq_len=32", "--eval_tokens=256",
         "--calib_batch_size=8"]


def _digest(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _linears(params):
  for i in range(2):
    block = params[f"block_{i}"]
    for group, names in (("attention", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("ffn", ("gate_proj", "up_proj", "down_proj"))):
      for name in names:
        k = np.asarray(block[group][name]["kernel"])
        cd = 2 if name == "o_proj" else 1
        yield f"block_{i}/{group}/{name}", k.reshape(int(np.prod(k.shape[:cd])), -1)


@pytest.mark.slow
def test_run_pruned_to_a_run_dir_with_nm_and_compressed_export(tmp_path, capsys):
  run = tmp_path / "run"
  train(parse_config(tiny_config_dict(train=dict(num_steps=3))), str(run))
  before = _digest(run)
  out = tmp_path / "out"
  with experiment_module("prune") as cli:
    run_main(cli, ["prune", f"--workdir={run}", "--method=wanda", "--nm=2:4",
                   f"--out={out}", "--compress", *SMALL])
  printed = capsys.readouterr().out
  assert "before: ppl" in printed and "compressed.npz" in printed
  assert _digest(run) == before
  _, state, _ = restore_run(str(out))
  _, original, _ = restore_run(str(run))
  compressed = load_compressed(str(out / "compressed.npz"))
  for name, k in _linears(jax.device_get(state.params)):
    groups = (k.reshape(-1, 4, k.shape[1]) != 0).sum(axis=1)
    assert groups.max() <= 2 and np.mean(k == 0) == pytest.approx(0.5, abs=0.01), name
    np.testing.assert_array_equal(compressed[name], k)
  orig = dict(_linears(jax.device_get(original.params)))
  for name, k in _linears(jax.device_get(state.params)):   # Wanda: kept weights unchanged
    np.testing.assert_array_equal(k[k != 0], orig[name][k != 0])
  report = json.loads((out / "prune_report.json").read_text())
  assert report["summary"]["sparsity"] == pytest.approx(0.5)
  assert report["after"]["tokens"] == report["before"]["tokens"] == 256
  assert report["compressed"]["saved_bytes"] > 0
  assert len(report["layers"]) == 14 and (out / "prune_report.md").exists()


@pytest.mark.slow
def test_hf_fixture_pruned_to_hf_checkpoint(tmp_path, capsys):
  before = _digest(HF_LLAMA)
  out = tmp_path / "hf_out"
  with experiment_module("prune") as cli:
    run_main(cli, ["prune", f"--hf_path={HF_LLAMA}", "--method=sparsegpt",
                   "--sparsity=0.6", f"--calib={TEXT}", f"--eval_data={TEXT}",
                   f"--out={out}", *SMALL])
  assert "after sparsegpt 60%" in capsys.readouterr().out
  assert _digest(HF_LLAMA) == before
  cfg, params = load_hf(str(out))
  _, dense = load_hf(HF_LLAMA)
  zeros = [np.mean(k == 0) for _, k in _linears(params)]
  assert np.allclose(zeros, 0.6, atol=0.02)
  np.testing.assert_array_equal(params["embedding"], dense["embedding"])
  assert cfg.num_layers == 2 and (out / "tokenizer.json").exists()


def test_bad_inputs_are_config_errors(tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("too short")
  nonempty = tmp_path / "full"
  nonempty.mkdir()
  (nonempty / "x").write_text("x")
  cases = [
      (["--sparsity=1.0"], "--sparsity"),
      (["--nm=2-4"], "--nm"),
      (["--nm=5:4"], "--nm"),
      ([f"--calib={short}"], "at least one sequence"),
      ([f"--calib={tmp_path / 'missing.txt'}"], "does not exist"),
      ([f"--out={nonempty}"], "not an empty directory"),
      (["--compress"], "--compress"),
  ]
  with experiment_module("prune") as cli:
    for flags, match in cases:
      with pytest.raises(ConfigError, match=match):
        calib = [] if any(f.startswith("--calib=") for f in flags) else [f"--calib={TEXT}"]
        run_main(cli, ["prune", f"--hf_path={HF_LLAMA}", "--eval_tokens=64",
                       "--calib_samples=2", "--calib_seq_len=32", f"--eval_data={TEXT}",
                       *calib, *flags])
    with pytest.raises(ConfigError, match="exactly one"):
      run_main(cli, ["prune", "--method=wanda"])
