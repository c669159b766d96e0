"""Every `python experiments/...` command in README.md's code blocks works as written:
its flags parse, a train.py command's config and overrides pass `parse_config`, and
the train.py commands train one step (slow)."""

import os
import re
import shlex
import sys

import pytest
from absl import flags
# Libraries that define absl flags on import (absl.logging, grain) are imported here, so
# that experiment_module, which deletes the flags defined while a script loads, keeps them.
from absl import logging  # noqa: F401
import sparsejax.train.report  # noqa: F401
import sparsejax.train.trainer  # noqa: F401
from sparsejax.models.config import PER_LAYER_FIELDS

from conftest import REPO, experiment_module, run_main

_ONE_STEP = ["--config.train.num_steps=1", "--config.train.eval_batches=1",
             "--config.train.sample_tokens=0", "--config.data.batch_size=8",
             "--config.data.seq_len=32"]


def readme_commands():
  """[(script path, args)] of the README's shell code blocks, in order."""
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```(?:sh|bash|shell)\n(.*?)```", f.read(), re.S)
  commands = []
  for block in blocks:
    for line in block.replace("\\\n", " ").splitlines():
      words = shlex.split(line, comments=True)
      if len(words) >= 2 and words[0].endswith("python") and \
          words[1].startswith("experiments/"):
        commands.append((words[1], words[2:]))
  return commands


COMMANDS = readme_commands()
TRAIN = [args for script, args in COMMANDS if script == "experiments/train.py"]


def _parse(script, args, monkeypatch):
  """Parses `args` with the script's flags (config overrides are read from sys.argv);
  returns the validated Config for train.py, else None."""
  name = os.path.splitext(os.path.basename(script))[0]
  argv = [script, *args]
  monkeypatch.setattr(sys, "argv", argv)
  with experiment_module(name) as module:
    before = set(flags.FLAGS)
    if hasattr(module, "define_flags"):      # a script that defines them under __main__
      module.define_flags()
    try:
      flags.FLAGS(argv)
      return module.load_config() if name == "train" else None
    finally:
      flags.FLAGS.unparse_flags()
      for flag in set(flags.FLAGS) - before:   # define_flags' (attributed to this file)
        delattr(flags.FLAGS, flag)


def test_readme_has_the_commands():
  scripts = {script for script, _ in COMMANDS}
  assert len(TRAIN) >= 10 and {"experiments/train.py", "experiments/qsparse.py",
                               "experiments/bench_moe.py"} <= scripts


@pytest.mark.parametrize("script,args", COMMANDS,
                         ids=[" ".join([s[12:], *a])[:80] for s, a in COMMANDS])
def test_command_parses(script, args, monkeypatch):
  monkeypatch.chdir(REPO)
  assert os.path.isfile(script), f"README runs {script}, which does not exist"
  config = _parse(script, args, monkeypatch)
  if script == "experiments/train.py":
    overrides = dict(a[len("--config."):].split("=", 1) for a in args
                     if a.startswith("--config.") and "=" in a)
    for field, value in overrides.items():   # each override reached the Config
      section, *path = field.split(".")
      got = getattr(config, section)
      for part in path:
        got = got[part] if isinstance(got, dict) or hasattr(got, "keys") \
            else getattr(got, part)
      assert str(got).lower() == value.lower() or got == type(got)(value), field


def test_fields_left_at_their_default_can_be_overridden(monkeypatch):
  """A config file need not list a field (or an option) for it to be overridable."""
  monkeypatch.chdir(REPO)
  config = _parse("experiments/train.py", [
      "--config=experiments/configs/moe.py", "--config.model.remat=True",
      "--config.mesh.expert=4", "--config.model.ffn_options.expert_parallel=True",
      "--config.model.ffn_options.dispatch=capacity"], monkeypatch)
  assert config.model.remat is True and config.mesh.expert == 4
  assert config.model.ffn_options["expert_parallel"] is True
  for base in ("experiments/configs/dense.py", "experiments/configs/scale/dense.py:8b"):
    config = _parse("experiments/train.py", [   # an options mapping the file leaves empty
        f"--config={base}", "--config.model.attention=block_sparse",
        "--config.model.attention_options.pattern=local",
        "--config.model.attention_options.window=256"], monkeypatch)
    assert config.model.attention_options["pattern"] == "local", base
    assert config.model.attention_options["window"] == 256, base
  with pytest.raises(ValueError, match=r"config\.model\.num_layrs \(did you mean "
                                       r"config\.model\.num_layers\?\)"):
    _parse("experiments/train.py", ["--config=experiments/configs/tiny.py",
                                    "--config.model.num_layrs=3"], monkeypatch)


def _workdir(args):
  return next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))


RUNNABLE = [a for a in TRAIN if not any("path/to/" in x or "=..." in x for x in a)]


def _prerequisites(args):
  """The earlier README train commands whose workdir `args` starts from (init_from)."""
  wanted = {a.split("=", 1)[1] for a in args if a.startswith("--config.train.init_from=")}
  return [a for a in RUNNABLE[:RUNNABLE.index(args)] if _workdir(a) in wanted]


def test_readme_train_commands_are_runnable():
  assert len(RUNNABLE) >= 10
  for args in RUNNABLE:               # an init_from workdir comes from an earlier command
    for a in args:
      if a.startswith("--config.train.init_from="):
        assert _prerequisites(args), a


def _fewest_layers(command, monkeypatch):
  """`--config.model.num_layers=N` with the fewest blocks (≥ 2) that keep every
  component of the command's model (its memory placements), or nothing when the
  config sizes its blocks one by one. Compile time grows with the depth."""
  model = _parse("experiments/train.py", command, monkeypatch).model
  if any(getattr(model, name) for name in PER_LAYER_FIELDS):
    return []
  fewest = max([2, *(dst + 1 for _, dst in model.memory_placements)])
  return [f"--config.model.num_layers={fewest}"] if fewest < model.num_layers else []


@pytest.mark.slow
@pytest.mark.parametrize("args", RUNNABLE, ids=[" ".join(a)[9:70] for a in RUNNABLE])
def test_train_command_runs_one_step(args, tmp_path, monkeypatch, capsys):
  """The README train.py command, run from a scratch directory after the commands
  whose workdir it starts from (e.g. init_from=workdir/dense), trains and checkpoints
  one step with a small batch and the fewest blocks its model allows."""
  os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")
  monkeypatch.chdir(tmp_path)
  for command in [*_prerequisites(args), args]:   # an absolute workdir goes under tmp_path
    command = [a.replace("--workdir=/", "--workdir=") for a in command]
    argv = ["experiments/train.py", *command, *_ONE_STEP,
            *_fewest_layers(command, monkeypatch)]
    monkeypatch.setattr(sys, "argv", argv)
    with experiment_module("train") as module:
      run_main(module, argv)
    assert os.path.isdir(os.path.join(_workdir(command), "checkpoints", "1")), command
    assert "final: step 1" in capsys.readouterr().out, command
