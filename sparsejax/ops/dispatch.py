"""Choosing between the XLA reference and the Pallas kernels of an op (`impl=`).

`impl` is one of:
  "auto"       the Pallas kernel on TPU/GPU, XLA on CPU (or the global default, below);
  "xla"        the pure-JAX reference implementation;
  "pallas"     the compiled Pallas kernel (TPU Mosaic or GPU Triton by backend);
  "interpret"  the Pallas kernel in interpret mode (how CPU tests check kernels).

`set_default_impl("xla")` makes every `impl="auto"` call in a model resolve to that
value; it is what the `--config.kernels.impl` flag sets.
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "xla", "pallas", "interpret")
_default_impl = "auto"


def set_default_impl(impl: str) -> None:
  """Sets what `impl="auto"` resolves to for every op (`"auto"` restores by-backend)."""
  global _default_impl
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
  _default_impl = impl


def get_default_impl() -> str:
  return _default_impl


def resolve_impl(impl: str) -> str:
  """Returns the concrete implementation ("xla" | "pallas" | "interpret") for `impl`."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
  if impl == "auto":
    impl = _default_impl
  if impl == "auto":
    impl = "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
  return impl
