"""Smoke test of experiments/bench_moe.py: its main() in-process on tiny sizes."""

import json

import numpy as np
import pytest

from conftest import experiment_module, run_main


@pytest.fixture(scope="module")
def bench():
  with experiment_module("bench_moe") as module:
    yield module


@pytest.mark.slow
def test_main_writes_jsonl_and_results_section(bench, tmp_path, capsys, monkeypatch):
  out, md = tmp_path / "moe.jsonl", tmp_path / "RESULTS.md"
  monkeypatch.setattr(bench.results_log, "RESULTS_MD", str(md))
  argv = ["bench_moe", "--tokens=16", "--d_model=8", "--num_experts=4", "--top_k=2",
          "--d_expert=8", "--capacity_factor=1.0", "--batch_sizes=1", "--repeats=1",
          "--min_sample_ms=0", f"--out={out}", "--record"]
  run_main(bench, argv)

  rows = [json.loads(line) for line in out.read_text().splitlines()]
  train = [r for r in rows if r["bench"] == "train"]
  decode = [r for r in rows if r["bench"] == "decode"]
  assert sorted(r["impl"] for r in train) == ["capacity", "dense", "dropless", "loop"]
  assert sorted((r["batch"], r["impl"]) for r in decode) == sorted(
      (b, i) for b in (1,)
      for i in ("decode", "dropless", "capacity", "dense_activated", "dense_total"))
  for r in rows:
    for field in ("date", "device", "jax", "commit", "loadavg", "command"):
      assert field in r, field
    assert r["agreed"] and r["time_s"] > 0 and len(r["times_s"]) == 1
    if r["impl"] in ("loop", "dropless", "decode", "capacity"):
      # asserted to agree with the loop reference before timing
      assert r["max_rel_diff"] is not None and r["max_rel_diff"] <= 2e-4

  dense = next(r for r in train if r["impl"] == "dense")
  assert dense["d_ff"] == 2 * 8 and dense["throughput_vs_dense"] == 1.0
  for r in train:
    assert r["tokens"] == 16
    assert r["tokens_per_s"] == pytest.approx(16 / r["time_s"])
    assert r["throughput_vs_dense"] == pytest.approx(dense["time_s"] / r["time_s"])
    if r["impl"] != "capacity":
      assert r["dropped_fraction"] == 0.0
  moe = next(r for r in train if r["impl"] == "dropless")
  # equal activated params: k · 3·D·F (+ router) vs the dense 3·D·(k·F)
  assert moe["activated_ffn_params"] - 8 * 4 == dense["activated_ffn_params"] == 3 * 8 * 16
  assert moe["total_ffn_params"] - 8 * 4 == 4 * 3 * 8 * 8

  per_expert = 3 * 8 * 8 * 4  # bytes of one expert's f32 weights
  for r in decode:
    b = r["batch"]
    if r["impl"] == "decode":
      assert 1 <= r["unique_experts"] <= min(4, 2 * b)
      assert r["weight_bytes"] == r["unique_experts"] * per_expert
    elif r["impl"] in ("dropless", "capacity"):
      assert r["weight_bytes"] == 4 * per_expert
    elif r["impl"] == "dense_activated":
      assert r["weight_bytes"] == 3 * 8 * 16 * 4 and r["time_vs_dense_activated"] == 1.0
    else:
      assert r["weight_bytes"] == 4 * per_expert
    assert r["weight_bytes_per_token"] == pytest.approx(r["weight_bytes"] / b)
  one = {r["impl"]: r for r in decode if r["batch"] == 1}
  assert one["decode"]["unique_experts"] == 2          # k distinct experts at B = 1

  text = md.read_text()
  assert "## MoE dispatch vs dense FFN" in text and "| loop |" in text
  assert "Interpretation:" in text
  assert "CPU: absolute times are NOT meaningful" in capsys.readouterr().out


def test_disagreement_is_caught(bench):
  ref = {"a": np.ones((3, 2)), "b": np.arange(4.0)}
  assert bench.assert_close("same", ref, ref) == 0.0
  bad = {"a": np.ones((3, 2)), "b": np.arange(4.0) + np.array([0, 0, 0, 0.1])}
  with pytest.raises(AssertionError, match="disagrees"):
    bench.assert_close("bad", ref, bad)


def test_capacity_keep_matches_the_capacity_impl(bench):
  import jax
  params = bench.init_moe(jax.random.key(0), 8, 4, 8)
  x = bench.normals(jax.random.key(1), 1, (32, 8))[0]
  @jax.jit
  def both(params, x):
    return (bench.moe_apply(params, x, k=2, impl="capacity", capacity_factor=0.5),
            bench.masked_reference(params, x, k=2, capacity_factor=0.5))
  (y, dropped), (ref, ref_dropped) = both(params, x)
  assert float(dropped) == pytest.approx(float(ref_dropped)) and float(dropped) > 0
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-6)
