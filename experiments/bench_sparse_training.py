r"""Benchmark the cost of sparse training: the train step of every `config.sparsity`
algorithm vs the dense step, side by side in one run.

  .venv/bin/python experiments/bench_sparse_training.py --record

Each algorithm's trainer (`sparsejax.train.trainer.Trainer`, the real step: masked
forward, optimizer wrapped by the Sparsifier) is jitted without buffer donation and
timed on one fixed batch, interleaved round-robin over --repeats samples
(`timing.time_methods`; per call the median of the samples, or with --statistic=min
the fastest, the less load-sensitive estimate on a shared machine), at two optimizer
steps:

  regular   step --update_every + 1: no mask update (the `lax.cond` takes the cheap
            branch; STE recomputes its mask every step, so it has no regular step);
  update    step --update_every: the mask update runs (RigL: drop by |w|, grow by
            |dense grad|, Adam moments of grown weights reset; SET: random regrowth;
            gradual magnitude: the polynomial schedule's re-pruning).

Reported separately: the per-update-step cost (update / dense) and the amortized
overhead over Δt = --update_every steps,
    ((Δt − 1)·t_regular + t_update) / (Δt · t_dense) − 1,
against the goal of ≤ 5% for RigL at Δt = 100. The shape-shrink speedup of pruned
channels and heads is benchmarked by experiments/bench_shrink.py. On CPU read the
ratios, not the absolute times (shared cores).
"""

from __future__ import annotations

import os
import sys

from absl import flags
import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import results_log  # noqa: E402  (sibling modules)
from timing import time_methods  # noqa: E402

from sparsejax import sharding  # noqa: E402
from sparsejax.train.config import parse_config  # noqa: E402
from sparsejax.train.trainer import Trainer  # noqa: E402
from sparsejax.validation import check, run_cli  # noqa: E402

_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model dim D.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Blocks.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.9, "Target sparsity of every algorithm.")
_EVERY = flags.DEFINE_integer("update_every", 100, "Δt: steps between mask updates.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Interleaved samples per measurement.")
_MIN_SAMPLE = flags.DEFINE_float("min_sample_s", 0.2, "Least seconds per sample.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["static", "set", "rigl", "magnitude",
                                               "global_magnitude", "ste"],
                                "Algorithms timed against the dense step.")
_STATISTIC = flags.DEFINE_enum("statistic", "median", ["median", "min"],
                               "Per-call time of a method from its samples.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")
GOAL = 0.05   # RigL's amortized overhead at Δt = 100


def sparsity_section(algorithm: str, sparsity: float, every: int) -> dict:
  if algorithm == "dense":
    return {}
  section = dict(algorithm=algorithm, sparsity=sparsity, update_every=every)
  if algorithm in ("magnitude", "global_magnitude"):
    section.update(schedule="polynomial", begin_step=0)
  return section


def config_dict(algorithm: str) -> dict:
  d = _D_MODEL.value
  return {"model": dict(d_model=d, num_layers=_NUM_LAYERS.value, num_heads=4,
                        num_kv_heads=2),
          "data": dict(seq_len=_SEQ_LEN.value, batch_size=_BATCH.value),
          "train": dict(num_steps=10 * _EVERY.value, sample_tokens=0),
          "sparsity": sparsity_section(algorithm, _SPARSITY.value, _EVERY.value)}


def one_device_trainer(config: dict) -> Trainer:
  """The config's trainer on the first device alone (a step time, not a mesh's)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
  return Trainer(parse_config(config), mesh=mesh)


def at_step(trainer: Trainer, state, step: int):
  """`state` with the train step (and the Sparsifier's step) set to `step`."""
  s = jax.numpy.asarray(step, jax.numpy.int32)
  opt_state = state.opt_state
  if trainer.sparsifier is not None:   # the wrapped optimizer's state is the outer one
    opt_state = opt_state._replace(step=s)
  return state.replace(step=s, opt_state=opt_state)


def measure(algorithms: list[str]) -> dict[str, dict[str, float]]:
  """{algorithm: {"regular": s, "update": s}} step times, the --statistic of the
  samples (dense: regular only)."""
  every = _EVERY.value
  methods, args, batch = {}, {}, None
  for name in ["dense", *algorithms]:
    trainer = one_device_trainer(config_dict(name))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (_BATCH.value, _SEQ_LEN.value + 1), dtype=np.int32)
    batch = batch or trainer.global_batch({"inputs": tokens[:, :-1],
                                           "targets": tokens[:, 1:]})
    with trainer.activate():
      step = jax.jit(trainer._step)   # pylint: disable=protected-access  (no donation)
    run = lambda s, b, step=step, trainer=trainer: _in_mesh(trainer, step, s, b)
    state = trainer.init_state()
    phases = {"regular": every + 1, "update": every}
    if name == "dense" or (trainer.sparsifier.algorithm.name == "static"):
      phases = {"regular": every + 1}
    elif trainer.sparsifier.algorithm.every_step:
      phases = {"update": every}
    for phase, at in phases.items():
      methods[f"{name}/{phase}"] = run
      args[f"{name}/{phase}"] = (at_step(trainer, state, at), batch)
  samples = time_methods(methods, args, _REPEATS.value, _MIN_SAMPLE.value)
  statistic = {"median": np.median, "min": np.min}[_STATISTIC.value]
  out: dict[str, dict[str, float]] = {}
  for key, times in samples.items():
    name, phase = key.split("/")
    out.setdefault(name, {})[phase] = float(statistic(times))
  return out


def _in_mesh(trainer, step, state, batch):
  with trainer.activate():
    return step(state, batch)


def table(times: dict[str, dict[str, float]], every: int) -> tuple[str, dict]:
  """Markdown table and {algorithm: amortized overhead}."""
  dense = times["dense"]["regular"]
  lines = ["| algorithm | regular step ms | × dense | update step ms | × dense | "
           f"amortized overhead @ Δt={every} |", "|---|---:|---:|---:|---:|---:|"]
  overhead = {}
  cell = lambda x: "— | —" if x is None else f"{1e3 * x:.2f} | {x / dense:.3f}"
  for name, t in times.items():
    regular, update = t.get("regular"), t.get("update")
    r = regular if regular is not None else update
    u = update if update is not None else regular
    overhead[name] = ((every - 1) * r + u) / (every * dense) - 1
    lines.append(f"| {name} | {cell(regular)} | {cell(update)} | "
                 f"{overhead[name]:+.1%} |")
  return "\n".join(lines), overhead


def main(argv):
  del argv
  check(_EVERY.value >= 2, "--update_every", _EVERY.value, ">= 2")
  times = measure(list(_ALGORITHMS.value))
  text, overhead = table(times, _EVERY.value)
  verdict = ""
  if "rigl" in overhead:
    ok = overhead["rigl"] <= GOAL
    verdict = (f"RigL amortized overhead at Δt = {_EVERY.value}: "
               f"{overhead['rigl']:+.1%} (goal ≤ {GOAL:.0%}: "
               f"{'met' if ok else 'not met'}); one update step costs "
               f"{times['rigl']['update'] / times['dense']['regular']:.2f}× a dense step.")
  body = (f"{text}\n\nModel d_model {_D_MODEL.value}, {_NUM_LAYERS.value} blocks, batch "
          f"{_BATCH.value} × {_SEQ_LEN.value} tokens, sparsity {_SPARSITY.value:.0%}, "
          f"{_STATISTIC.value} of {_REPEATS.value} interleaved samples. {verdict} "
          "Shape-shrink speedup: experiments/bench_shrink.py.")
  print(body)
  if _RECORD.value:
    results_log.append_section(
        "Sparse training step cost vs dense (experiments/bench_sparse_training.py)", body,
        command=" ".join(["python experiments/bench_sparse_training.py", *sys.argv[1:]]))


if __name__ == "__main__":
  run_cli(main)
