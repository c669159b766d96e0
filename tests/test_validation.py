"""Typed config validation: coercion, unknown fields, nested errors, round trip."""

import dataclasses

import pytest

from sparsejax import validation
from sparsejax.train.config import Config, config_to_dict, parse_config


@dataclasses.dataclass(frozen=True)
class _Inner:
  size: int = 1
  ratio: float = 0.5

  def validate(self, prefix):
    validation.check(self.size >= 1, f"{prefix}.size", self.size, ">= 1")


@dataclasses.dataclass(frozen=True)
class _Outer:
  name: str = "x"
  inner: _Inner = _Inner()
  sizes: tuple[int, ...] = ()


def test_nested_values_are_coerced_and_checked():
  obj = validation.from_mapping(_Outer, {"inner": {"size": 3, "ratio": 1}, "sizes": [1, 2]})
  assert obj.inner == _Inner(3, 1.0) and isinstance(obj.inner.ratio, float)
  assert obj.sizes == (1, 2)
  with pytest.raises(validation.ConfigError, match=r"config\.inner\.size=0 .* >= 1"):
    validation.from_mapping(_Outer, {"inner": {"size": 0}})
  with pytest.raises(validation.ConfigError, match=r"config\.sizes\[1\]='a'"):
    validation.from_mapping(_Outer, {"sizes": [1, "a"]})
  with pytest.raises(validation.ConfigError, match=r"config\.inner\.size=True"):
    validation.from_mapping(_Outer, {"inner": {"size": True}})
  with pytest.raises(validation.ConfigError, match=r"unknown field\(s\) config\.inner\.siz"):
    validation.from_mapping(_Outer, {"inner": {"siz": 2}})


def test_unknown_fields_get_the_closest_name_as_a_hint():
  with pytest.raises(validation.ConfigError, match=(
      r"unknown field\(s\) config\.inner\.raito \(did you mean config\.inner\.ratio\?\), "
      r"config\.inner\.zzz; allowed: ratio, size$")):
    validation.from_mapping(_Outer, {"inner": {"raito": 2, "zzz": 1}})


def test_full_config_round_trips_through_dict():
  config = parse_config({"model": {"d_model": 64}, "train": {"num_steps": 5}})
  assert parse_config(config_to_dict(config)) == config
  assert parse_config({}) == Config()
