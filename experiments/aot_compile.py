r"""Plan a TPU pod run on this machine: compile a config's train and decode steps for a
TPU slice ahead of time (libtpu, no TPU needed) and report what one chip would do.

  python experiments/aot_compile.py --config=experiments/configs/scale/dense_1b.py \
      --topology=v5p:4x4x4 --config.mesh.fsdp=16 --config.mesh.tensor=4
  python experiments/aot_compile.py --config=experiments/configs/scale/moe_8b.py \
      --topology=v6e:16x16 --fit_layers=1,2

Params, optimizer state and batch are abstract sharded shapes (nothing is allocated);
XLA:TPU compiles the per-chip programs. Printed and written as JSON to --output: memory
per chip (arguments, outputs, donated, temporaries vs HBM), FLOPs and HBM bytes per
chip, the collectives of the compiled HLO (count, bytes, bytes sent over ICI), a roofline
step time with tokens/s and MFU, the decode step's bytes per token, and the parameter
bytes per token a decode step reads at batch 1–64 (expected distinct experts / memory
rows under uniform routing). --fit_layers=a,b compiles at a and b blocks and
extrapolates to the config's depth (minutes instead of tens of minutes for 8B models).
A step that does not fit in HBM prints `error: ...` naming the biggest buffers.

libtpu comes from `make aot-deps` (or pip install 'jax[tpu]'); without it the script
says so. `--table=report1.json,report2.json` prints the markdown table of reports.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from sparsejax.scaling.plan import DECODE_BATCHES, GIB, plan
from sparsejax.train.config import parse_config
from sparsejax.validation import ConfigError, run_cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (experiments/configs/scale/*.py); override "
    "fields with --config.model.num_layers=..., --config.mesh.fsdp=...",
    lock_config=False, accept_new_attributes=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4",
                                "TPU slice, e.g. v5e:2x2, v5p:4x4x4, v6e:16x16.")
_TRAIN = flags.DEFINE_bool("train", True, "Compile the train step (--notrain "
                           "--decode_batch=0: params and on-paper decode bytes only).")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1,
                                     "Sequences of the compiled decode step (0: none).")
_FIT_LAYERS = flags.DEFINE_list("fit_layers", [], "a,b: compile at a and b blocks and "
                                "extrapolate to config.model.num_layers.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON report path (default "
                              "workdir/aot/<config>_<topology>.json).")
_TABLE = flags.DEFINE_list("table", [], "Print the markdown table of these JSON reports "
                           "and exit.")


def _gib(value: float) -> str:
  """Bytes in GiB, or MiB / KiB below one GiB."""
  for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
    if value >= size:
      return f"{value / size:.2f} {unit}"
  return f"{value / 1024:.1f} KiB"


def _count(value: float) -> str:
  for unit, size in (("B", 1e9), ("M", 1e6)):
    if value >= size:
      return f"{value / size:.3g}{unit}"
  return f"{value:,.0f}"


def _step_lines(name: str, step: dict) -> list[str]:
  mem, roof = step["memory_bytes"], step["roofline"]
  lines = [f"{name} step ({step['tokens']:,} tokens):",
           f"  memory per chip: arguments {_gib(mem['argument'])}, outputs "
           f"{_gib(mem['output'])} (donated {_gib(mem['alias'])}), temporaries "
           f"{_gib(mem['temp'])}; total {_gib(mem['total'])} of {_gib(mem['hbm'])} HBM "
           f"({mem['fraction_of_hbm']:.0%})",
           f"  per chip: {step['flops_per_chip']:.3g} FLOPs, "
           f"{step['hbm_bytes_per_chip']:.3g} HBM bytes, "
           f"{step['ici_bytes_sent_per_chip']:.3g} ICI bytes sent"]
  used = [f"{op} {c['count']}× {_gib(c['bytes'])}" for op, c in step["collectives"].items()
          if c["count"]]
  lines.append(f"  collectives: {', '.join(used) or 'none'}")
  mfu = f", MFU {step['mfu']:.0%}" if step["mfu"] is not None else ""
  lines.append(f"  roofline: compute {roof['compute_s'] * 1e3:.2f} ms, HBM "
               f"{roof['hbm_s'] * 1e3:.2f} ms, ICI {roof['ici_s'] * 1e3:.2f} ms -> "
               f"{roof['step_s'] * 1e3:.2f} ms ({roof['bound']}-bound), "
               f"{step['tokens_per_s']:,.0f} tokens/s{mfu}")
  return lines


def summary(name: str, report: dict) -> str:
  """The report as printed lines."""
  mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
  how = (f"extrapolated from {report['compiled_layers']} blocks" if report["extrapolated"]
         else "compiled at full depth")
  lines = [f"{name} on {report['topology']}: {report['num_chips']} × {report['chip']} "
           f"chips, mesh {mesh}; {report['num_layers']} blocks ({how})",
           f"params: total {_count(report['total_params'])}, activated (non-embedding) "
           f"{_count(report['activated_params'])}"]
  if "train" in report:
    lines += _step_lines("train", report["train"])
  if "decode" in report:
    lines += _step_lines("decode", report["decode"])
    lines.append(f"  HBM bytes per decoded token: "
                 f"{report['decode']['hbm_bytes_per_token']:.3g}")
  paper = ", ".join(f"B={b}: {v / 1e6:,.0f} MB" for b, v in
                    report["decode_param_bytes_per_token"].items())
  lines.append(f"decode param bytes per token (bf16, on paper): {paper}")
  return "\n".join(lines)


TABLE_HEADER = (
    "| config | slice | mesh (data×fsdp×tensor×expert) | total / activated params | "
    "memory per chip (train) | train FLOPs per token, model / XLA | collective bytes "
    "per step per chip | est. step time | MFU | decode param MB/token B=1/64 |\n"
    "|---|---|---|---|---|---|---|---|---|---|")


def table_row(name: str, report: dict) -> str:
  """One markdown row of a report (TABLE_HEADER's columns)."""
  train, mesh = report["train"], report["mesh"]
  model = report["model_flops_per_token"]
  model = f"{3 * model / 1e9:.1f}" if model else "n/a"
  mfu = f"{train['mfu']:.0%}" if train["mfu"] is not None else "n/a"
  decode = report["decode_param_bytes_per_token"]
  extrapolated = "*" if report["extrapolated"] else ""
  return (f"| {name}{extrapolated} | {report['chip']}-{report['num_chips']} | "
          f"{mesh['data']}×{mesh['fsdp']}×{mesh['tensor']}×{mesh['expert']} | "
          f"{report['total_params'] / 1e9:.2f}B / "
          f"{report['activated_params'] / 1e9:.2f}B | "
          f"{train['memory_bytes']['total'] / GIB:.1f} GiB "
          f"({train['memory_bytes']['fraction_of_hbm']:.0%}) | "
          f"{model} / {train['xla_flops_per_token'] / 1e9:.1f} GFLOP | "
          f"{_gib(train['collective_bytes_per_chip'])} | "
          f"{train['roofline']['step_s'] * 1e3:.0f} ms ({train['roofline']['bound']}) | "
          f"{mfu} | {decode['1'] / 1e6:,.0f} / {decode['64'] / 1e6:,.0f} |")


DECODE_HEADER = ("| config | total / activated params | " + " | ".join(
    f"B={b}" for b in DECODE_BATCHES) + " |\n|---|---|" + "---|" * len(DECODE_BATCHES))


def decode_row(name: str, report: dict) -> str:
  """One markdown row of on-paper decode parameter MB per token (DECODE_HEADER)."""
  decode = report["decode_param_bytes_per_token"]
  return (f"| {name} | {report['total_params'] / 1e9:.2f}B / "
          f"{report['activated_params'] / 1e9:.2f}B | "
          + " | ".join(f"{decode[str(b)] / 1e6:,.0f}" for b in DECODE_BATCHES) + " |")


def tables(paths: list[str]) -> str:
  """The markdown tables of JSON reports: compiled train steps, then decode bytes."""
  reports = {}
  for path in paths:
    with open(path) as f:
      reports[os.path.basename(path).removesuffix(".json")] = json.load(f)
  compiled = [table_row(n, r) for n, r in reports.items() if "train" in r]
  decode = [decode_row(n, r) for n, r in reports.items()]
  return "\n".join(([TABLE_HEADER, *compiled, ""] if compiled else [])
                   + [DECODE_HEADER, *decode])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _TABLE.value:
    print(tables(_TABLE.value))
    return
  if _CONFIG.value is None:
    raise ConfigError("--config is required (e.g. experiments/configs/scale/dense_1b.py)")
  try:
    fit = tuple(int(v) for v in _FIT_LAYERS.value) or None
  except ValueError:
    raise ConfigError(f"--fit_layers={','.join(_FIT_LAYERS.value)} must be two ints a,b"
                      ) from None
  if fit is not None and len(fit) != 2:
    raise ConfigError(f"--fit_layers={','.join(_FIT_LAYERS.value)} must be two ints a,b")
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  stem, _, arg = os.path.basename(path).partition(":")
  name = stem.removesuffix(".py") + (f"_{arg}" if arg else "")
  report = plan(parse_config(_CONFIG.value), _TOPOLOGY.value, train=_TRAIN.value,
                decode_batch=_DECODE_BATCH.value, fit_layers=fit)
  report["config"] = name
  output = _OUTPUT.value or os.path.join(
      "workdir", "aot", f"{name}_{_TOPOLOGY.value.replace(':', '_')}.json")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(report, f, indent=1)
  print(summary(name, report))
  print(f"report: {output}")


if __name__ == "__main__":
  run_cli(main)
