"""The experiment configs: one file per model, each exposing `get_config()` and stating
its run command in its docstring.

Every config except dense.py starts from its parent's `get_config()` (moe_shared from
moe, bitnet_qsparse and qsparse_continue from qsparse, pkm from ultramem, the ablation
ladder from pkm and ultramem, ...). Config files are run by path (absl's
`--config=experiments/configs/moe.py`, or `load` below), never imported by package name,
so a file reads its parent with `runpy.run_path` next to its own `__file__`: that works
whatever the working directory and `sys.path`.

The experiment scripts import this package as `configs` (their directory is on
`sys.path`) and load a config with `load`:

    configs.load("moe_shared")                        # a file of this directory
    configs.load("ultramem_ablation:tdqkr")           # get_config("tdqkr"), like absl
    configs.load("scale/moe:8b")                      # a subfolder's config
    configs.load("experiments/configs/nsa.py")        # or any path
"""

from __future__ import annotations

import os
import runpy

import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> tuple[str, ...]:
  """The config files of this directory and its subfolders (e.g. "scale/moe"), without
  ".py"."""
  found = []
  for folder, dirs, files in os.walk(CONFIG_DIR):
    dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
    rel = os.path.relpath(folder, CONFIG_DIR)
    found += [os.path.normpath(os.path.join(rel, f[:-3])).replace(os.sep, "/")
              for f in files if f.endswith(".py") and f != "__init__.py"]
  return tuple(sorted(found))


def path(name_or_path: str) -> str:
  """The file of config `name_or_path`: a name of this directory or a subfolder
  ("moe", "moe.py", "scale/moe") or a path to a config file."""
  file = os.path.join(CONFIG_DIR, name_or_path.removesuffix(".py") + ".py")
  if not os.path.isfile(file):
    file = name_or_path
  if not os.path.isfile(file):
    raise ValueError(f"config {name_or_path!r} must be a file or one of {names()}")
  return file


def load(name_or_path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of config `name_or_path` ("name", "name.py" or a path; a ":<arg>"
  suffix, as absl's --config accepts, or `arg` calls `get_config(arg)`)."""
  if arg is None and ":" in name_or_path:
    name_or_path, arg = name_or_path.rsplit(":", 1)
  get_config = runpy.run_path(path(name_or_path))["get_config"]
  return get_config() if arg is None else get_config(arg)
