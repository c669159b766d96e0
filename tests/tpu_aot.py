"""Compiling for TPU on a CPU host in the tests: libtpu's ahead-of-time (AOT) topologies.

The machinery lives in `sparsejax.scaling.tpu` (the pod-planning CLI
experiments/aot_compile.py uses it too); this module adds what the tests need: the
slices they compile for, per-chip HBM, and a `pytest.skip` (saying how to install
libtpu) instead of an error when libtpu is missing.

    mesh = tpu_mesh("v5e:2x2", {"data": 2, "tensor": 2})
    compiled = compile_for_tpu(fn, jax.ShapeDtypeStruct(...), mesh=mesh)
    compiled.memory.temp_size_in_bytes, compiled.cost["flops"], compiled.hlo

libtpu (the version jax pins in its `tpu` extra) comes from `make test` / `make
aot-deps`, which install it off sys.path into `<venv>/libtpu/` (so plain `import jax`
never finds it), or from the `tpu-aot` extra.

Run as a script, this file prints that libtpu requirement (for the Makefile).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from sparsejax.scaling import roofline, tpu
from sparsejax.scaling.tpu import (LIBTPU_DIR, TpuCompileError, TpuCompiled,  # noqa: F401
                                   compile_for_tpu, libtpu_requirement)

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")        # the 4-chip single-host slices tests use
HBM_BYTES = {"TPU v4": 32 << 30,           # per chip, by `device_kind`
             **{kind: chip.hbm_bytes for kind, chip in roofline.CHIPS.items()}}

_library_path = tpu.library_path           # tests replace it to simulate a missing libtpu


@functools.cache
def tpu_devices(topology: str = "v5e:2x2") -> tuple[Any, ...]:
  """The compile-only TPU devices of a slice (`pytest.skip` without libtpu)."""
  import pytest

  if _library_path() is None:
    pytest.skip(tpu.missing_message())
  return tpu.tpu_devices(topology)


def tpu_mesh(topology: str = "v5e:2x2", axes: Mapping[str, int] | None = None):
  """The project's ("data", "fsdp", "tensor", "expert") mesh over an AOT TPU slice.

  `axes` are `sparsejax.sharding.MeshConfig` sizes (default: all chips on "data"; one
  axis may be -1 = the remaining chips), e.g. {"data": 1, "fsdp": 2, "tensor": 2}.
  """
  tpu_devices(topology)                    # skips without libtpu
  return tpu.tpu_mesh(topology, axes)


if __name__ == "__main__":
  print(libtpu_requirement())
