"""Typed config validation: mappings -> frozen dataclasses, with errors naming the field.

Every config section is a frozen dataclass. `from_mapping` builds one from a plain mapping
(an `ml_collections.ConfigDict` or dict), rejecting unknown keys and wrong types, and then
calls the dataclass's own `validate()` (if it has one) for range checks. Errors always
name the full dotted field, e.g. `config.model.num_heads`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import flax.core

T = TypeVar("T")


class ConfigError(ValueError):
  """A config value is missing, unknown, of the wrong type or out of range."""


def check(condition: bool, field: str, value: Any, allowed: str) -> None:
  """Raises `ConfigError` "`field`=`value` ... must be `allowed`" unless `condition`."""
  if not condition:
    raise ConfigError(f"{field}={value!r} is invalid: must be {allowed}")


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
  check(value in choices, field, value, f"one of {sorted(choices)}")


def _coerce(field: str, value: Any, annotation: Any) -> Any:
  """Coerces `value` to `annotation` (int, float, bool, str, tuple, nested dataclass)."""
  origin = typing.get_origin(annotation)
  if dataclasses.is_dataclass(annotation):
    return from_mapping(annotation, value, field)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None:
      return None
    return _coerce(field, value, args[0])
  if origin is tuple:
    check(isinstance(value, (list, tuple)), field, value, "a list or tuple")
    args = typing.get_args(annotation)
    elem = args[0] if args else Any
    return tuple(_coerce(f"{field}[{i}]", v, elem) for i, v in enumerate(value))
  if origin in (dict, Mapping) or annotation in (dict, Mapping):
    check(isinstance(value, Mapping), field, value, "a mapping")
    return flax.core.FrozenDict(_to_plain(value))
  if annotation is bool:
    check(isinstance(value, bool), field, value, "a bool")
    return value
  if annotation is int:
    check(isinstance(value, int) and not isinstance(value, bool), field, value,
          "an int")
    return value
  if annotation is float:
    check(isinstance(value, (int, float)) and not isinstance(value, bool), field,
          value, "a number")
    return float(value)
  if annotation is str:
    check(isinstance(value, str), field, value, "a string")
    return value
  return value


def _to_plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _to_plain(v) for k, v in value.items()}
  return value


def from_mapping(cls: type[T], mapping: Any, prefix: str = "config") -> T:
  """Builds dataclass `cls` from `mapping`; unknown keys and bad types raise ConfigError."""
  mapping = _to_plain(mapping) if mapping is not None else {}
  if not isinstance(mapping, Mapping):
    raise ConfigError(f"{prefix}={mapping!r} is invalid: must be a mapping")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(mapping) - set(fields))
  if unknown:
    raise ConfigError(
        f"unknown field(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
        f"allowed: {', '.join(sorted(fields))}")
  hints = typing.get_type_hints(cls)
  kwargs = {name: _coerce(f"{prefix}.{name}", mapping[name], hints[name])
            for name in fields if name in mapping}
  obj = cls(**kwargs)
  validate = getattr(obj, "validate", None)
  if validate is not None:
    validate(prefix)
  return obj


def to_dict(obj: Any) -> Any:
  """The inverse of `from_mapping`: a JSON-ready dict of a (nested) config dataclass."""
  if dataclasses.is_dataclass(obj):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {k: to_dict(v) for k, v in obj.items()}
  if isinstance(obj, tuple):
    return [to_dict(v) for v in obj]
  return obj
