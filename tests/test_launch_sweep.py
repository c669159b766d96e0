"""experiments/launch_sweep.py on CPU (interpret mode, which ignores the launch
parameters): every launch of a kernel matches the default launch, a launch that changes
the numbers is a FAIL and one the compiler rejects is recorded, not raised; the timing
path fills the times; the table marks the fastest launch."""

import os
import sys

import jax
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "experiments"))
import launch_sweep  # noqa: E402


@pytest.fixture
def two_launches(monkeypatch):
  monkeypatch.setattr(launch_sweep, "STAGES", (1, 2))
  monkeypatch.setattr(launch_sweep, "WARPS", (4,))


def _target(kernel, rng_seed):
  [target] = [t for t in launch_sweep.targets(jax.random.key(rng_seed), "tiny", True)
              if t.kernel == kernel]
  return target


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["attention", "sparse_matmul", "topk"])
def test_every_launch_matches_the_default(kernel, two_launches, rng_seed):
  records = launch_sweep.sweep_target(_target(kernel, rng_seed), timing=False,
                                      repeats=1, min_sample_s=0.0)
  assert [(r["num_stages"], r["num_warps"]) for r in records] == [(1, 4), (2, 4)]
  assert all(r["status"] == "PASS" and r["max_error"] == 0 for r in records), records


def test_changed_numbers_fail_and_rejected_launches_are_recorded(two_launches, rng_seed):
  target = _target("sparse_matmul", rng_seed)

  def run(*args, num_stages=None, num_warps=None):
    if num_stages == 2:
      raise ValueError("out of shared memory")
    y = target.run(*args)
    return y * 1.1 if num_stages == 1 else y

  records = launch_sweep.sweep_target(target._replace(run=run), timing=False, repeats=1,
                                      min_sample_s=0.0)
  assert records[0]["status"] == "FAIL" and records[0]["max_error"] > 0.05
  assert records[1]["status"] == "REJECTED"
  assert "out of shared memory" in records[1]["error"]
  table = launch_sweep.markdown_table(records)
  assert "FAIL (0.1)" in table and "REJECTED: ValueError" in table


def test_timing_fills_times_and_marks_the_fastest(two_launches, rng_seed):
  records = launch_sweep.sweep_target(_target("topk", rng_seed), timing=True,
                                      repeats=1, min_sample_s=0.0)
  assert all(r["fwd_s"] > 0 and "fwd_bwd_s" not in r for r in records)
  table = launch_sweep.markdown_table(records)
  assert table.count("**") == 2           # one bold time: the fastest forward


@pytest.mark.slow
def test_device_check_records_the_sweep(tmp_path, two_launches, capsys):
  from conftest import experiment_module
  md = tmp_path / "RESULTS.md"
  with experiment_module("device_check") as dc:
    report = dc.run(mode="tiny", impl="interpret", kernels=["topk"], seed=3,
                    out_dir=str(tmp_path), results_md=str(md), timing=False, sweep=True)
  assert [r["status"] for r in report["sweep"]] == ["PASS"] * 6    # 3 kernels x 2
  assert "# GPU launch sweep" in capsys.readouterr().out
  text = md.read_text()
  assert "GPU launch sweep" in text and text.count("| PASS (0) |") == 6
