"""Typed config validation: mappings -> frozen dataclasses, with errors naming the field.

Every config section is a frozen dataclass. `from_mapping` builds one from a plain mapping
(an `ml_collections.ConfigDict` or dict), rejecting unknown keys and wrong types, and then
calls the dataclass's own `validate()` (if it has one) for range checks. Errors always
name the full dotted field, e.g. `config.model.num_heads`.

`run_cli(main)` is the entry points' `absl.app.run`: a user's mistake (`KNOWN_ERRORS`: a
bad config value or path, a diverged run, a file that cannot be read or written, a bad
flag) prints one `error: ...` line and exits with status 1; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import flax.core

T = TypeVar("T")


class ConfigError(ValueError):
  """A config value is missing, unknown, of the wrong type or out of range."""


# Errors a user can fix without reading a traceback (`run_cli` prints them as one line).
KNOWN_ERRORS = (ConfigError, FloatingPointError, OSError)


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


def _with_hint(prefix: str, key: Any, fields: Mapping[str, Any]) -> str:
  """`prefix.key`, plus "(did you mean prefix.x?)" for the closest field name."""
  close = difflib.get_close_matches(str(key), list(fields), n=1)
  hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
  return f"{prefix}.{key}{hint}"


def from_mapping(cls: type[T], mapping: Any, prefix: str = "config") -> T:
  """Builds dataclass `cls` from `mapping`; unknown keys and bad types raise ConfigError."""
  mapping = _to_plain(mapping) if mapping is not None else {}
  if not isinstance(mapping, Mapping):
    raise ConfigError(f"{prefix}={mapping!r} is invalid: must be a mapping")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(mapping) - set(fields))
  if unknown:
    raise ConfigError(
        f"unknown field(s) {', '.join(_with_hint(prefix, k, fields) for k in unknown)}; "
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


def run_cli(main: Callable[[list[str]], Any], *,
            quiet_logs: Callable[[], None] | None = None) -> None:
  """`absl.app.run(main)` printing flag errors and `KNOWN_ERRORS` as one `error: ...`
  line (exit status 1) unless `--debug`; Ctrl-C exits with status 130 and no traceback.
  `quiet_logs()` runs before `main` unless `--debug` (e.g. to hide a library's log lines
  about failures that reach `main` as exceptions)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  debug = flags.DEFINE_bool("debug", False, "Show the traceback of errors that are "
                            "otherwise printed as one `error: ...` line.",
                            module_name=sys.argv[0])  # listed with the script's flags

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except (flags.Error, *KNOWN_ERRORS) as e:  # e.g. --config.x=y on a missing file
      sys.exit(f"error: {_one_line(e)} (see --help)")
    except KeyError as e:  # an override below a field the config does not have
      sys.exit(f"error: unknown config field {_one_line(e.args[0] if e.args else e)} "
               "(see --help)")

  def guarded(argv: list[str]) -> Any:
    if quiet_logs is not None and not debug.value:
      quiet_logs()
    try:
      return main(argv)
    except KeyboardInterrupt:
      sys.exit(130)
    except KNOWN_ERRORS as e:
      if debug.value:
        raise
      sys.exit(f"error: {_one_line(e)}")

  app.run(guarded, flags_parser=parse_flags)


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())
