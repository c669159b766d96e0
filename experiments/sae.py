r"""Train a TopK sparse autoencoder on a trained model's activations.

  python experiments/sae.py --config=experiments/configs/sae.py --workdir=workdir/sae \
      --config.source.workdir=workdir/dense --config.source.site=resid_1

The source is a sparsejax training workdir (--config.source.workdir) or a Hugging Face
checkpoint (--config.source.hf_path); the site is one of the model's
`sparsejax.sae.site_names` (resid_i, ffn_in_i, memory_in_j). Logs normalized MSE, L0,
the dead-latent fraction and, at each evaluation, the model's val loss with the SAE
reconstruction spliced in (Δ CE vs the clean model and vs zero-ablating the site) to
workdir/metrics.jsonl. Rerunning the same command resumes; Ctrl-C saves the last step.

--record runs the reproduction (Gao et al. 2024): NMSE vs k at a fixed number of latents,
NMSE vs the number of latents at a fixed k, and the dead-latent fraction with and without
AuxK + tied init, each a run in --workdir/<name>, then appends the table to
benchmarks/RESULTS.md and the rows to benchmarks/sae.jsonl. A bad config value prints
one `error: ...` line (--debug shows the traceback).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_log  # noqa: E402

from sparsejax.sae.config import parse_run_config, run_config_to_dict  # noqa: E402
from sparsejax.sae.run import train_sae  # noqa: E402
from sparsejax.train.checkpoint import quiet_orbax_logs  # noqa: E402
from sparsejax.train.metrics import read_metrics  # noqa: E402
from sparsejax.validation import ConfigError, run_cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/sae.py",
    "Path to an ml_collections config file (experiments/configs/sae.py); override "
    "fields as --config.sae.k=32 --config.source.site=ffn_in_1. Sections: source "
    "(workdir, hf_path, site, data_path, batch_size, seq_len), sae (num_latents, k, "
    "k_aux, aux_coeff, dead_tokens, tied_init, normalize_input, impl), optim, train, "
    "mesh.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/sae",
                               "Run directory: checkpoints, metrics.jsonl.")
_RECORD = flags.DEFINE_bool("record", False, "Run the reproduction sweep and append it "
                            "to benchmarks/RESULTS.md.")
_RECORD_STEPS = flags.DEFINE_integer("record_steps", 300, "SAE steps per record run.")

# (name, overrides of config.sae) of the reproduction: k sweep, width sweep, dead latents.
K_SWEEP = (4, 8, 16, 32)
N_SWEEP = (128, 256, 512, 1024)
SWEEP_N, SWEEP_K = 512, 16
DEAD_N = 2048


def record_runs() -> list[tuple[str, str, dict]]:
  runs = [("k", f"k{k}", dict(k=k, num_latents=SWEEP_N)) for k in K_SWEEP]
  runs += [("n", f"n{n}", dict(k=SWEEP_K, num_latents=n)) for n in N_SWEEP]
  runs += [("dead", f"{'auxk' if aux else 'no_auxk'}_{'tied' if tied else 'untied'}",
            dict(k=SWEEP_K, num_latents=DEAD_N, aux_coeff=(1 / 32) if aux else 0.0,
                 tied_init=tied)) for aux in (True, False) for tied in (True, False)]
  return runs


def load_config():
  try:
    return parse_run_config(_CONFIG.value)
  except OSError as e:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    raise ConfigError(f"--config={path}: cannot load it "
                      f"({str(e).strip().splitlines()[-1].strip()})") from None


def _summary(metrics: dict) -> str:
  return (f"NMSE {metrics['nmse']:.4f}, L0 {metrics['l0']:.1f}, CE clean "
          f"{metrics['ce_clean']:.4f} / SAE {metrics['ce_sae']:.4f} (Δ "
          f"{metrics['delta_ce']:+.4f}) / zero-ablated {metrics['ce_zero']:.4f} (Δ "
          f"{metrics['delta_ce_zero']:+.4f}), loss recovered "
          f"{100 * metrics['ce_recovered']:.1f}%")


def record(base) -> None:
  """The reproduction sweep; appends its table to benchmarks/RESULTS.md."""
  base_dict = run_config_to_dict(base)
  base_dict["train"].update(num_steps=_RECORD_STEPS.value, eval_every=0,
                            checkpoint_every=0)
  rows = []
  for sweep, name, sae in record_runs():
    cfg = parse_run_config({**base_dict, "sae": {**base_dict["sae"], **sae}})
    workdir = os.path.join(_WORKDIR.value, name)
    result = train_sae(cfg, workdir)   # a finished run in workdir is only evaluated
    dead = result.state.model_state["sae"]["tokens_since_fired"] >= cfg.sae.dead_tokens
    peak = max(r["dead_fraction"] for r in read_metrics(
        os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train")
    rows.append({"sweep": sweep, "name": name, "k": cfg.sae.k,
                 "num_latents": cfg.sae.num_latents, "aux_coeff": cfg.sae.aux_coeff,
                 "tied_init": cfg.sae.tied_init, "dead_fraction": float(dead.mean()),
                 "peak_dead_fraction": peak, **result.metrics})
    print(f"{name}: {_summary(result.metrics)}, dead {rows[-1]['dead_fraction']:.3f}")
  env = results_log.environment()
  with open(os.path.join(results_log.REPO, "benchmarks", "sae.jsonl"), "a") as f:
    for row in rows:
      f.write(json.dumps({**env, "source": base_dict["source"], **row}) + "\n")
  header = ("| run | k | latents | AuxK coeff | tied init | val NMSE | L0 | dead latents "
            "(end / max logged) | Δ CE (SAE) | Δ CE (zero) | loss recovered |\n"
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
  lines = [f"| {r['name']} | {r['k']} | {r['num_latents']} | {r['aux_coeff']:.4g} | "
           f"{r['tied_init']} | {r['nmse']:.4f} | {r['l0']:.1f} | "
           f"{100 * r['dead_fraction']:.1f}% / {100 * r['peak_dead_fraction']:.1f}% | "
           f"{r['delta_ce']:+.4f} | "
           f"{r['delta_ce_zero']:+.4f} | {100 * r['ce_recovered']:.1f}% |" for r in rows]
  src = base.source
  body = (f"TopK SAEs on `{src.site}` of the model in `{src.workdir or src.hf_path}`, "
          f"{_RECORD_STEPS.value} steps of {src.batch_size}×{src.seq_len} tokens each "
          f"(Adam lr {base.optim.learning_rate}, dead = silent for "
          f"{base.sae.dead_tokens} tokens); val metrics over "
          f"{base.train.eval_batches} batches.\n\n" + header + "\n" + "\n".join(lines))
  command = " ".join(["python experiments/sae.py", *sys.argv[1:]])
  print(results_log.append_section("TopK sparse autoencoders: NMSE vs k and width, dead "
                                   "latents (experiments/sae.py --record)", body,
                                   command=command))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = load_config()
  if _RECORD.value:
    record(config)
    return
  result = train_sae(config, _WORKDIR.value)
  print(f"final: step {result.metrics['step']}, {_summary(result.metrics)}")


if __name__ == "__main__":
  run_cli(main, quiet_logs=quiet_orbax_logs)
