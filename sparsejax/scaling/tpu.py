"""Compiling for a TPU slice on a CPU host: libtpu's ahead-of-time (AOT) topologies.

`jax.experimental.topologies.get_topology_desc` describes a TPU slice (v4, v5e, v5p,
v6e; one host or a whole pod) without the hardware; jit-compiling for a mesh of its
devices runs the real XLA:TPU and Mosaic compilers (SPMD partitioning, tiling, layouts,
SMEM / VMEM allocation) here, as MaxText's `train_compile` does. Nothing runs: the result
is a per-chip executable to inspect.

    mesh = tpu_mesh("v5p:4x4x4", MeshConfig(data=1, fsdp=16, tensor=4))
    compiled = compile_for_tpu(fn, jax.ShapeDtypeStruct(...), mesh=mesh)
    compiled.memory.temp_size_in_bytes, compiled.cost["flops"], compiled.hlo

libtpu must be the version the installed jax pins in its `tpu` extra
(`libtpu_requirement()`). It is found at $TPU_LIBRARY_PATH, as an importable `libtpu`
package (`pip install 'jax[tpu]'`), or in `<venv>/libtpu/` (`make aot-deps` installs it
there, off sys.path, so plain `import jax` never probes for a TPU on a CPU machine).
Without it, `tpu_devices` raises `LibtpuMissingError` saying how to install it.
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

LIBTPU_DIR = os.path.join(sys.prefix, "libtpu")   # `make aot-deps`'s off-path install
HOST_BOUNDS = (2, 2, 1)   # chips per host of a multi-host slice (v4, v5e, v5p, v6e pods)
MAX_SINGLE_HOST_CHIPS = 8

# Set only while libtpu initializes: several processes (pytest-xdist workers) may load
# it at once (else each takes /tmp/libtpu_lockfile), and with no TPU on the host it
# would print host-discovery errors without an accelerator type and worker list.
_INIT_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
             "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}


class LibtpuMissingError(FileNotFoundError):
  """libtpu.so was not found, so no TPU program can be compiled on this host."""


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


def library_path() -> str | None:
  """libtpu.so: $TPU_LIBRARY_PATH, the importable `libtpu` package, or LIBTPU_DIR."""
  if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
    return os.environ["TPU_LIBRARY_PATH"]
  spec = importlib.util.find_spec("libtpu")
  locations = list(spec.submodule_search_locations or ()) if spec else []
  locations.append(os.path.join(LIBTPU_DIR, "libtpu"))
  return next((os.path.join(d, "libtpu.so") for d in locations
               if os.path.isfile(os.path.join(d, "libtpu.so"))), None)


def missing_message() -> str:
  """How to get libtpu (the text of LibtpuMissingError and of the tests' skip)."""
  return (f"libtpu is not installed (`make aot-deps` installs it into {LIBTPU_DIR}, "
          f"or pip install '{libtpu_requirement()}'): no TPU AOT compilation")


@contextlib.contextmanager
def _environ(values: Mapping[str, str]):
  """Sets the unset ones of `values` in os.environ, restoring them on exit (so
  subprocesses started later do not inherit a libtpu path)."""
  added = {k: v for k, v in values.items() if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


def topology_dims(topology: str) -> tuple[int, int, int]:
  """(x, y, z) chips of a topology name like "v5e:2x2", "v5p:4x4x4", "v6e:16x16"."""
  try:
    dims = [int(d) for d in topology.split(":", 1)[1].split("x")]
  except (IndexError, ValueError):
    raise ValueError(f"topology={topology!r} must look like 'v5e:2x2' or 'v5p:4x4x4'"
                     ) from None
  if not 2 <= len(dims) <= 3 or min(dims) < 1:
    raise ValueError(f"topology={topology!r} must have 2 or 3 positive chip dims")
  return tuple(dims + [1] * (3 - len(dims)))


def _chips_per_host(topology: str) -> tuple[int, int, int]:
  """A slice of <= 8 chips is one host; larger ones are hosts of HOST_BOUNDS chips."""
  dims = topology_dims(topology)
  if dims[0] * dims[1] * dims[2] <= MAX_SINGLE_HOST_CHIPS:
    return dims
  if any(d % h for d, h in zip(dims, HOST_BOUNDS)):
    raise ValueError(f"topology={topology!r}: a multi-host slice needs chip dims "
                     f"divisible by the {HOST_BOUNDS} chips of a host")
  return HOST_BOUNDS


@functools.cache
def tpu_devices(topology: str = "v5e:2x2") -> tuple[Any, ...]:
  """The compile-only TPU devices of a slice (LibtpuMissingError without libtpu)."""
  from jax.experimental import topologies

  library = library_path()
  if library is None:
    raise LibtpuMissingError(missing_message())
  with _environ({"TPU_LIBRARY_PATH": library, **_INIT_ENV}):
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=_chips_per_host(topology), num_slices=1)
  return tuple(desc.devices)


def tpu_mesh(topology: str = "v5e:2x2", axes: Mapping[str, int] | Any = None):
  """The project's ("data", "fsdp", "tensor", "expert") mesh over an AOT TPU slice.

  `axes` is a `sparsejax.sharding.MeshConfig` or a mapping of its sizes (default: all
  chips on "data"; one axis may be -1 = the remaining chips), e.g.
  {"data": 1, "fsdp": 2, "tensor": 2}. Like `sharding.make_mesh`, but a mesh axis may
  split a physical axis of the torus (fsdp 8 × expert 8 on a 4x4x4 v5p).
  """
  import jax
  from jax.experimental import mesh_utils

  from sparsejax import sharding
  if not isinstance(axes, sharding.MeshConfig):
    axes = sharding.MeshConfig(**(axes or {"data": -1}))
  devices = tpu_devices(topology)
  grid = mesh_utils.create_device_mesh(axes.shape(len(devices)), devices,
                                       allow_split_physical_axes=True)
  auto = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
  return jax.sharding.Mesh(grid, sharding.MESH_AXES, axis_types=auto)


@dataclasses.dataclass(frozen=True)
class TpuCompiled:
  """A program compiled for TPU: the executable, its memory and cost analyses."""
  executable: Any                 # jax.stages.Compiled
  memory: Any                     # CompiledMemoryStats: argument/output/temp bytes per chip
  cost: dict[str, float]          # XLA's per-chip estimate: "flops", "bytes accessed", ...

  @property
  def hlo(self) -> str:
    """The optimized per-chip HLO (Pallas kernels appear as tpu_custom_call)."""
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
