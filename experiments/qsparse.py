"""Q-Sparse and BitNet b1.58 at small scale: dense vs top-K 70/50/30% vs ternary weights.

Trains every variant from the same base config (experiments/configs/dense.py) for the
same steps and tokens on the embedded corpus, then writes a table (val loss,
bits-per-byte, measured activation sparsity, activated params per token) and the val
curves to --workdir; --record appends the table to benchmarks/RESULTS.md.

  python experiments/qsparse.py --workdir=workdir/qsparse_repro --record
  python experiments/qsparse.py --workdir=/tmp/q --steps=20 --variants=dense,qsparse70

Interrupted? Rerun the same command: finished variants are kept, the running one resumes.
The paper's claim under test (Q-Sparse, arXiv 2407.10969): training from scratch with
70% top-K (≈40% overall sparsity) reaches the dense model's loss.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import configs  # noqa: E402  (sibling packages)
import results_log  # noqa: E402

from sparsejax.train import sweep  # noqa: E402

RELU2 = {"ffn": "relu2_glu"}
VARIANTS = {
    "dense": ({}, "SwiGLU FFN, full-precision dense projections"),
    "dense_relu2": ({"model": RELU2}, "dense with the ReLU²-GLU FFN of the Q-Sparse runs"),
    "qsparse70": ({"model": {**RELU2, "linear": "qsparse",
                             "linear_options": {"topk_ratio": 0.7}}},
                  "top-K keeps 70% of every projection input"),
    "qsparse50": ({"model": {**RELU2, "linear": "qsparse",
                             "linear_options": {"topk_ratio": 0.5}}}, "top-K 50%"),
    "qsparse30": ({"model": {**RELU2, "linear": "qsparse",
                             "linear_options": {"topk_ratio": 0.3}}}, "top-K 30%"),
    "bitnet": ({"model": {"linear": "bitnet"}},
               "BitNet b1.58: ternary weights, 8-bit activations, SwiGLU"),
    "bitnet_qsparse70": ({"model": {**RELU2, "linear": "bitnet_qsparse",
                                    "linear_options": {"topk_ratio": 0.7}}},
                         "BitNet b1.58 + top-K 70% of the int8 activations"),
}

_CONFIG = config_flags.DEFINE_config_file("config", configs.path("dense"),
                                          "Base config shared by every variant.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/qsparse_repro", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of every variant.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to train.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    sys.exit(f"error: --variants has unknown {unknown}; allowed: {list(VARIANTS)}")
  base = sweep.deep_update(_CONFIG.value.to_dict(), {
      "train": {"num_steps": _STEPS.value, "sample_tokens": 0,
                "eval_every": max(_STEPS.value // 5, 1),
                "checkpoint_every": max(_STEPS.value // 5, 1)}})
  results = []
  for name in _VARIANTS.value:
    overrides, description = VARIANTS[name]
    print(f"=== {name}: {description}")
    results.append(sweep.run_variant(name, sweep.deep_update(base, overrides),
                                     _WORKDIR.value, description))
  table = sweep.markdown_table(results, baseline="dense" if "dense" in
                               _VARIANTS.value else None)
  plot = sweep.plot_curves(_WORKDIR.value, list(_VARIANTS.value),
                           os.path.join(_WORKDIR.value, "val_curves.png"),
                           f"Q-Sparse / BitNet b1.58, {_STEPS.value} steps")
  legend = "\n".join(f"- `{r.name}`: {r.description}" for r in results)
  body = (f"{table}\n\n{legend}\n\nBase config: d_model {base['model']['d_model']}, "
          f"{base['model']['num_layers']} layers, seq_len {base['data']['seq_len']}, "
          f"batch {base['data']['batch_size']}, {_STEPS.value} steps. Activated params: "
          "non-embedding weights times the measured kept fraction of each projection's "
          "input (val batches).")
  with open(os.path.join(_WORKDIR.value, "results.md"), "w") as f:
    f.write(f"# Q-Sparse / BitNet b1.58 comparison\n\n{body}\n\n![val curves]"
            f"(val_curves.png)\n")
  print(body)
  print(f"plot: {plot}")
  if _RECORD.value:
    results_log.append_section(
        "Q-Sparse / BitNet b1.58 from scratch (experiments/qsparse.py)",
        body, command=" ".join(["python experiments/qsparse.py", *sys.argv[1:]]))


if __name__ == "__main__":
  app.run(main)
