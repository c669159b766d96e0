"""Smoke test of experiments/bench_shrink.py: its main() in-process on tiny sizes."""

import json

import pytest

from conftest import experiment_module, run_main
from sparsejax.validation import ConfigError


@pytest.fixture(scope="module")
def bench():
  with experiment_module("bench_shrink") as module:
    yield module


@pytest.mark.slow   # ~10 s of CPU: it compiles three models' forward and train step
def test_main_writes_jsonl_and_results_section(bench, tmp_path, capsys, monkeypatch):
  out, md = tmp_path / "shrink.jsonl", tmp_path / "RESULTS.md"
  monkeypatch.setattr(bench.results_log, "RESULTS_MD", str(md))
  d, layers, ff, vocab = 16, 2, 32, 64
  run_main(bench, ["bench_shrink", f"--d_model={d}", f"--num_layers={layers}",
                   "--num_heads=4", "--num_kv_heads=2", f"--d_ff={ff}",
                   f"--vocab_size={vocab}", "--batch=2", "--seq_len=8", "--keep=0.5",
                   "--repeats=1", "--min_sample_ms=0", f"--out={out}", "--record"])

  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted((r["model"], r["measurement"]) for r in rows) == [
      (m, s) for m in ("dense", "keep 0.5") for s in ("forward", "train_step")]
  by = {(r["model"], r["measurement"]): r for r in rows}
  dense, half = by[("dense", "forward")], by[("keep 0.5", "forward")]
  assert (half["d_ff"], half["num_heads"], half["num_kv_heads"]) == (16, 2, 1)
  # Exactly half of every block's FFN channels and kv groups (with their q heads) went:
  # 3·D per channel, 2·D·Dh per q head (q, o), 2·D·Dh per kv head (k, v); Dh = 4.
  dropped = layers * (16 * 3 * d + 2 * 2 * d * 4 + 1 * 2 * d * 4)
  assert dense["params"] - half["params"] == dropped
  assert dense["nonembedding_params"] - half["nonembedding_params"] == dropped
  assert half["max_abs_logit_diff"] <= 1e-4
  for r in rows:
    for field in ("date", "device", "jax", "commit", "loadavg", "command"):
      assert field in r, field
    assert r["time_s"] > 0 and len(r["times_s"]) == 1
    base = by[("dense", r["measurement"])]
    assert r["time_ratio"] == pytest.approx(r["time_s"] / base["time_s"])
    assert r["flops_ratio"] == pytest.approx(
        r["flops_per_token"] / base["flops_per_token"])
    assert r["proportional"] == (abs(r["time_ratio"] / r["flops_ratio"] - 1) <= 0.15)
  assert 0.3 < half["flops_ratio"] < 1 and dense["flops_ratio"] == 1
  text = md.read_text()
  assert "## Shape shrink: dense vs shrunk step time" in text
  assert "| keep 0.5 | 16 |" in text
  assert "Claim (step time ∝ size" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--keep=1.0"], r"--keep=1.0 is invalid: must be fractions in \(0, 1\)"),
    (["--num_heads=3"], "--num_heads=3 is invalid: must be a divisor of d_model=256"),
])
def test_bad_flags_name_the_flag(bench, argv, match):
  with pytest.raises(ConfigError, match=match):
    run_main(bench, ["bench_shrink", "--out=", *argv])
