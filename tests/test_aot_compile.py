"""Planning pod runs on paper (sparsejax.scaling, experiments/aot_compile.py).

The tiny config's train and decode steps compiled for a 4-chip v5e slice: the CLI's
report has every field, its numbers agree with independent counts (per-chip shard bytes
of the train state, the accounting module's FLOPs formula, depth extrapolation against
a real deeper compile, collectives of a hand-built program), and a model too big for a
chip fails naming its biggest buffers. Skipped only without libtpu (tests/tpu_aot.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO, tiny_config_dict
from sparsejax.models import accounting
from sparsejax.scaling import hlo, roofline, tpu
from sparsejax.scaling.plan import HbmOverflowError, plan
from sparsejax.train.config import parse_config
import tpu_aot

TOPOLOGY = "v5e:2x2"
MESH = {"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}
STEP_FIELDS = {"memory_bytes", "flops_per_chip", "hbm_bytes_per_chip", "collectives",
               "collective_bytes_per_chip", "ici_bytes_sent_per_chip", "largest_buffers",
               "roofline", "tokens", "tokens_per_s", "mfu"}
MEMORY_FIELDS = {"argument", "output", "alias", "temp", "total", "hbm",
                 "fraction_of_hbm"}


def tiny(**model):
  sizes = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)
  return parse_config(tiny_config_dict(model={**sizes, **model}, mesh=MESH))


@pytest.fixture(scope="module")
def report():
  tpu_aot.tpu_devices(TOPOLOGY)                 # skips without libtpu
  return plan(tiny(), TOPOLOGY, decode_batch=0)


@pytest.mark.slow
def test_cli_report_has_every_field(tmp_path):
  tpu_aot.tpu_devices(TOPOLOGY)
  out = tmp_path / "tiny.json"
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "aot_compile.py"),
       f"--config={os.path.join(REPO, 'experiments', 'configs', 'tiny.py')}",
       f"--topology={TOPOLOGY}", "--config.mesh.data=2", "--config.mesh.tensor=2",
       "--decode_batch=2", f"--output={out}"],
      capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  report = json.loads(out.read_text())
  assert {"topology", "chip", "num_chips", "mesh", "chip_peaks", "total_params",
          "activated_params", "model_flops_per_token", "train", "decode",
          "decode_param_bytes_per_token", "extrapolated"} <= set(report)
  for step in ("train", "decode"):
    assert STEP_FIELDS <= set(report[step]), step
    assert MEMORY_FIELDS <= set(report[step]["memory_bytes"])
    assert set(report[step]["collectives"]) == set(hlo.OPS)
    assert report[step]["roofline"]["step_s"] > 0
  assert report["num_chips"] == 4 and report["chip"] == "v5e"
  assert report["mesh"] == MESH
  for words in ("memory per chip", "collectives:", "roofline:", "tokens/s",
                "decode param bytes per token"):
    assert words in run.stdout


@pytest.mark.slow
def test_memory_holds_the_sharded_train_state(report):
  """Arguments per chip >= the train state's per-chip shard bytes (tiling pads)."""
  config = tiny()
  from sparsejax.train.trainer import Trainer
  trainer = Trainer(config, mesh=tpu_aot.tpu_mesh(TOPOLOGY, MESH))
  shards = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(
      jax.tree.leaves(trainer.abstract_state), jax.tree.leaves(trainer.state_shardings)))
  memory = report["train"]["memory_bytes"]
  assert shards <= memory["argument"] <= 64 * shards
  assert memory["alias"] > 0                     # the donated state
  assert memory["total"] == pytest.approx(memory["argument"] + memory["output"]
                                          - memory["alias"] + memory["temp"])
  assert memory["hbm"] == 16 << 30


def test_flops_match_the_accounting_formula(report):
  """XLA's FLOPs of all chips vs 3 × forward model FLOPs (fwd + 2 × bwd) per token."""
  config = tiny()
  model = 3 * accounting.flops_per_token(config.model, config.data.seq_len)
  assert report["model_flops_per_token"] * 3 == pytest.approx(model)
  xla = report["train"]["xla_flops_per_token"]
  assert 0.9 * model <= xla <= 2.0 * model
  roof = report["train"]["roofline"]
  spec = roofline.CHIPS["TPU v5 lite"]
  assert roof["compute_s"] == pytest.approx(report["train"]["flops_per_chip"]
                                            / spec.peak_flops)
  assert roof["step_s"] == max(roof["compute_s"], roof["hbm_s"], roof["ici_s"])


@pytest.mark.slow                       # three compiles, ~25 s on a 2-core CPU
def test_extrapolated_depth_matches_a_full_compile():
  """Counts fitted at 1 and 2 blocks, extrapolated to 3, vs compiling 3 blocks."""
  tpu_aot.tpu_devices(TOPOLOGY)
  config = tiny(num_layers=3)
  fitted = plan(config, TOPOLOGY, decode_batch=0, fit_layers=(1, 2))["train"]
  exact = plan(config, TOPOLOGY, decode_batch=0)["train"]
  assert fitted["flops_per_chip"] == pytest.approx(exact["flops_per_chip"], rel=0.02)
  for field in ("argument", "output"):
    assert fitted["memory_bytes"][field] == pytest.approx(exact["memory_bytes"][field],
                                                          rel=0.02)
  assert fitted["collective_bytes_per_chip"] == pytest.approx(
      exact["collective_bytes_per_chip"], rel=0.05)


def test_collectives_of_a_known_program():
  """An all-gather and a psum over 4 chips: counts, result bytes and bytes sent."""
  mesh = tpu_aot.tpu_mesh(TOPOLOGY, {"data": 4})
  rows, cols = 64, 256

  def fn(x):
    gathered = jax.lax.all_gather(x, "data", tiled=True)       # [rows, cols] f32
    return gathered, jax.lax.psum(x * 2.0, "data")              # [rows/4, cols] f32

  mapped = jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=(P(), P("data")),
                         check_vma=False)
  arg = jax.ShapeDtypeStruct((rows, cols), jnp.float32,
                             sharding=NamedSharding(mesh, P("data")))
  compiled = tpu_aot.compile_for_tpu(mapped, arg, mesh=mesh)
  stats = hlo.collectives(compiled.hlo, 4)
  ag, ar = stats["all-gather"], stats["all-reduce"]
  gather_bytes, shard_bytes = rows * cols * 4, rows * cols * 4 // 4
  if ag.count == 0:               # XLA:TPU may lower the gather as an all-reduce
    assert ar.count >= 2 and ar.bytes == gather_bytes + shard_bytes
  else:
    assert ag.count == 1 and ag.bytes == gather_bytes
    assert ag.sent_bytes == pytest.approx(gather_bytes * 3 / 4)
    assert ar.count == 1 and ar.bytes == shard_bytes
    assert ar.sent_bytes == pytest.approx(2 * shard_bytes * 3 / 4)


def test_hlo_parsing_of_replica_group_forms():
  text = "\n".join([
      "  %a = bf16[8,128]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1},{2,3}}",
      "  %b = (f32[16]{0}, s32[4]{0}) all-reduce(%y, %z), replica_groups=[2,4]<=[8]",
      "  %c = f32[10]{0} reduce-scatter(%w), replica_groups=mesh['a'=2,'b'=4] {'b'}",
      "  %d = bf16[2,2]{1,0} collective-permute(%v), source_target_pairs={{0,1}}",
      "  ROOT %e = f32[3]{0} add(%c, %c)"])
  stats = hlo.collectives(text, 8)
  assert (stats["all-gather"].count, stats["all-gather"].bytes) == (1, 8 * 128 * 2)
  assert stats["all-gather"].sent_bytes == pytest.approx(2048 / 2)
  assert stats["all-reduce"].bytes == 16 * 4 + 4 * 4
  assert stats["all-reduce"].sent_bytes == pytest.approx(80 * 2 * 3 / 4)
  assert stats["reduce-scatter"].sent_bytes == pytest.approx(40 * 3)
  assert stats["collective-permute"].sent_bytes == 8
  assert stats["all-to-all"].count == 0
  assert hlo.largest_buffers(text, top=1)[0][0] == 2048


def test_too_big_for_the_chip_names_the_biggest_buffers():
  """A 2-block model with a 1.6B-param embedding replicated on 16 GiB v5e chips."""
  tpu_aot.tpu_devices(TOPOLOGY)
  config = parse_config(tiny_config_dict(
      model=dict(vocab_size=200_000, d_model=8192, num_layers=2, num_heads=4,
                 num_kv_heads=2, tie_embeddings=True), mesh={"data": -1}))
  with pytest.raises(HbmOverflowError, match=r"(?s)train step needs .* more than the 16 "
                     r"GiB HBM of a v5e chip.*Biggest arguments per chip: [0-9.]+ GiB "
                     r".*'embedding'"):
    plan(config, TOPOLOGY, decode_batch=0)


def test_batch_that_does_not_split_over_the_chips_names_the_field():
  """6 sequences on the 4 data-parallel chips of a v5e 2x2: a named ConfigError before
  any trace (not jax's IndivisibleError from inside the compile)."""
  tpu_aot.tpu_devices(TOPOLOGY)
  config = parse_config(tiny_config_dict(data=dict(batch_size=6, seq_len=32),
                                         mesh={"data": -1}))
  with pytest.raises(ValueError, match=r"config\.data\.batch_size=6 .*divisible by the 4 "
                                       r"data-parallel devices"):
    plan(config, TOPOLOGY, decode_batch=0)


def test_decode_param_bytes_follow_the_routing_expectation():
  """MoE: every param but the experts', + E·(1 − (1 − k/E)^B) experts, in bf16."""
  config = tiny(ffn="moe", ffn_options=dict(num_experts=8, top_k=2, d_expert=16))
  from sparsejax.scaling.plan import decode_param_bytes_per_token
  params = accounting.abstract_params(config.model)
  leaves = {jax.tree_util.keystr(p): np.prod(a.shape) for p, a in
            jax.tree_util.tree_flatten_with_path(params)[0]}
  expert = sum(n for k, n in leaves.items() if any(w in k for w in ("w_gate", "w_up",
                                                                    "w_down")))
  rest = sum(leaves.values()) - expert
  for batch in (1, 4, 64):
    used = 8 * (1 - (1 - 2 / 8) ** batch) / 8
    want = (rest + expert * used) * 2 / batch
    assert decode_param_bytes_per_token(config, params, batch) == pytest.approx(want)


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(tpu, "library_path", lambda: None)
  with pytest.raises(tpu.LibtpuMissingError, match=r"make aot-deps.*pip install "
                     r"'libtpu==[0-9.]+\*'"):
    tpu.tpu_devices("v6e:4x2")                     # not cached by an earlier test
