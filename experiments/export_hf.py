"""Write a sparsejax training run as a Hugging Face checkpoint (safetensors + config.json).

  python experiments/train.py --config=experiments/configs/dense.py --workdir=workdir/dense
  python experiments/export_hf.py --workdir=workdir/dense --out=workdir/dense_hf

Reads the latest (or --step) checkpoint of --workdir and writes --out with
`sparsejax.interop.save_hf`: dense SwiGLU models as LlamaForCausalLM (Qwen2ForCausalLM
with q/k/v biases), "moe" models with softmax top-k renormalized routing as
MixtralForCausalLM. --like (default: the run's config.train.init_from_hf, if any) keeps
that checkpoint's architecture, config keys, expert layout and tokenizer files; without
it a run trained with a tokenizer.json gets that file copied. Configs HF cannot express
(Q-Sparse/BitNet linears, memory layers, sparse attention, shared experts, ...) stop
with an error naming the config field. Pruned weights stay exact zeros.
"""

from __future__ import annotations

import os
import shutil
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from sparsejax.interop import HFCheckpointError, HFConfigError, save_hf
from sparsejax.train.trainer import inference_params, restore_run

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's --workdir.",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).",
                           required=True)
_LIKE = flags.DEFINE_string("like", "", "A Hugging Face checkpoint directory to mirror "
                            "(default: the run's config.train.init_from_hf).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  try:
    config, state, step = restore_run(_WORKDIR.value, step=_STEP.value)
    like = _LIKE.value or config.train.init_from_hf or None
    save_hf(_OUT.value, config.model, inference_params(config, state), like=like)
  except (FileNotFoundError, FileExistsError, HFCheckpointError, HFConfigError) as e:
    sys.exit(f"error: {e}")
  tokenizer = config.data.tokenizer
  if like is None and tokenizer != "bytes":
    shutil.copy(tokenizer, os.path.join(_OUT.value, "tokenizer.json"))
  leaves = jax.tree.leaves(inference_params(config, state))
  size = sum(x.size for x in leaves)
  zeros = sum(int(jnp.sum(x == 0)) for x in leaves)
  print(f"wrote step {step} of {_WORKDIR.value} to {_OUT.value} "
        f"({size:,} params, {zeros / size:.1%} exact zeros)")


if __name__ == "__main__":
  app.run(main)
