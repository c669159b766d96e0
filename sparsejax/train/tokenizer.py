"""Tokenizers of the data pipeline: UTF-8 bytes or a Hugging Face `tokenizer.json`.

    config.data.tokenizer = "bytes"                        # default: vocab 256, EOS = 0
    config.data.tokenizer = "path/to/tokenizer.json"       # the `tokenizers` library

With a tokenizer.json, text sources (the embedded corpus, a text file or a directory
of text files; `sparsejax.train.data`) are split into train/val documents exactly as
for bytes, tokenized in batches of documents, joined by the tokenizer's EOS token
(`eos_token` of the `tokenizer_config.json` beside it, else the first of
`EOS_NAMES` in its vocabulary, else nothing) and cached as one `.npy` shard per
(source, split) under `$SPARSEJAX_CACHE_DIR` (default `~/.cache/sparsejax/tokens`),
keyed by the tokenizer file's contents and the source files' paths, sizes and
modification times — so tokenization runs once. Beside each shard, `<key>.json` holds
its token count and the UTF-8 byte count of the text it tokenized (`text_size`), from
which bits-per-byte is computed. Pre-tokenized `.npy` sources are used as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib

import numpy as np

from sparsejax import validation

BYTES = "bytes"
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
BATCH_DOCUMENTS = 64
CACHE_VERSION = 2   # bump when what a cache key's files hold changes


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocab 256); documents are separated by byte 0."""
  vocab_size = 256
  eos_id = 0

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

  def decode(self, ids) -> str:
    """UTF-8 text of byte ids; ids outside [0, 256) (a byte model with vocab_size >
    256 can sample them) decode as U+FFFD."""
    ids = [int(i) for i in ids]
    text = bytes(i if 0 <= i < 256 else 0xFF for i in ids)   # 0xFF is never valid UTF-8
    return text.decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers.Tokenizer` read from a tokenizer.json file."""

  def __init__(self, path: str):
    import tokenizers
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    self.eos_id = self._find_eos()

  def _find_eos(self) -> int | None:
    config = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
    names = list(EOS_NAMES)
    if os.path.exists(config):
      with open(config) as f:
        eos = json.load(f).get("eos_token")
      eos = eos.get("content") if isinstance(eos, dict) else eos
      names = ([eos] if eos else []) + names
    return next((self._tok.token_to_id(n) for n in names
                 if self._tok.token_to_id(n) is not None), None)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def check_tokenizer(spec: str, field: str = "config.data.tokenizer") -> None:
  validation.check(spec == BYTES or os.path.isfile(spec), field, spec,
                   f"{BYTES!r} or the path of an existing tokenizer.json file")


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
  """The tokenizer named by `config.data.tokenizer`."""
  check_tokenizer(spec)
  return ByteTokenizer() if spec == BYTES else HFTokenizer(spec)


def encode_documents(tokenizer, documents: list[bytes]) -> np.ndarray:
  """Tokenizes `documents` in batches and joins them with EOS (when the tokenizer has
  one): a 1-D uint16 (vocab <= 65536) or int32 array."""
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
  eos = [] if tokenizer.eos_id is None else [np.asarray([tokenizer.eos_id], dtype)]
  pieces = []
  for start in range(0, len(documents), BATCH_DOCUMENTS):
    texts = [d.decode("utf-8", errors="replace")
             for d in documents[start:start + BATCH_DOCUMENTS]]
    for ids in tokenizer.encode_batch(texts):
      pieces += [*(eos if pieces else []), ids.astype(dtype)]
  return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


def cache_dir() -> str:
  return os.environ.get("SPARSEJAX_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "sparsejax"))


def read_documents(path: str) -> list[tuple[str, bytes]]:
  """(relpath, bytes) of the usable (non-empty, NUL-free) files of a text source."""
  from sparsejax.train import data   # data imports this module: imported at use
  texts = data.read_texts(data.source_files(path))
  if not texts:
    raise data.source_error(path, "has no usable text (non-empty files without NUL "
                                  "bytes)")
  return texts


def text_size(tokenizer, documents: list[bytes]) -> int:
  """UTF-8 bytes of the text `encode_documents(tokenizer, documents)` tokenizes: the
  documents as it decodes them (invalid UTF-8 as U+FFFD) plus one byte per EOS
  separator, the byte pipeline's NUL — so a split of valid UTF-8 text has the same byte
  count under every tokenizer with an EOS token."""
  size = sum(len(d.decode("utf-8", errors="replace").encode("utf-8"))
             for d in documents)
  return size + (len(documents) - 1 if documents and tokenizer.eos_id is not None else 0)


def _cache_key(spec: str, path: str, split: str, val_fraction: float) -> str:
  from sparsejax.train import data
  h = hashlib.sha256()
  with open(spec, "rb") as f:
    h.update(f.read())
  h.update(json.dumps([CACHE_VERSION, os.path.abspath(path), split, val_fraction]
                      ).encode())
  for rel, full in data.source_files(path):
    stat = os.stat(full)
    h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return h.hexdigest()[:32]


def _save_atomic(file: str, save) -> None:
  """`save(tmp)` then renames tmp to `file`, so a reader never sees half a file."""
  base, ext = os.path.splitext(file)
  tmp = f"{base}.{os.getpid()}.tmp{ext}"
  save(tmp)
  os.replace(tmp, file)


def _tokenize_cached(path: str, spec: str, split: str, val_fraction: float
                     ) -> tuple[np.ndarray, dict[str, int]]:
  """(token ids, {"num_tokens", "num_bytes"}) of `split` of the text source `path`:
  read from the cache (ids memory-mapped) or tokenized and written to it, the counts
  first so that a cached `.npy` always has its `.json` beside it."""
  from sparsejax.train import data
  key = _cache_key(spec, path, split, val_fraction)
  file = os.path.join(cache_dir(), "tokens", f"{key}.npy")
  counts_file = os.path.splitext(file)[0] + ".json"
  if os.path.exists(file) and os.path.exists(counts_file):
    with open(counts_file) as f:
      return np.load(file, mmap_mode="r"), json.load(f)
  documents = data.text_documents(path, split, val_fraction)
  tokenizer = load_tokenizer(spec)
  tokens = encode_documents(tokenizer, documents)
  counts = {"num_tokens": len(tokens), "num_bytes": text_size(tokenizer, documents)}
  os.makedirs(os.path.dirname(file), exist_ok=True)
  _save_atomic(counts_file, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(counts)))
  _save_atomic(file, lambda tmp: np.save(tmp, tokens))
  return tokens, counts


def load_tokenized(path: str, spec: str, split: str, val_fraction: float) -> np.ndarray:
  """Token ids of `split` of the text source `path` under tokenizer `spec`, read from
  (or written to) the `.npy` cache; memory-mapped when read. The split's documents are
  those of the byte pipeline (`sparsejax.train.data.text_documents`)."""
  return _tokenize_cached(path, spec, split, val_fraction)[0]


def bytes_per_token(path: str, spec: str, split: str, val_fraction: float) -> float:
  """UTF-8 bytes per token of `split` of the text source `path` under tokenizer
  `spec` (`text_size` / number of tokens, recorded when it was tokenized; NaN for an
  empty split)."""
  counts = _tokenize_cached(path, spec, split, val_fraction)[1]
  return counts["num_bytes"] / counts["num_tokens"] if counts["num_tokens"] else math.nan
