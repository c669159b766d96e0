"""Whole sharded train steps compiled for TPU (libtpu AOT, tests/tpu_aot.py).

Each experiment config (its own widths and batch, 2 blocks), with model.kernel_impl="pallas"
(every layer's kernel impl left at "auto" becomes the Mosaic kernel), builds its
`Trainer` on an 8-chip v5e / v6e slice as data × fsdp × tensor = 2 × 2 × 2, and its
jitted train step (forward, backward, optimizer update; params, optimizer state and
batch sharded as in training) is compiled by XLA:TPU and Mosaic. A Pallas call that is
not inside a `jax.shard_map` fails here ("Mosaic kernels cannot be automatically
partitioned"), as do tiling and SMEM / VMEM errors of the kernels at the configs'
shapes. 4-25 s per compile on a 2-core CPU: all `slow`; one config per kernel family
on v5e (PKM reads its table with UltraMem's memory-lookup kernel) —
tests/kernels/test_tpu_compile.py compiles every kernel on v5e and v6e.
"""

import os
import runpy

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import Trainer
from tpu_aot import HBM_BYTES, compile_for_tpu, tpu_mesh

CONFIGS = ["dense", "qsparse", "bitnet_qsparse", "moe", "ultramem", "local_global", "nsa"]
CASES = [("v5e:2x4", name) for name in CONFIGS]
MESH = {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def trainer_for(name: str, topology: str) -> Trainer:
  """The config's Trainer with Pallas kernels on an AOT TPU mesh."""
  config = runpy.run_path(os.path.join(REPO, "experiments", "configs", f"{name}.py")
                          )["get_config"]()
  config.model.kernel_impl = "pallas"
  config.model.num_layers = 2                 # compile time grows with the depth
  if config.model.get("memory", "none") != "none":
    config.model.memory_layers = "0:1"
  config.mesh = MESH
  return Trainer(parse_config(config), mesh=tpu_mesh(topology, MESH))


@pytest.mark.slow
@pytest.mark.parametrize("topology,name", CASES)
def test_train_step_compiles(topology, name):
  trainer = trainer_for(name, topology)
  data = trainer.config.data
  tokens = jax.ShapeDtypeStruct((data.batch_size, data.seq_len), jnp.int32)
  with trainer.activate():
    compiled = compile_for_tpu(trainer._train_step, trainer.abstract_state,
                               {"inputs": tokens, "targets": tokens}, mesh=trainer.mesh)
  mem = compiled.memory
  used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  assert used <= HBM_BYTES[trainer.mesh.devices.flat[0].device_kind]
  if name != "dense":                       # the config's sparse ops ran as kernels
    assert "tpu_custom_call" in compiled.hlo
