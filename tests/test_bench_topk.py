"""Smoke test of experiments/bench_topk.py: its main() in-process on tiny sizes."""

import json

import numpy as np
import pytest

from conftest import experiment_module, run_main


@pytest.fixture(scope="module")
def bench():
  with experiment_module("bench_topk") as module:
    yield module


def test_main_writes_jsonl_and_markdown(bench, tmp_path, capsys):
  out, md = tmp_path / "topk.jsonl", tmp_path / "RESULTS.md"
  argv = ["bench_topk", "--rows=8", "--lengths=128", "--ratio=0.5",
          "--dtype=f32", "--repeats=1", "--min_sample_ms=0", f"--out={out}",
          "--markdown", f"--results_md={md}"]
  run_main(bench, argv)

  records = [json.loads(line) for line in out.read_text().splitlines()]
  checks = [r for r in records if r["method"] == "interpret"]
  timed = [r for r in records if r["method"] != "interpret"]
  assert len(checks) == 1 and checks[0]["matches_xla"] and not checks[0]["timed"]
  # CPU: xla, baseline, approx per (D, ratio); the compiled kernel only on GPU/TPU.
  assert sorted(r["method"] for r in timed) == ["approx", "baseline", "xla"]
  for r in records:
    for field in ("date", "device", "device_kind", "jax_version", "git_commit",
                  "load_average", "command"):
      assert field in r, field
  for r in timed:
    assert (r["D"], r["k"], r["ratio"], r["rows"], r["dtype"]) == (128, 64, 0.5, 8, "f32")
    assert r["bytes"] == 8 * 128 * 8
    assert r["time_s"] > 0 and r["gb_per_s"] > 0 and len(r["times_s"]) == 1
    assert r["roofline_fraction"] is None          # CPU: no HBM roofline
  base = {r["k"]: r for r in timed if r["method"] == "baseline"}
  for r in timed:
    assert r["ratio_vs_baseline"] == pytest.approx(r["time_s"] / base[r["k"]]["time_s"])
    if r["method"] in ("xla", "baseline"):       # asserted bit-identical before timing
      assert r["matches_xla"] and r["recall"] == 1.0
    else:
      assert 0.0 <= r["recall"] <= 1.0

  text = md.read_text()
  assert text.startswith("# sparsejax benchmark results")
  assert "| f32 | 128 | 64 | baseline |" in text
  assert "CPU: absolute times are NOT meaningful" in capsys.readouterr().out


def test_reference_and_baseline_masks_identical(bench):
  import jax
  import jax.numpy as jnp
  from sparsejax.ops.topk import topk_sparsify
  x = jax.random.normal(jax.random.key(3), (8, 128), jnp.bfloat16)   # bf16: many ties
  ref = np.asarray(topk_sparsify(x, 64, impl="xla"))
  bench.assert_same("baseline", ref, np.asarray(bench.baseline_topk(x, 64)))
  bench.assert_same("f32key", ref, np.asarray(bench.f32key_topk(x, 64)))
  bad = ref.copy()
  bad[0, 0] = 1 if bad[0, 0] == 0 else 0
  with pytest.raises(AssertionError, match="disagrees"):
    bench.assert_same("bad", ref, bad)


def test_hbm_bandwidth_table(bench):
  assert bench.hbm_bandwidth("NVIDIA H100 80GB HBM3") == ("H100", 3.35e12)
  assert bench.hbm_bandwidth("NVIDIA H200") == ("H200", 4.8e12)
  assert bench.hbm_bandwidth("TPU v5 lite") == ("TPU v5e", 819e9)
  assert bench.hbm_bandwidth("TPU v5p") == ("TPU v5p", 2.77e12)
  assert bench.hbm_bandwidth("cpu") == (None, None)
