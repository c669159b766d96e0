"""Smoke test of experiments/bench_attention.py: its main() in-process on tiny lengths
(no quality training), plus the deterministic cost model (FLOPs growth exponents)."""

import json

import pytest

from conftest import experiment_module, run_main


@pytest.fixture(scope="module")
def bench():
  with experiment_module("bench_attention") as module:
    yield module


TINY = ["--lengths=256,512", "--num_heads=2", "--num_kv_heads=1", "--head_dim=16",
        "--local_window=64", "--stride=32", "--strided_local=32", "--block=64",
        "--nsa_window=64", "--nsa_num_selected=2", "--decode_contexts=1024,8192",
        "--latency_contexts=256", "--topk=4", "--noquality", "--repeats=1",
        "--min_sample_ms=0"]

CFG = dict(batch=1, num_heads=4, num_kv_heads=1, head_dim=64, local_window=512,
           stride=128, strided_local=128, block=128, nsa_block_len=32, nsa_stride=16,
           nsa_select_block=64, nsa_num_selected=16, nsa_window=512)


@pytest.mark.slow
def test_main_writes_jsonl_plot_and_results_section(bench, tmp_path, capsys,
                                                    monkeypatch):
  out, md, png = tmp_path / "a.jsonl", tmp_path / "RESULTS.md", tmp_path / "a.png"
  monkeypatch.setattr(bench.results_log, "RESULTS_MD", str(md))
  argv = ["bench_attention", *TINY, f"--out={out}", f"--plot={png}", "--record"]
  run_main(bench, argv)

  rows = [json.loads(line) for line in out.read_text().splitlines()]
  scaling = [r for r in rows if r["bench"] == "attention_scaling"]
  assert sorted((r["method"], r["pass_"], r["seq_len"]) for r in scaling) == sorted(
      (m, p, t) for m in bench.METHODS for p in ("fwd", "fwd+bwd") for t in (256, 512))
  for r in scaling:
    for field in ("date", "device", "jax", "commit", "loadavg", "command"):
      assert field in r, field
    assert r["time_s"] > 0 and len(r["times_s"]) == 1
    assert r["flops_per_s"] == pytest.approx(r["useful_flops"] / r["time_s"])
    if r["method"] == "dense":
      assert r["nnz_per_head"] == r["seq_len"] * (r["seq_len"] + 1) // 2
    if r["method"] in ("local", "strided"):
      assert 0 < r["block_efficiency"] <= 1 and r["density"] < 1
  exps = next(r for r in rows if r["bench"] == "attention_exponents")["exponents"]
  assert set(exps) == set(bench.METHODS)
  assert exps["dense"]["flops"] == pytest.approx(2.0, abs=0.01)

  tokens = {r["context"]: r for r in rows if r["bench"] == "decode_tokens"}
  assert tokens[8192]["dense"] == 8192 and tokens[1024]["block_topk"] == 4 + 4 * 16 + 64
  lat = [r for r in rows if r["bench"] == "decode_latency"]
  assert len(lat) == 1 and lat[0]["dense_s"] > 0 and lat[0]["block_topk_s"] > 0
  assert not [r for r in rows if r["bench"] == "attention_quality"]

  assert png.exists() and png.stat().st_size > 1000
  text = md.read_text()
  assert "## Attention: dense vs block-sparse vs NSA" in text
  assert "| block-sparse local |" in text and "Interpretation:" in text
  assert "a.png" in text and "read ratios and exponents only" in text
  assert "CPU: absolute times are NOT meaningful" in capsys.readouterr().out


def test_flops_growth_exponents_from_nnz(bench):
  """Deterministic: dense FLOPs ∝ T², a fixed window ∝ T, NSA far below T²."""
  lengths = [2048, 4096, 8192]
  cfg = dict(CFG, local_window=64, block=64)     # window ≪ T: the ramp-up is negligible
  fit = lambda m: bench.growth_exponent(
      lengths, [bench.fwd_flops(m, t, cfg) for t in lengths])
  assert fit("dense") == pytest.approx(2.0, abs=0.01)
  assert fit("local") == pytest.approx(1.0, abs=0.02)
  assert 1.0 < fit("nsa") < 1.5
  assert 1.0 < fit("strided") < 2.0
  assert bench.nnz_per_head("local", 4096, CFG) == sum(min(t + 1, 512)
                                                       for t in range(4096))
  assert bench.block_efficiency("dense", 1024, CFG) == pytest.approx(
      (1024 * 1025 / 2) / (36 * 128 * 128))


def test_decode_tokens_match_paper_table4(bench):
  from sparsejax.ops.block_topk import BlockTopK
  rows = bench.decode_tokens([8192, 16384, 32768, 65536], CFG, BlockTopK(top_k=32))
  speedups = [round(r["nsa_speedup"], 1) for r in rows]
  assert speedups == [4.0, 6.4, 9.1, 11.6]
  assert all(r["block_topk"] == 4 + 32 * 16 + 64 for r in rows)
