"""Compiling for TPU on a CPU host: libtpu's ahead-of-time (AOT) topologies.

`jax.experimental.topologies.get_topology_desc` describes a TPU slice (v4, v5e, v5p,
v6e) without the hardware; jit-compiling for a mesh of its devices runs the real
XLA:TPU and Mosaic compilers (tiling, layouts, SMEM/VMEM allocation) here, as MaxText
AOT-compiles for a pod. Nothing runs: the result is an executable to inspect.

    mesh = tpu_mesh("v5e:2x2", {"data": 2, "tensor": 2})
    compiled = compile_for_tpu(fn, jax.ShapeDtypeStruct(...), mesh=mesh)
    compiled.memory.temp_size_in_bytes, compiled.cost["flops"], compiled.hlo

libtpu (the version jax pins in its `tpu` extra) comes from `make test`, which installs
it off sys.path into `<venv>/libtpu/` (so plain `import jax` never finds it: ordinary
CPU runs neither probe for a TPU nor print libtpu's init messages), or from the
`tpu-aot` extra. Without it the calling test is skipped, saying how to get it.

Run as a script, this file prints that libtpu requirement (for the Makefile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")        # the 4-chip single-host slices tests use
HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5": 95 << 30,
             "TPU v6 lite": 32 << 30}      # per chip, by `device_kind`
LIBTPU_DIR = os.path.join(sys.prefix, "libtpu")   # `make test`'s off-path install

# Set only while libtpu initializes: several processes (pytest-xdist workers) may load
# it at once (else each takes /tmp/libtpu_lockfile), and with no TPU on the host it
# would print host-discovery errors without an accelerator type and worker list.
_INIT_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
             "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}


class TpuCompileError(RuntimeError):
  """A program failed to trace, lower or compile for TPU; the message ends with the
  compiler's own (e.g. Mosaic's "Mosaic failed to compile TPU kernel: ...")."""


def libtpu_requirement() -> str:
  """The libtpu requirement of the installed jax's `tpu` extra, e.g. "libtpu==0.0.42.*"."""
  for req in importlib.metadata.requires("jax") or ():
    name, _, marker = req.partition(";")
    if name.strip().startswith("libtpu") and "tpu" in marker:
      return name.strip()
  raise RuntimeError("the installed jax declares no libtpu in its `tpu` extra")


def _library_path() -> str | None:
  """libtpu.so: $TPU_LIBRARY_PATH, the importable `libtpu` package, or LIBTPU_DIR."""
  if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
    return os.environ["TPU_LIBRARY_PATH"]
  spec = importlib.util.find_spec("libtpu")
  locations = list(spec.submodule_search_locations or ()) if spec else []
  locations.append(os.path.join(LIBTPU_DIR, "libtpu"))
  return next((os.path.join(d, "libtpu.so") for d in locations
               if os.path.isfile(os.path.join(d, "libtpu.so"))), None)


@contextlib.contextmanager
def _environ(values: Mapping[str, str]):
  """Sets the unset ones of `values` in os.environ, restoring them on exit (so test
  subprocesses started later do not inherit a libtpu path)."""
  added = {k: v for k, v in values.items() if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


def _chips_per_host(topology: str) -> tuple[int, int, int]:
  """(x, y, z) chip bounds of a single-host topology name like "v5e:2x2", "v4:2x2x1"."""
  try:
    dims = [int(d) for d in topology.split(":", 1)[1].split("x")]
  except (IndexError, ValueError):
    raise ValueError(f"topology={topology!r} must look like 'v5e:2x2' or 'v4:2x2x1'"
                     ) from None
  if not 2 <= len(dims) <= 3 or min(dims) < 1:
    raise ValueError(f"topology={topology!r} must have 2 or 3 positive chip dims")
  return tuple(dims + [1] * (3 - len(dims)))


@functools.cache
def tpu_devices(topology: str = "v5e:2x2") -> tuple[Any, ...]:
  """The compile-only TPU devices of a single-host slice (`pytest.skip` without libtpu)."""
  import pytest
  from jax.experimental import topologies

  library = _library_path()
  if library is None:
    pytest.skip(f"libtpu is not installed (`make test` installs it into {LIBTPU_DIR}, "
                f"or pip install '{libtpu_requirement()}'): no TPU AOT compilation")
  with _environ({"TPU_LIBRARY_PATH": library, **_INIT_ENV}):
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=_chips_per_host(topology), num_slices=1)
  return tuple(desc.devices)


def tpu_mesh(topology: str = "v5e:2x2", axes: Mapping[str, int] | None = None):
  """The project's ("data", "fsdp", "tensor", "expert") mesh over an AOT TPU slice.

  `axes` are `sparsejax.sharding.MeshConfig` sizes (default: all chips on "data"; one
  axis may be -1 = the remaining chips), e.g. {"data": 1, "fsdp": 2, "tensor": 2}.
  """
  from sparsejax import sharding
  return sharding.make_mesh(sharding.MeshConfig(**(axes or {"data": -1})),
                            tpu_devices(topology))


@dataclasses.dataclass(frozen=True)
class TpuCompiled:
  """A program compiled for TPU: the executable, its memory and cost analyses."""
  executable: Any                 # jax.stages.Compiled
  memory: Any                     # CompiledMemoryStats: argument/output/temp bytes per chip
  cost: dict[str, float]          # XLA's estimate: "flops", "bytes accessed", ...

  @property
  def hlo(self) -> str:
    """The optimized HLO (Pallas kernels appear as tpu_custom_call)."""
    return self.executable.as_text()


def compile_for_tpu(fn: Callable, *abstract_args, mesh, in_shardings=None,
                    out_shardings=None) -> TpuCompiled:
  """Compiles `fn` for the TPU devices of `mesh` (from `tpu_mesh`).

  `fn` is a function (jitted here with the given shardings) or an already jitted one
  (used as is, e.g. a Trainer's train step). `abstract_args` are `jax.ShapeDtypeStruct`s
  (optionally with shardings) or pytrees of them. Tracing happens inside
  `jax.set_mesh(mesh)`, so the ops' kernel dispatch sees a TPU platform. Raises
  TpuCompileError naming the stage (trace / lower / compile), the function and the
  chip, with the compiler's message.
  """
  import jax

  shardings = {k: v for k, v in (("in_shardings", in_shardings),
                                 ("out_shardings", out_shardings)) if v is not None}
  jitted = fn if hasattr(fn, "trace") and not shardings else jax.jit(fn, **shardings)
  name = getattr(fn, "__name__", repr(fn))
  chip = f"{mesh.devices.flat[0].device_kind} x{mesh.devices.size}"
  stage = "trace"
  try:
    with jax.set_mesh(mesh):
      traced = jitted.trace(*abstract_args)
      stage = "lower"
      lowered = traced.lower()
      stage = "compile"
      executable = lowered.compile()
  except Exception as e:  # noqa: BLE001 - re-raised with context, cause kept
    raise TpuCompileError(f"{stage} of {name} for {chip} failed: "
                          f"{type(e).__name__}: {e}") from e
  return TpuCompiled(executable, executable.memory_analysis(),
                     dict(executable.cost_analysis() or {}))


if __name__ == "__main__":
  print(libtpu_requirement())
