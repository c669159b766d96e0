"""Registries of the per-block components a model config can choose by name.

A block's attention, FFN, linear projection and (skip-layer) memory are looked up here,
so a new technique plugs in by registering itself — the model file never changes:

    @registry.register("ffn", "moe", options=MoEOptions)
    def build_moe(cfg: ModelConfig, options: MoEOptions, layer: int) -> nn.Module: ...

`cfg.ffn = "moe"` then selects it, and `cfg.ffn_options` (a mapping) is validated into
`MoEOptions` with errors that name `config.model.ffn_options.<field>`.

An options dataclass lists its kernel-implementation fields in the class attribute
`KERNEL_IMPL_FIELDS` (e.g. `("impl",)`); `build` sets those left at "auto" to the
model's `cfg.kernel_impl` (`--config.model.kernel_impl`), so one flag switches every
kernel of a model without process-wide state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from sparsejax import validation

KINDS = ("attention", "ffn", "linear", "memory")


@dataclasses.dataclass(frozen=True)
class Entry:
  build: Callable[..., Any]          # (cfg, options, layer) -> module (or module class)
  options: type | None = None        # frozen dataclass of the entry's options


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, *, options: type | None = None):
  """Decorator registering `build(cfg, options, layer)` as component `name` of `kind`."""
  if kind not in _REGISTRY:
    raise ValueError(f"kind={kind!r} must be one of {KINDS}")

  def decorator(build):
    if name in _REGISTRY[kind]:
      raise ValueError(f"{kind} {name!r} is already registered")
    _REGISTRY[kind][name] = Entry(build, options)
    return build

  return decorator


def names(kind: str) -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY[kind]))


def parse_options(kind: str, name: str, options: Mapping[str, Any] | None,
                  field: str) -> Any:
  """Validates `options` for component `name` into its options dataclass (or None)."""
  validation.check_choice(f"{field[:field.rfind('_options')]}", name, names(kind))
  entry = _REGISTRY[kind][name]
  if entry.options is None:
    validation.check(not options, field, dict(options or {}),
                     f"empty: {kind} {name!r} takes no options")
    return None
  return validation.from_mapping(entry.options, options or {}, field)


def with_kernel_impl(options: Any, kernel_impl: str) -> Any:
  """`options` with its `KERNEL_IMPL_FIELDS` that are "auto" set to `kernel_impl`."""
  fields = getattr(options, "KERNEL_IMPL_FIELDS", ())
  updates = {f: kernel_impl for f in fields if getattr(options, f) == "auto"}
  return dataclasses.replace(options, **updates) if updates else options


def build(kind: str, name: str, cfg: Any, options: Mapping[str, Any] | None,
          layer: int) -> Any:
  """Builds component `name` of `kind` for block `layer`; options' kernel impls left at
  "auto" become the model's `cfg.kernel_impl`."""
  parsed = parse_options(kind, name, options, f"config.model.{kind}_options")
  if parsed is not None:
    parsed = with_kernel_impl(parsed, cfg.kernel_impl)
  return _REGISTRY[kind][name].build(cfg, parsed, layer)
