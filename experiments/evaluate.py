"""Perplexity and bits-per-byte of a Hugging Face checkpoint on a text file or directory.

  python experiments/evaluate.py --hf_path=path/to/Qwen2.5-0.5B --data=corpus.txt \
      --seq_len=1024 --batch_size=4

Loads the checkpoint with `sparsejax.interop.load_hf` (on all local devices, params
sharded like training), tokenizes --data with the checkpoint's tokenizer.json (or
--tokenizer; "bytes" for byte-level models), files of a directory joined by EOS, and
scores every token but the first in non-overlapping windows of --seq_len tokens (each
window starts a fresh context; the last one is partial). Prints the mean negative
log-likelihood per token, perplexity = exp(NLL / token) and bits-per-byte = total NLL
/ ln 2 / UTF-8 bytes of the text (comparable across tokenizers; with --max_tokens the
bytes are the scored share of the text's, pro rata).
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import app, flags

from sparsejax import sharding
from sparsejax.interop import HFCheckpointError, HFConfigError, load_hf
from sparsejax.models import DecoderLM
from sparsejax.train import tokenizer as tokenizer_lib

_HF_PATH = flags.DEFINE_string("hf_path", None, "Hugging Face checkpoint directory.",
                               required=True)
_DATA = flags.DEFINE_string("data", None, "Text file or directory of text files.",
                            required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer.json path or 'bytes' "
                                 "(default: <hf_path>/tokenizer.json).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per window.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Score at most this many tokens "
                                   "(0: all).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Param and compute dtype.")


def windows(tokens: np.ndarray, seq_len: int, batch_size: int):
  """Yields (inputs, targets, mask) int32/bool [batch_size, seq_len] batches covering
  the predictions of tokens[1:], padded (mask False) to whole windows and batches."""
  n = len(tokens) - 1
  starts = list(range(0, n, seq_len))
  for b in range(0, len(starts), batch_size):
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    mask = np.zeros((batch_size, seq_len), bool)
    for row, start in enumerate(starts[b:b + batch_size]):
      length = min(seq_len, n - start)
      inputs[row, :length] = tokens[start:start + length]
      targets[row, :length] = tokens[start + 1:start + length + 1]
      mask[row, :length] = True
    yield inputs, targets, mask


def evaluate(model: DecoderLM, variables: dict, tokens: np.ndarray, *, seq_len: int,
             batch_size: int, progress: bool = True) -> dict[str, float]:
  """{"nll": summed NLL in nats, "tokens": number scored} of tokens[1:] given the rest
  (causal, so padding after a window's end does not change its scores)."""
  @jax.jit
  def score(inputs, targets, mask):
    logits = model.apply(variables, inputs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(jnp.where(mask, nll, 0.0))

  total = math.ceil((len(tokens) - 1) / seq_len / batch_size)
  nll = 0.0
  for inputs, targets, mask in tqdm.tqdm(windows(tokens, seq_len, batch_size),
                                         total=total, desc="eval", unit="batch",
                                         disable=not progress, dynamic_ncols=True):
    nll += float(score(inputs, targets, mask))
  return {"nll": nll, "tokens": len(tokens) - 1}


def main(argv):
  del argv
  try:
    spec = _TOKENIZER.value or os.path.join(_HF_PATH.value, "tokenizer.json")
    tokenizer = tokenizer_lib.load_tokenizer(spec)
    documents = [d for _, d in tokenizer_lib.read_documents(_DATA.value)]
    mesh = sharding.make_mesh()
    config, params = load_hf(_HF_PATH.value, dtype=jnp.dtype(_DTYPE.value), mesh=mesh)
  except (HFCheckpointError, HFConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  tokens = tokenizer_lib.encode_documents(tokenizer, documents)
  num_bytes = sum(len(d) for d in documents)
  if len(tokens) < 2:
    sys.exit(f"error: --data={_DATA.value!r} has fewer than 2 tokens")
  if _MAX_TOKENS.value and _MAX_TOKENS.value + 1 < len(tokens):
    num_bytes *= _MAX_TOKENS.value / (len(tokens) - 1)   # the scored share, pro rata
    tokens = tokens[:_MAX_TOKENS.value + 1]
  if tokens.max() >= config.vocab_size:
    sys.exit(f"error: the tokenizer {spec!r} produced id {tokens.max()} >= the "
             f"model's vocab_size={config.vocab_size}")
  print(f"{config.num_layers} layers, d_model {config.d_model}, vocab "
        f"{config.vocab_size}; {len(tokens) - 1:,} tokens to score")
  # The params' shardings drive the partitioning (any batch size works).
  result = evaluate(DecoderLM(config), {"params": params}, tokens,
                    seq_len=_SEQ_LEN.value, batch_size=_BATCH.value)
  nll_per_token = result["nll"] / result["tokens"]
  print(f"nll/token {nll_per_token:.4f}  perplexity {math.exp(nll_per_token):.3f}  "
        f"bits-per-byte {result['nll'] / math.log(2) / num_bytes:.4f}  "
        f"({result['tokens']:,} tokens, {num_bytes:,.0f} bytes)")


if __name__ == "__main__":
  app.run(main)
