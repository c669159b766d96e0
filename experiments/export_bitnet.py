"""Export a trained BitNet b1.58 run to packed ternary weights and verify the logits.

  python experiments/train.py --config=experiments/configs/bitnet.py --workdir=workdir/bitnet
  python experiments/export_bitnet.py --workdir=workdir/bitnet --out=workdir/bitnet_export \
      --format=base3

Reads the latest checkpoint of --workdir (a "bitnet" or "bitnet_qsparse" run), writes
--out/weights.npz (packed ternary codes, 5 trits/byte with --format=base3 or 4 codes/byte
with --format=2bit, one float32 scale per projection, full-precision embedding, norms
and head) and --out/manifest.json, prints the size table, then loads the export and
checks on a random batch that its logits equal the fake-quantized model's bitwise.
Load it elsewhere with `sparsejax.train.export.load_ternary(out)`.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from sparsejax.models import DecoderLM
from sparsejax.ops.ternary_pack import FORMATS
from sparsejax.train.export import export_ternary, load_ternary, restore_latent

_WORKDIR = flags.DEFINE_string("workdir", None, "A BitNet training run's --workdir.",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (default: "
                           "<workdir>/export_<format>).")
_FORMAT = flags.DEFINE_enum("format", "base3", list(FORMATS),
                            "base3: 5 trits/byte (1.6 bits); 2bit: 4 codes/byte.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH = flags.DEFINE_integer("verify_batch", 2, "Batch size of the logits check "
                              "(0: skip it).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random verification tokens.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  out = _OUT.value or os.path.join(_WORKDIR.value, f"export_{_FORMAT.value}")
  try:
    config, latent, step = restore_latent(_WORKDIR.value, _STEP.value)
    print(f"exporting step {step} of {_WORKDIR.value} ({config.model.linear}) to {out}")
    export_ternary(_WORKDIR.value, out, format=_FORMAT.value, step=step)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if not _BATCH.value:
    return
  model, variables = load_ternary(out)
  shape = (_BATCH.value, config.data.seq_len)
  tokens = jnp.asarray(np.random.default_rng(_SEED.value).integers(
      0, config.model.vocab_size, shape), jnp.int32)
  want = jax.jit(DecoderLM(config.model).apply)(latent, tokens)
  got = jax.jit(model.apply)(variables, tokens)
  diff = float(jnp.max(jnp.abs(got - want)))
  try:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  except AssertionError:
    sys.exit(f"MISMATCH: the exported model's logits differ from the fake-quantized "
             f"model's on a random {list(shape)} batch (max |diff| = {diff:g})")
  print(f"verified: logits of the loaded ternary model are bitwise identical to the "
        f"fake-quantized model's on a random {list(shape)} batch (max |diff| = {diff:g})")


if __name__ == "__main__":
  app.run(main)
