"""Tests of experiments/device_check.py on CPU: the no-accelerator exit, the --interpret
run (every kernel checked, JSON and markdown written), that perturbed kernels really
FAIL (forward, backward only, and an exception that must not hide the other kernels),
the timing/roofline path, and the chip table."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, experiment_module, run_main


def test_cpu_run_needs_accelerator_and_exits_zero():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments",
                                                      "device_check.py")],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "needs an accelerator" in proc.stdout
  assert "Kernel modules: all import." in proc.stdout


def _fewer_blocks(dc, monkeypatch):
  """The --interpret (tiny) attention and NSA cases at 2 × 2 blocks of 32 (T = 64,
  instead of 4 × 4) and 3 selection blocks of 16 (T = 48, instead of 4): still several
  blocks per axis (full, partial and empty tiles; selection among blocks) at fewer
  interpret-mode grid steps."""
  tiny = dict(dc.SIZES["tiny"], attention=(1, 64, 2, 1, 16, 32),
              nsa=(1, 48, 2, 1, 16, 16, 2))
  monkeypatch.setitem(dc.SIZES, "tiny", tiny)


@pytest.mark.slow
def test_interpret_run_checks_every_kernel(tmp_path, capsys, monkeypatch):
  md = tmp_path / "RESULTS.md"
  with experiment_module("device_check") as dc:
    _fewer_blocks(dc, monkeypatch)
    run_main(dc, ["device_check", "--interpret", f"--out_dir={tmp_path}",
                  f"--results_md={md}", "--seed=7"])
    out = capsys.readouterr().out
    assert "DEVICE CHECK PASSED: 12/12 cases" in out
    [path] = tmp_path.glob("device_check_cpu_*.json")
    report = json.loads(path.read_text())
    assert report["header"]["seed"] == 7 and report["header"]["impl"] == "interpret"
    records = report["records"]
    assert {r["kernel"] for r in records} == set(dc.KERNELS)
    assert {r["dtype"] for r in records} == {"float32", "bfloat16"}
    for r in records:
      assert r["status"] == "PASS", r
      assert {"out", "out (vjp)"} < set(r["errors"]) and len(r["errors"]) >= 3
      assert r["bytes_fwd"] > 0 and r["bytes_fwd_bwd"] >= r["bytes_fwd"]
    text = md.read_text()
    assert "## Device check: cpu (cpu)" in text and "DEVICE CHECK PASSED" in text
    assert text.count("| **PASS** |") == 12
    # A JSON from another machine is appended with --record_from.
    md2 = tmp_path / "other.md"
    run_main(dc, ["device_check", f"--record_from={path}", f"--results_md={md2}"])
  assert md2.read_text() == text


def _grad_scaled(y, factor):
  """y in the forward pass; the gradient scaled by `factor` in the backward pass."""
  @jax.custom_vjp
  def f(y):
    return y

  f.defvjp(lambda y: (y, None), lambda _, g: (g * factor,))
  return f(y)


@pytest.mark.slow
def test_perturbed_kernels_fail(tmp_path, capsys, monkeypatch):
  """A one-entry forward change (topk), a 10% backward-only change (memory lookup,
  forward untouched) and an exception (attention) are all reported FAIL, exit 1; the
  exception does not hide the other kernels."""
  with experiment_module("device_check") as dc:
    _fewer_blocks(dc, monkeypatch)
    topk, lookup = dc.topk_sparsify, dc.memory_lookup
    attention = dc.block_sparse_attention

    def bad_topk(x, k, *, impl, **kw):
      y = topk(x, k, impl=impl, **kw)
      return y if impl == "xla" else y.at[0, 0].add(1)

    def bad_lookup(*args, impl, **kw):
      y = lookup(*args, impl=impl, **kw)
      return y if impl == "xla" else _grad_scaled(y, 1.1)

    def broken_attention(*args, impl, **kw):
      if impl == "xla":
        return attention(*args, impl=impl, **kw)
      raise RuntimeError("kernel exploded")

    monkeypatch.setattr(dc, "topk_sparsify", bad_topk)
    monkeypatch.setattr(dc, "memory_lookup", bad_lookup)
    monkeypatch.setattr(dc, "block_sparse_attention", broken_attention)
    out_json = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_info:
      run_main(dc, ["device_check", "--interpret", "--kernels=topk,memory,attention",
                    f"--out={out_json}"])
  assert exit_info.value.code == 1
  out = capsys.readouterr().out
  assert "DEVICE CHECK FAILED: 8 of 8 cases" in out
  assert "RuntimeError: kernel exploded" in out
  records = json.loads(out_json.read_text())["records"]
  kernels = [r["kernel"] for r in records]
  assert kernels == ["topk"] * 2 + ["memory"] * 2 + ["attention"] * 4
  assert all(r["status"] == "FAIL" for r in records)
  for r in records[:2]:
    assert any("differ bitwise" in f for f in r["failures"])
  for r in records[2:4]:        # forward fine, both gradients 10% off
    err, tol = r["errors"], r["tolerance"]
    assert err["out"] <= tol and err["out (vjp)"] <= tol
    assert err["dvalues"] > tol and err["dweights"] > tol


def test_timing_and_roofline(tmp_path, monkeypatch):
  """The timed path (as on an accelerator, here on the interpret kernel) with a chip's
  roofline: medians, ratios and fractions are filled in and rendered."""
  with experiment_module("device_check") as dc:
    h200 = ("H200", dc.ROOFLINES["H200"])
    monkeypatch.setattr(dc, "chip_roofline", lambda kind: h200)
    report = dc.run(mode="tiny", impl="interpret", kernels=["topk"], repeats=2,
                    min_sample_ms=0.0, seed=3, out=str(tmp_path / "t.json"),
                    timing=True)
    table = dc.format_table(report["records"])
  for r in report["records"]:
    assert r["status"] == "PASS"
    for m in ("pallas_fwd", "xla_fwd", "pallas_fwd_bwd", "xla_fwd_bwd"):
      assert r[f"{m}_s"] > 0 and len(r["times_s"][m]) == 2
    assert r["ideal_fwd_s"] == pytest.approx(r["bytes_fwd"] / 4.8e12)
    fraction = r["ideal_fwd_s"] / r["pallas_fwd_s"]
    assert 0 < r["pallas_fwd_roofline"] == pytest.approx(fraction)
  assert "%" in table and "×" in table


@pytest.mark.parametrize("kind,chip", [
    ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", None), ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"), ("TPU v4", "TPU v4"), ("cpu", None)])
def test_chip_roofline(kind, chip):
  with experiment_module("device_check") as dc:
    name, roof = dc.chip_roofline(kind)
  assert name == chip
  if chip:
    assert roof["hbm"] > 0 and roof["bfloat16"] >= roof["float32"] > 0


def test_compare_flags_nonfinite_and_shape():
  with experiment_module("device_check") as dc:
    ref = jnp.ones((4, 4), jnp.float32)
    assert dc.compare("x", ref * 1.0001, ref, 2e-4, False)[1] is None
    assert "> 0.0002" in dc.compare("x", ref * 1.001, ref, 2e-4, False)[1]
    nan = ref.at[1, 1].set(jnp.nan)
    assert "non-finite" in dc.compare("x", nan, ref, 2e-4, False)[1]
    assert "reference is not finite" in dc.compare("x", ref, nan, 2e-4, False)[1]
    assert "reference" in dc.compare("x", ref[:3], ref, 2e-4, False)[1]
    assert dc.compare("x", ref, ref + 0.0, 0.0, True)[1] is None
    zero = jnp.zeros((4,), jnp.bfloat16)
    assert "25.000% of entries differ" in dc.compare("x", zero.at[1].set(-0.0), zero,
                                                     0.0, True)[1]
