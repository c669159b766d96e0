"""experiments/bench_sparse_training.py: the amortized-overhead arithmetic, that the
timed "update" state really runs RigL's mask update (and the "regular" one does not),
and a smoke run of main() with --record in-process."""

import sys

import jax
import numpy as np
import pytest

from conftest import experiment_module, run_main


@pytest.fixture(scope="module")
def bench():
  with experiment_module("bench_sparse_training") as module:
    yield module


def test_table_amortizes_update_steps(bench):
  times = {"dense": {"regular": 0.010}, "static": {"regular": 0.0105},
           "rigl": {"regular": 0.0101, "update": 0.030}, "ste": {"update": 0.012}}
  text, overhead = bench.table(times, 100)
  assert overhead["dense"] == pytest.approx(0.0)
  assert overhead["static"] == pytest.approx(0.05)
  assert overhead["rigl"] == pytest.approx((99 * 0.0101 + 0.030) / 1.0 - 1)
  assert overhead["ste"] == pytest.approx(0.2)
  assert "| rigl | 10.10 | 1.010 | 30.00 | 3.000 | +3.0% |" in text
  assert "| static | 10.50 | 1.050 | — | — | +5.0% |" in text
  assert "| ste | — | — | 12.00 | 1.200 | +20.0% |" in text


@pytest.mark.slow
def test_update_state_runs_the_mask_update(bench):
  """RigL's mask update runs at step 4 (update_every=4) and not at step 5. The config
  is the one main() times for rigl (test_main_records_a_section): shared programs."""
  trainer = bench.one_device_trainer({
      "model": dict(d_model=16, num_layers=1, num_heads=4, num_kv_heads=2),
      "data": dict(seq_len=8, batch_size=2), "train": dict(num_steps=40, sample_tokens=0),
      "sparsity": bench.sparsity_section("rigl", 0.9, 4)})
  state = trainer.init_state()
  tokens = np.random.default_rng(0).integers(0, 256, (2, 9), dtype=np.int32)
  batch = trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  with trainer.activate():
    step = jax.jit(trainer._step)   # pylint: disable=protected-access
    changes = {at: int(step(bench.at_step(trainer, state, at), batch)[1]
                       ["sparsity/mask_changes"]) for at in (4, 5)}
  assert changes[4] > 0 and changes[5] == 0


@pytest.mark.slow   # compiles the train step of four tiny models (~20 s of CPU)
def test_main_records_a_section(bench, tmp_path, monkeypatch, capsys):
  md = tmp_path / "RESULTS.md"
  monkeypatch.setattr(bench.results_log, "RESULTS_MD", str(md))
  argv = ["bench_sparse_training", "--d_model=16", "--num_layers=1", "--batch=2",
          "--seq_len=8", "--update_every=4", "--repeats=1", "--min_sample_s=0",
          "--algorithms=static,rigl,ste", "--statistic=min", "--record"]
  monkeypatch.setattr(sys, "argv", argv)   # the recorded command
  run_main(bench, argv)
  out = capsys.readouterr().out
  for name in ("dense", "static", "rigl", "ste"):
    assert f"| {name} |" in out
  assert "RigL amortized overhead at Δt = 4" in out and "min of 1 interleaved" in out
  section = md.read_text()
  assert "## Sparse training step cost vs dense" in section
  assert "--update_every=4" in section and "bench_shrink.py" in section
