"""experiments/compare.py: the experiment configs' FLOPs/params (by
`sparsejax.models.accounting`) against hand counts, and main() in-process on a tiny
model (2 blocks, 2 steps, moe + ultramem)."""

import json
import math

import pytest

from conftest import experiment_module, run_main
from sparsejax.models import accounting
from sparsejax.models.config import parse_model_config


@pytest.fixture(scope="module")
def compare():
  with experiment_module("compare") as module:
    yield module


def test_flops_per_token_dense_hand_count(compare):
  # d 128, 4 heads of 32, 2 kv heads, 4 layers, d_ff 384, vocab 256, seq 128
  model = parse_model_config(compare.configs.load("dense").model)
  d, layers, ff, vocab, seq = 128, 4, 384, 256, 128
  q_o = 2 * d * d                 # q_proj and o_proj: 128 × 128 each
  k_v = 2 * d * 64                # k_proj and v_proj: 128 × (2 kv heads · 32)
  ffn = 3 * d * ff                # gate, up, down
  per_layer = 2 * (q_o + k_v + ffn) + 2 * 2 * (seq / 2) * d
  expected = layers * per_layer + 2 * d * vocab
  assert accounting.flops_per_token(model, seq) == expected == 1_769_472
  counts = compare.count_params(model)
  norms = layers * 2 * d + d      # attn_norm, ffn_norm per block + final_norm
  assert counts["embedding_params"] == vocab * d
  assert counts["nonembedding_params"] == layers * (q_o + k_v + ffn) + norms
  assert counts["activated_params"] == counts["nonembedding_params"]
  assert counts["total_params"] == counts["nonembedding_params"] + vocab * d


def test_activated_params_moe_and_memory(compare):
  moe = parse_model_config(compare.configs.load("moe").model)
  dense = parse_model_config(compare.configs.load("dense").model)
  c_moe, c_dense = compare.count_params(moe), compare.count_params(dense)
  # 8 experts of 3·128·192, 2 active = the dense 3·128·384; + router 128·8 per block
  assert c_moe["activated_params"] == c_dense["activated_params"] + 4 * 128 * 8
  assert c_moe["nonembedding_params"] == (c_dense["nonembedding_params"]
                                          + 4 * (3 * 128 * 192 * 8 - 3 * 128 * 384
                                                 + 128 * 8))
  um = parse_model_config(compare.configs.load("ultramem").model)
  counts = compare.count_params(um)
  values = 2 * 120 ** 2 * 64       # two memory layers of 14,400 × 64
  read = 2 * 2 * 16 * 64           # per layer 2 heads × 16 rows × 64
  assert counts["nonembedding_params"] - counts["activated_params"] == values - read


@pytest.mark.slow
def test_main_writes_report(compare, tmp_path, monkeypatch):
  md = tmp_path / "RESULTS.md"
  monkeypatch.setattr(compare.results_log, "RESULTS_MD", str(md))
  workdir = tmp_path / "cmp"
  tiny = {"model": {"d_model": 32, "num_heads": 4, "num_kv_heads": 2, "d_ff": 64,
                    "memory_options": {"num_keys": 16, "knn": 4, "kdim": 8, "vdim": 16}},
          "data": {"seq_len": 16, "batch_size": 8},
          "optim": {"warmup_steps": 1}, "train": {"eval_batches": 1}}
  argv = ["compare", f"--workdir={workdir}", "--steps=2", "--variants=moe,ultramem",
          f"--overrides={json.dumps(tiny)}", "--record"]
  configs = compare.variant_configs

  def two_blocks(*args, **kwargs):
    """The variants with 2 blocks instead of the configs' 4 (ultramem's skip-layer
    memory reads block 0 and adds after block 1): half the programs to compile.
    --overrides cannot do it: it applies to every variant, and memory_layers must be
    empty without a memory."""
    out = configs(*args, **kwargs)
    for config in out.values():
      config["model"]["num_layers"] = 2
      if config["model"].get("memory_layers"):
        config["model"]["memory_layers"] = "0:1"
    return out

  monkeypatch.setattr(compare, "variant_configs", two_blocks)
  run_main(compare, argv)

  report = (workdir / "report.md").read_text()
  for column in ("val loss", "Δ vs dense", "bits/byte", "total params (non-emb.)",
                 "activated params", "FLOPs/token", "train tok/s"):
    assert column in report, column
  for name in ("moe", "ultramem"):
    assert f"| {name} |" in report
  assert "Expected (paper)" in report and "Measured order" in report
  assert "d_model 32, 2 blocks" in report
  assert (workdir / "val_curves.png").stat().st_size > 0
  rows = json.loads((workdir / "results.json").read_text())["variants"]
  assert [r["name"] for r in rows] == ["moe", "ultramem"]
  for r in rows:
    assert math.isfinite(r["val_loss"]) and math.isfinite(r["val_bpb"])
    assert r["steps"] == 2 and r["tokens"] == 2 * 8 * 16
    assert 0 < r["activated_params"] <= r["nonembedding_params"] < r["total_params"]
    assert r["flops_per_token"] > 0
  assert rows[0]["activated_params"] < rows[0]["nonembedding_params"]   # moe
  assert "compare.py" in md.read_text() and "| ultramem |" in md.read_text()
