r"""Lottery tickets by iterative magnitude pruning (IMP), with rewinding and the
random-reinitialization control.

  python experiments/lottery.py --config=experiments/configs/tiny.py --workdir=/tmp/lth \
      --rounds=3 --rewind_step=0 --config.train.num_steps=200

Round 0 trains the dense model of --config from θ_0 and keeps θ_k (the full train state
at --rewind_step=k: weights, optimizer state, step and data position; k = 0 is the
original lottery ticket of Frankle & Carbin 2019, k > 0 the rewinding of Frankle et al.
2020). Round r ≥ 1 prunes --prune_fraction (20%) of the weights still kept, by one
global |w| threshold over all masked tensors (the sparsity filter of
`config.sparsity.include/exclude`), from the weights round r − 1's ticket ended with,
then retrains from step k to `config.train.num_steps` twice with the same masks:
  ticket  θ_k ⊙ m (the rewound survivors),
  reinit  θ'_0 ⊙ m (fresh random weights, seed + 1; same optimizer state, step and data).
So after R rounds the density is ≈ 0.8^R (K_r = round(0.8·K_{r-1}) kept weights).

Writes to --workdir: lottery.json (per round: density, kept count, val loss of ticket
and reinit), report.md (the table), masks_<r>.npz, and one trainer workdir per run
(dense/, round_<r>/ticket/, round_<r>/reinit/) with metrics.jsonl and checkpoints.
Resumable: rerun the same command; a finished round is never recomputed, and a round
that was interrupted (Ctrl-C) continues from its runs' checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from sparsejax.sparsity import lottery
from sparsejax.sparsity.sparsifier import apply_masks
from sparsejax.train import data as data_lib
from sparsejax.train.checkpoint import Checkpointer, quiet_orbax_logs
from sparsejax.train.config import config_to_dict, parse_config
from sparsejax.train.trainer import load_params, train, trainer_for
from sparsejax.validation import ConfigError, check, run_cli


class LotterySetup(NamedTuple):
  rounds: int = 3                 # R: IMP rounds after the dense one
  prune_fraction: float = 0.2     # share of the kept weights pruned per round
  rewind_step: int = 0            # k: the ticket restarts from θ_k (0: θ_0)
  reinit: bool = True             # also train the random-reinit control each round

  def validate(self, num_steps: int) -> None:
    check(self.rounds >= 0, "--rounds", self.rounds, ">= 0")
    check(0 < self.prune_fraction < 1, "--prune_fraction", self.prune_fraction,
          "in (0, 1)")
    check(0 <= self.rewind_step < num_steps, "--rewind_step", self.rewind_step,
          f"in [0, config.train.num_steps={num_steps})")


def _atomic_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _save_masks(path: str, masks: dict[str, jax.Array]) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{n: np.asarray(m) for n, m in masks.items()})
  os.replace(tmp, path)


def load_masks(path: str, like: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Masks saved by this script (masks_<r>.npz), placed like `like`."""
  with np.load(path) as f:
    return {n: jax.device_put(f[n], like[n].sharding) for n in like}


def _data_state_at(config, step: int) -> dict:
  """The train iterator's state after `step` batches (the trainer's data order)."""
  it = iter(data_lib.make_dataset(config.data, "train",
                                  vocab_size=config.model.vocab_size))
  for _ in range(step):
    next(it)
  return it.get_state()


def _with_sparsity(base: dict, **section) -> dict:
  """`base` with its sparsity section replaced by `section` (its parameter filter,
  include/exclude, kept): algorithm "none" for round 0; "static" at the round's
  density for the later rounds, whose random masks are replaced by the ticket's
  before the first step (a static mask is never updated)."""
  keep = {k: v for k, v in base.get("sparsity", {}).items() if k in ("include", "exclude")}
  return {**base, "sparsity": dict(keep, **section)}


class Lottery:
  """The runs of one IMP experiment in `root` (see the module docstring)."""

  def __init__(self, base: dict, root: str, setup: LotterySetup):
    self.base, self.root, self.setup = base, root, setup
    self.dense_config = parse_config(_with_sparsity(base, algorithm="none"))
    setup.validate(self.dense_config.train.num_steps)
    self.rewind_dir = os.path.join(root, "rewind")
    self.summary_path = os.path.join(root, "lottery.json")

  # --- round 0 ---------------------------------------------------------------------

  def _save_rewind(self, state) -> None:
    ckpt = Checkpointer(self.rewind_dir, max_to_keep=1)
    k = self.setup.rewind_step
    ckpt.save(k, state, _data_state_at(self.dense_config, k),
              config_to_dict(self.dense_config))
    ckpt.wait()
    ckpt.close()

  def _rewound(self):
    """(train state, data state) of the dense run at the rewind step."""
    ckpt = Checkpointer(self.rewind_dir, max_to_keep=1)
    try:
      return ckpt.restore(self.setup.rewind_step,
                          trainer_for(self.dense_config).restore_target())
    finally:
      ckpt.close()

  def _has_rewind(self) -> bool:
    if not os.path.isdir(self.rewind_dir):
      return False
    ckpt = Checkpointer(self.rewind_dir, max_to_keep=1)
    try:
      return ckpt.latest_step() == self.setup.rewind_step
    finally:
      ckpt.close()

  def dense(self) -> dict:
    """Trains (or resumes) round 0; keeps the train state at the rewind step."""
    k = self.setup.rewind_step
    trainer = trainer_for(self.dense_config)
    if k == 0 and not self._has_rewind():
      self._save_rewind(trainer.init_state())   # the state train() starts from

    def keep_rewind(step, state):
      if step == k and not self._has_rewind():
        self._save_rewind(state)
    return self._run("dense", self.dense_config, hooks=[keep_rewind])

  def _run(self, name: str, config, hooks=()) -> dict:
    workdir = os.path.join(self.root, name)
    path = os.path.join(workdir, "result.json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    if not self._has_rewind() and name != "dense":
      raise ConfigError(f"{self.rewind_dir} holds no state at --rewind_step="
                        f"{self.setup.rewind_step}: rerun with the workdir's original "
                        "--rewind_step or a new --workdir")
    result = train(config, workdir, hooks=hooks)
    out = {"val_loss": result.metrics["loss"], "val_bpb": result.metrics["bpb"],
           "step": result.metrics["step"]}
    _atomic_json(path, out)
    return out

  # --- rounds >= 1 -----------------------------------------------------------------

  def _seed_run(self, workdir: str, config, masks, params) -> None:
    """Writes the run's starting checkpoint (step k): the rewound dense state with
    `params` ⊙ masks and the masks in the sparsifier's state; train() resumes it."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
      if ckpt.latest_step() is not None:
        return
      rewound, data_state = self._rewound()
      trainer = trainer_for(config)
      start = trainer.state_from_params(params, rewound.model_state)
      opt_state = trainer.sparsifier.with_masks(start.opt_state, masks)._replace(
          inner_state=rewound.opt_state)
      state = start.replace(step=rewound.step, params=apply_masks(params, masks),
                            opt_state=opt_state)
      state = jax.device_put(state, trainer.state_shardings)
      ckpt.save(int(rewound.step), state, data_state, config_to_dict(config))
      ckpt.wait()
    finally:
      ckpt.close()

  def round(self, r: int, masks) -> dict:
    """Round r ≥ 1 with its masks: the ticket and (if asked) the reinit control."""
    density = lottery.kept_count(masks) / lottery.total_count(masks)
    config = parse_config(_with_sparsity(self.base, algorithm="static",
                                         sparsity=1.0 - density))
    dense = trainer_for(self.dense_config)
    runs = {"ticket": self._rewound()[0].params}
    if self.setup.reinit:
      runs["reinit"] = dense.init_state(seed=self.dense_config.train.seed + 1).params
    out = {"round": r, "density": density, "kept": lottery.kept_count(masks),
           "total": lottery.total_count(masks)}
    for name, params in runs.items():
      workdir = os.path.join(self.root, f"round_{r}", name)
      self._seed_run(workdir, config, masks, params)
      result = self._run(f"round_{r}/{name}", config)
      out[f"{name}_val_loss"] = result["val_loss"]
    return out

  def masks_for(self, r: int, previous) -> dict[str, jax.Array]:
    """Round r's masks: saved, or pruned from round r − 1's trained ticket."""
    path = os.path.join(self.root, f"masks_{r}.npz")
    if os.path.exists(path):
      return load_masks(path, previous)
    source = "dense" if r == 1 else f"round_{r - 1}/ticket"
    trained = load_params(os.path.join(self.root, source), trainer_for(self.dense_config))
    masks = lottery.prune_round(trained, previous, self.setup.prune_fraction)
    _save_masks(path, masks)
    return masks

  def run(self) -> list[dict]:
    """All rounds (finished ones read back from lottery.json); returns the summary."""
    os.makedirs(self.root, exist_ok=True)
    done = {}
    if os.path.exists(self.summary_path):
      with open(self.summary_path) as f:
        done = {row["round"]: row for row in json.load(f)["rounds"]}
    masks = self._all_kept()
    rows = [done.get(0) or {"round": 0, "density": 1.0,
                            "kept": lottery.total_count(masks),
                            "total": lottery.total_count(masks),
                            "ticket_val_loss": self.dense()["val_loss"]}]
    self._write(rows)
    for r in range(1, self.setup.rounds + 1):
      masks = self.masks_for(r, masks)
      rows.append(done.get(r) or self.round(r, masks))
      self._write(rows)
    return rows

  def _all_kept(self) -> dict[str, jax.Array]:
    """All-True masks of the tensors the sparsity filter selects, sharded like them."""
    sel = self.dense_config.sparsity
    return lottery.initial_masks(trainer_for(self.dense_config).restore_target().params,
                                 include=sel.include, exclude=sel.exclude)

  def _write(self, rows: list[dict]) -> None:
    _atomic_json(self.summary_path, {"setup": self.setup._asdict(),
                                     "rounds": rows})
    with open(os.path.join(self.root, "report.md"), "w") as f:
      f.write(f"# Lottery tickets (IMP, rewind to step {self.setup.rewind_step})\n\n"
              f"{markdown_table(rows)}\n")


def markdown_table(rows: list[dict]) -> str:
  """| round | density | ticket | reinit | reinit − ticket | (val loss, nats/token)."""
  fmt = lambda v: "—" if v is None else f"{v:.4f}"
  lines = ["| round | density | kept | ticket val loss | reinit val loss | "
           "reinit − ticket |", "|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    t, c = row.get("ticket_val_loss"), row.get("reinit_val_loss")
    gap = f"{c - t:+.4f}" if None not in (t, c) else "—"
    lines.append(f"| {row['round']} | {row['density']:.3f} | {row.get('kept', '—')} | "
                 f"{fmt(t)} | {fmt(c)} | {gap} |")
  return "\n".join(lines)


FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags() -> None:
  """Defines the CLI's flags (not at import: experiments/sparse_training.py imports
  this module and has flags of the same names)."""
  FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", "experiments/configs/tiny.py", "The dense model and training run of "
      "every round (experiments/configs/*.py; override with "
      "--config.<section>.<field>=value).", lock_config=False, accept_new_attributes=True)
  FLAGS["workdir"] = flags.DEFINE_string("workdir", "workdir/lottery", "Output directory.")
  FLAGS["rounds"] = flags.DEFINE_integer("rounds", 3, "IMP rounds R after the dense run "
                                         "(density ≈ 0.8^R at the end).")
  FLAGS["prune_fraction"] = flags.DEFINE_float(
      "prune_fraction", 0.2, "Share of the kept weights pruned per round (global "
      "magnitude).")
  FLAGS["rewind_step"] = flags.DEFINE_integer(
      "rewind_step", 0, "k: tickets restart from the dense run's state at step k (0: "
      "the original LTH).")
  FLAGS["reinit"] = flags.DEFINE_bool("reinit", True, "Also train the random-reinit "
                                      "control.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  value = {k: v.value for k, v in FLAGS.items()}
  setup = LotterySetup(rounds=value["rounds"], prune_fraction=value["prune_fraction"],
                       rewind_step=value["rewind_step"], reinit=value["reinit"])
  rows = Lottery(value["config"].to_dict(), value["workdir"], setup).run()
  print(markdown_table(rows))
  print(f"report: {os.path.join(value['workdir'], 'report.md')}")


if __name__ == "__main__":
  define_flags()
  run_cli(main, quiet_logs=quiet_orbax_logs)
