"""Smoke test of experiments/bench_decode.py: its main() in-process on tiny sizes."""

import json

import pytest

from conftest import experiment_module, run_main


@pytest.fixture(scope="module")
def bench():
  with experiment_module("bench_decode") as module:
    yield module


TINY = ["--d_model=32", "--num_layers=1", "--num_heads=2", "--num_kv_heads=1",
        "--vocab_size=32", "--d_ff=32", "--num_experts=8", "--top_k=2", "--knn=4",
        "--kdim=8", "--memory_layers=0:0", "--cache_len=4", "--batch_sizes=2",
        "--repeats=1", "--min_sample_ms=0"]


@pytest.mark.slow
def test_main_writes_jsonl_plot_and_results_section(bench, tmp_path, capsys,
                                                    monkeypatch):
  out, md, png = tmp_path / "decode.jsonl", tmp_path / "RESULTS.md", tmp_path / "d.png"
  monkeypatch.setattr(bench.results_log, "RESULTS_MD", str(md))
  argv = ["bench_decode", *TINY, f"--out={out}", f"--plot={png}", "--record"]
  run_main(bench, argv)

  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted((r["batch"], r["model"]) for r in rows) == sorted(
      (2, m) for m in bench.METHODS)
  assert bench.METHODS == ("dense", "moe_decode", "moe_dropless", "ultramem")
  by = {(r["model"], r["batch"]): r for r in rows}
  plan = rows[0]["plan"]
  for r in rows:
    for field in ("date", "device", "jax", "commit", "loadavg", "command"):
      assert field in r, field
    assert r["time_s"] > 0 and len(r["times_s"]) == 1
    assert r["cache_max_rel_diff"] <= 2e-4          # cached decoding == full forward
    assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["time_s"])
    assert r["param_bytes_per_token"] == pytest.approx(
        r["param_bytes_touched"] / r["batch"])
    assert r["time_vs_dense"] == pytest.approx(
        r["time_s"] / by[("dense", r["batch"])]["time_s"])
    assert r["moe_best_impl"] in ("moe_decode", "moe_dropless")
    assert "keys_prenormalized" not in r

  dense_p = plan["dense"]["total_params"]
  assert plan["dense"]["activated_params"] == dense_p
  for kind in ("moe", "ultramem"):
    assert plan[kind]["total_params"] > 1.5 * dense_p
  assert abs(plan["ultramem"]["total_params"] / plan["moe"]["total_params"] - 1) < 0.2

  per_expert_b = plan["moe"]["per_expert_params"] * 4
  for b in (2,):
    d, m, u = by[("dense", b)], by[("moe_decode", b)], by[("ultramem", b)]
    assert d["param_bytes_touched"] == 4 * dense_p          # dense reads everything
    experts = m["distinct_experts_per_layer"]
    assert len(experts) == 1 and 2 <= experts[0] <= min(8, 2 * b)
    assert m["param_bytes_touched"] == (plan["moe"]["non_expert_params"] * 4
                                        + sum(experts) * per_expert_b)
    assert by[("moe_dropless", b)]["param_bytes_touched"] == m["param_bytes_touched"]
    rows_read = u["distinct_rows_per_layer"]
    assert len(rows_read) == 1 and 1 <= rows_read[0] <= 2 * 4 * b   # H·m per token
    assert u["param_bytes_touched"] == (plan["ultramem"]["non_value_params"] * 4
                                        + sum(rows_read) * plan["ultramem"]["vdim"] * 4)
    assert u["param_bytes_touched"] < 4 * plan["ultramem"]["total_params"]

  assert png.exists() and png.stat().st_size > 1000
  text = md.read_text()
  assert "## Decode: Dense vs MoE vs UltraMem" in text and "| UltraMem |" in text
  assert "Interpretation:" in text and "d.png" in text
  assert "pre-norm" not in text and "[H, 2, n, r, kdim]" in text
  printed = capsys.readouterr().out
  assert "CPU: absolute times are NOT meaningful" in printed
  assert "MoE best / UltraMem" in printed


def test_plan_matches_closed_form_sizes(bench):
  cfgs, info = bench.plan_models(
      d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=256, d_ff=512,
      num_experts=36, top_k=2, memory_layers="0:2,1:3", mem_heads=2, knn=16, kdim=32,
      vdim=0, tucker_rank=2, tucker_cores=2, value_expand=4, num_keys=0,
      ultramem_d_ff=0)
  dense = info["dense"]["total_params"]
  assert 11.5 < info["moe"]["total_params"] / dense < 12.5                 # ≈ 12×
  assert abs(info["ultramem"]["total_params"] / info["moe"]["total_params"] - 1) < 0.01
  for kind in ("moe", "ultramem"):
    assert abs(info[kind]["activated_params"] / dense - 1) < 0.05
  assert cfgs["moe_decode"]["ffn_options"]["dispatch"] == "decode"
  assert cfgs["moe_dropless"]["ffn_options"]["dispatch"] == "dropless"
