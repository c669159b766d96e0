"""Choosing between the XLA reference and the Pallas kernels of an op (`impl=`).

`impl` is one of:
  "auto"       the Pallas kernel on TPU/GPU when its shape constraints are met, else XLA
               (on TPU/GPU with one warning per op and reason); XLA on CPU;
  "xla"        the pure-JAX reference implementation;
  "pallas"     the compiled Pallas kernel (TPU Mosaic or GPU Triton by platform);
  "interpret"  the Pallas kernel in interpret mode (how CPU tests check kernels).

Every op resolves its `impl` with `resolve_impl` — there is no process-wide default:
a model passes its choice down explicitly (`config.model.kernel_impl` becomes every
layer's kernel `impl` left at "auto"). The platform is, in order: the one named by a
`target_platform(...)` context (to trace on CPU a program that will be lowered for TPU
or CUDA, e.g. `.lower(lowering_platforms=("cuda",))`), that of the mesh in context
(`jax.set_mesh` over the TPU devices of an AOT topology counts as TPU), else
`jax.default_backend()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import jax

IMPLS = ("auto", "xla", "pallas", "interpret")
_warned: set[tuple[str, str]] = set()
_target: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


@contextlib.contextmanager
def target_platform(name: str):
  """Context: trace for platform `name` ("tpu" | "gpu") whatever the devices here are."""
  if name not in ("tpu", "gpu"):
    raise ValueError(f"target platform {name!r} must be 'tpu' or 'gpu'")
  token = _target.set(name)
  try:
    yield
  finally:
    _target.reset(token)


def check_impl(impl: str, field: str = "impl") -> None:
  if impl not in IMPLS:
    raise ValueError(f"{field}={impl!r} must be one of {IMPLS}")


def platform() -> str:
  """"tpu" | "gpu" | "cpu": `target_platform`'s, else the mesh's in context, else the
  default backend's."""
  if _target.get() is not None:
    return _target.get()
  mesh = jax.sharding.get_abstract_mesh()
  name = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)


def kernel_platform() -> str:
  """The kernel family to run: "gpu" (Triton) on GPU, else "tpu" (Mosaic; interpreted
  on CPU)."""
  return "gpu" if platform() == "gpu" else "tpu"


def resolve_impl(impl: str, *, op: str, unmet: str | None = None) -> str:
  """The concrete implementation ("xla" | "pallas" | "interpret") of `op` for `impl`.

  `unmet` is the reason the kernel cannot take these inputs (a shape or dtype
  constraint, stated by the op), or None when it can. "auto" then falls back to XLA;
  an explicit "pallas" / "interpret" raises ValueError naming the op and the reason.
  "pallas" on a platform other than TPU/GPU raises too.
  """
  check_impl(impl)
  on_accelerator = platform() in ("tpu", "gpu")
  if impl == "auto":
    if not on_accelerator:
      return "xla"
    if unmet is not None:
      if (op, unmet) not in _warned:
        _warned.add((op, unmet))
        warnings.warn(f"{op}: the Pallas kernel does not apply ({unmet}); using the "
                      "XLA implementation", stacklevel=3)
      return "xla"
    return "pallas"
  if impl == "xla":
    return impl
  if unmet is not None:
    raise ValueError(f"{op}: impl={impl!r} cannot run these inputs: {unmet}; use "
                     "impl='auto' or 'xla'")
  if impl == "pallas" and not on_accelerator:
    raise ValueError(f"{op}: impl='pallas' needs a TPU or GPU (platform is "
                     f"{platform()!r}); use impl='interpret' to run the kernel on CPU")
  return impl
