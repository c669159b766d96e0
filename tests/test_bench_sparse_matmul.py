"""Smoke test of experiments/bench_sparse_matmul.py: its main() in-process on tiny sizes
(JSON lines, the RESULTS.md section), and its target rule."""

import json

import pytest

from conftest import experiment_module, run_main


@pytest.fixture(scope="module")
def bench():
  with experiment_module("bench_sparse_matmul") as module:
    yield module


def test_main_writes_jsonl_and_results_section(bench, tmp_path, capsys, monkeypatch):
  out, md = tmp_path / "m.jsonl", tmp_path / "RESULTS.md"
  monkeypatch.setattr(bench.results_log, "RESULTS_MD", str(md))
  run_main(bench, ["bench_sparse_matmul", "--rows=8", "--in_features=64",
                   "--out_features=32", "--block=16,16", "--densities=1,0.25",
                   "--repeats=1", "--min_sample_ms=0", f"--out={out}", "--record"])
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted((r["method"], r["pass_"], r["density"]) for r in records) == sorted(
      (m, p, d) for m in ("dense", "xla") for p in ("fwd", "fwd+bwd")
      for d in (1.0, 0.25))
  for r in records:
    for field in ("date", "device", "jax", "commit", "loadavg", "command"):
      assert field in r, field
    assert r["time_s"] > 0 and len(r["times_s"]) == 1
    if r["method"] == "dense":
      assert r["speedup_vs_dense"] == 1.0 and r["target_met"] is None
    assert r["nnz_blocks"] == {1.0: 8, 0.25: 2}[r["density"]]    # 4 x 2 block grid
    stored = 64 * 32 if r["method"] == "dense" else r["nnz_blocks"] * 256
    assert r["flops"] == 2 * 8 * stored * (1 if r["pass_"] == "fwd" else 3)
    assert r["ideal_bytes"] == (stored + 8 * 96) * 4
  xla_quarter = [r for r in records if r["method"] == "xla" and r["density"] == 0.25
                 and r["pass_"] == "fwd"]
  assert xla_quarter[0]["target_met"] == (xla_quarter[0]["speedup_vs_dense"] > 1)
  text = md.read_text()
  assert "## Block-sparse weight matmul vs dense (CPU)" in text
  assert "| f32 | fwd | 0.25 | xla |" in text
  assert "CPU: absolute times are NOT meaningful" in capsys.readouterr().out


def test_target_rule(bench):
  assert bench.target("xla", 0.25, 1.2, accelerator=False) is True
  assert bench.target("xla", 0.25, 0.9, accelerator=False) is False
  assert bench.target("xla", 0.5, 0.9, accelerator=False) is None
  assert bench.target("pallas", 0.25, 2.9, accelerator=True) is True      # >= 2.8
  assert bench.target("pallas", 0.125, 5.0, accelerator=True) is False    # < 5.6
  assert bench.target("dense", 0.125, 1.0, accelerator=True) is None
