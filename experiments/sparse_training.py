r"""Sparse training, reproduced small: dense vs static vs SET vs RigL at 80% and 90%
sparsity (uniform and ERK), gradual magnitude pruning, STE, and lottery tickets vs
their random reinitialization — two seeds, the same tokens for every run.

  python experiments/sparse_training.py --record        # ≈25 min on a 2-core CPU
  python experiments/sparse_training.py --quick --workdir=/tmp/st   # smoke (≈1 min)

Every variant trains the same small decoder LM (the dense config below) on the same
batches (data seed fixed); a seed changes the weight init and the random masks
(`train.seed`, `sparsity.seed`). Sparse variants:
  static_<s>_<dist>  fixed random mask (RigL's static baseline)
  set_<s>_<dist>     SET: drop ζ = 0.3 of the smallest active |w|, regrow at random
  rigl_<s>_<dist>    RigL: drop by |w|, regrow by |dense gradient|, cosine decay
  prune_<s>          gradual magnitude pruning (Zhu & Gupta), dense start
  ste_<s>            STE: dense weights, masked forward, mask recomputed every step
  lottery            IMP (experiments/lottery.py): R rounds of 20% global magnitude
                     pruning, ticket θ_0 ⊙ m vs random reinit at density 0.8^R.
Val loss in nats per byte on the same val batches. The papers' orderings (Evci et al.
2020; Mocanu et al. 2018; Zhu & Gupta 2017; Frankle & Carbin 2019) are checked on the
seed means and reported as held / not held.

Writes --workdir/report.md and results.json; --record appends the section to
benchmarks/RESULTS.md. Resumable: finished runs are read back (result.json per run).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from absl import flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lottery as lottery_cli  # noqa: E402  (experiments/lottery.py)
import results_log  # noqa: E402

from sparsejax.train import sweep  # noqa: E402
from sparsejax.train.checkpoint import quiet_orbax_logs  # noqa: E402
from sparsejax.validation import run_cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdir/sparse_training", "Output directory.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke mode: a tiny model, a few steps, one "
                           "seed, 80% only, one lottery round.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per variant (init and masks).")
_RECORD = flags.DEFINE_bool("record", False, "Append the section to benchmarks/RESULTS.md.")

# The recorded setup: ≈ 25 min for all runs of both seeds on a shared 2-core CPU.
FULL = dict(model=dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, d_ff=0, tie_embeddings=True, dtype="float32"),
            data=dict(seq_len=32, batch_size=16, seed=0),
            optim=dict(learning_rate=3e-3, warmup_steps=20),
            train=dict(num_steps=200, log_every=25, eval_every=100, eval_batches=8,
                       checkpoint_every=100, sample_tokens=0),
            mesh=dict(data=-1))
QUICK = sweep.deep_update(FULL, dict(
    data=dict(batch_size=8),
    optim=dict(warmup_steps=2),
    train=dict(num_steps=8, log_every=4, eval_every=0, eval_batches=2,
               checkpoint_every=4)))
LOTTERY_ROUNDS = {"full": 3, "quick": 1}
UPDATE_EVERY = 20   # RigL/SET Δt, pruning's Δt (a 200-step run: 7 RigL updates)


def variants(base: dict, sparsities: tuple[float, ...]) -> dict[str, dict]:
  """{name: sparsity section} of every non-lottery variant ({} = dense)."""
  steps = base["train"]["num_steps"]
  every = max(1, min(UPDATE_EVERY, steps // 4))
  out = {"dense": {}}
  for s in sparsities:
    tag = f"{round(s * 100)}"
    for dist in ("uniform", "erk"):
      out[f"static_{tag}_{dist}"] = dict(algorithm="static", sparsity=s, distribution=dist)
      out[f"set_{tag}_{dist}"] = dict(algorithm="set", sparsity=s, distribution=dist,
                                      update_every=every, drop_fraction=0.3)
      out[f"rigl_{tag}_{dist}"] = dict(algorithm="rigl", sparsity=s, distribution=dist,
                                       update_every=every, drop_fraction=0.3)
    out[f"prune_{tag}"] = dict(algorithm="magnitude", sparsity=s, schedule="polynomial",
                               begin_step=steps // 10, end_step=(3 * steps) // 4,
                               update_every=every)
    out[f"ste_{tag}"] = dict(algorithm="ste", sparsity=s)
  return out


def run_all(root: str, base: dict, seeds: int, sparsities: tuple[float, ...],
            rounds: int) -> dict:
  """Trains (or reads back) every variant for every seed; {name: [val loss per seed]}
  plus "lottery_ticket"/"lottery_reinit" at density 0.8^rounds."""
  losses: dict[str, list[float]] = {}
  for seed in range(seeds):
    seeded = sweep.deep_update(base, {"train": {"seed": seed}})
    for name, sparsity in variants(base, sparsities).items():
      config = sweep.deep_update(seeded, {"sparsity": dict(sparsity, seed=seed)}
                                 if sparsity else {})
      print(f"=== seed {seed}: {name}", flush=True)
      result = sweep.run_variant(name, config, os.path.join(root, f"seed_{seed}"))
      losses.setdefault(name, []).append(result.val_loss)
    print(f"=== seed {seed}: lottery ({rounds} rounds)", flush=True)
    rows = lottery_cli.Lottery(seeded, os.path.join(root, f"seed_{seed}", "lottery"),
                               lottery_cli.LotterySetup(rounds=rounds)).run()
    losses.setdefault("lottery_ticket", []).append(rows[-1]["ticket_val_loss"])
    losses.setdefault("lottery_reinit", []).append(rows[-1]["reinit_val_loss"])
    losses.setdefault("lottery_density", []).append(rows[-1]["density"])
  return losses


def _mean(losses: dict, name: str) -> float:
  return float(np.mean(losses[name]))


def orderings(losses: dict, sparsities: tuple[float, ...]) -> list[tuple[str, bool]]:
  """The papers' claims on the seed-mean val losses (lower = better): [(claim, held)].
  "≈ dense" means within 2% of the dense loss."""
  m = lambda name: _mean(losses, name)
  claims = []
  for s in sparsities:
    tag = f"{round(s * 100)}"
    for dist in ("uniform", "erk"):
      st, se, ri = (m(f"{a}_{tag}_{dist}") for a in ("static", "set", "rigl"))
      claims.append((f"{tag}% {dist}: static < SET (loss {st:.4f} vs {se:.4f})", st > se))
      claims.append((f"{tag}% {dist}: SET < RigL (loss {se:.4f} vs {ri:.4f})", se > ri))
      claims.append((f"{tag}% {dist}: RigL ≤ pruning (loss {ri:.4f} vs "
                     f"{m(f'prune_{tag}'):.4f})", ri >= m(f"prune_{tag}")))
    pr, de = m(f"prune_{tag}"), m("dense")
    claims.append((f"{tag}%: pruning ≈ dense (loss {pr:.4f} within 2% of {de:.4f})",
                   abs(pr / de - 1) <= 0.02))
    for a in ("static", "set", "rigl"):
      u, e = m(f"{a}_{tag}_uniform"), m(f"{a}_{tag}_erk")
      claims.append((f"{tag}% {a}: ERK ≥ uniform (loss {e:.4f} vs {u:.4f})", e <= u))
  t, r = m("lottery_ticket"), m("lottery_reinit")
  claims.append((f"density {_mean(losses, 'lottery_density'):.3f}: ticket > reinit "
                 f"(loss {t:.4f} vs {r:.4f})", t < r))
  return claims


def markdown(losses: dict, seeds: int) -> str:
  dense = _mean(losses, "dense")
  lines = ["| variant | " + " | ".join(f"seed {i}" for i in range(seeds))
           + " | mean | Δ vs dense |", "|---|" + "---:|" * (seeds + 2)]
  for name, values in losses.items():
    if name == "lottery_density":
      continue
    mean = float(np.mean(values))
    lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
                 + f" | {mean:.4f} | {mean / dense - 1:+.2%} |")
  return "\n".join(lines)


def report(losses: dict, base: dict, seeds: int, sparsities: tuple[float, ...],
           rounds: int) -> str:
  claims = orderings(losses, sparsities)
  held = sum(ok for _, ok in claims)
  model, data, train = base["model"], base["data"], base["train"]
  return (
      f"{markdown(losses, seeds)}\n\n"
      f"Setup: decoder LM d_model {model['d_model']}, {model['num_layers']} blocks, "
      f"seq_len {data['seq_len']}, batch {data['batch_size']}, {train['num_steps']} "
      f"steps ({train['num_steps'] * data['batch_size'] * data['seq_len']:,} tokens, the "
      f"same batches for every run), {seeds} seed(s) (init and masks), val loss in "
      f"nats/byte on {train['eval_batches']} val batches. Sparse: every kernel but "
      f"embeddings/norms; SET/RigL/pruning Δt = {min(UPDATE_EVERY, train['num_steps'] // 4)}, "
      f"drop fraction 0.3; pruning polynomial from 10% to 75% of training; lottery: "
      f"{rounds} IMP rounds of 20% global magnitude, rewind to step 0, reinit = fresh "
      f"init with the same masks.\n\n"
      f"Orderings from the papers ({held} of {len(claims)} held):\n\n"
      + "\n".join(f"- {'held' if ok else 'NOT held'}: {c}" for c, ok in claims))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  base = QUICK if quick else FULL
  seeds = 1 if quick else _SEEDS.value
  sparsities = (0.8,) if quick else (0.8, 0.9)
  rounds = LOTTERY_ROUNDS["quick" if quick else "full"]
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  losses = run_all(root, base, seeds, sparsities, rounds)
  body = report(losses, base, seeds, sparsities, rounds)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"losses": losses, "base": base, "seeds": seeds}, f, indent=1)
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write(f"# Sparse training reproduction\n\n{body}\n")
  print(body)
  if _RECORD.value:
    device = jax.devices()[0]
    results_log.append_section(
        f"Sparse training reproduction on {device.platform} "
        "(experiments/sparse_training.py)", body,
        command=" ".join(["python experiments/sparse_training.py", *sys.argv[1:]]))


if __name__ == "__main__":
  run_cli(main, quiet_logs=quiet_orbax_logs)
