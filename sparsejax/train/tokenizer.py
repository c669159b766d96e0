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
modification times — so tokenization runs once. Pre-tokenized `.npy` sources are used
as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np

from sparsejax import validation

BYTES = "bytes"
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
BATCH_DOCUMENTS = 64


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


def source_files(path: str) -> list[tuple[str, str]]:
  """(relpath, abspath) of the files of a text source, selected like the byte pipeline."""
  from sparsejax.train import data
  if path == "":
    return data._stdlib_files()
  if os.path.isfile(path):
    return [(os.path.basename(path), path)]
  return data._walk(path, lambda parts: not parts[-1].startswith("."))


def read_documents(path: str) -> list[tuple[str, bytes]]:
  """(relpath, bytes) of the usable (non-empty, NUL-free) files of a text source."""
  from sparsejax.train import data
  texts = data._read_texts(source_files(path))
  if not texts:
    raise data._error(path, "has no usable text (non-empty files without NUL bytes)")
  return texts


def is_text_source(path: str) -> bool:
  """False for pre-tokenized sources (a `.npy` file or a directory holding any)."""
  if path == "" or not os.path.exists(path):
    return path == ""
  if os.path.isfile(path):
    return not path.endswith(".npy")
  return not any(r.endswith(".npy") for r, _ in source_files(path))


def _documents(path: str, split: str, val_fraction: float) -> tuple[list[bytes], bool]:
  """(documents of `split`, whether the tokens are still to be tail-split): the byte
  pipeline's train/val split (by file hash; a single file by its tail)."""
  from sparsejax.train import data
  texts = read_documents(path)
  if len(texts) == 1:
    return [texts[0][1]], True
  return [d for r, d in texts if data._is_val(r, val_fraction) == (split == "val")], False


def _cache_key(spec: str, path: str, split: str, val_fraction: float) -> str:
  h = hashlib.sha256()
  with open(spec, "rb") as f:
    h.update(f.read())
  h.update(json.dumps([os.path.abspath(path), split, val_fraction]).encode())
  for rel, full in source_files(path):
    stat = os.stat(full)
    h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return h.hexdigest()[:32]


def load_tokenized(path: str, spec: str, split: str, val_fraction: float) -> np.ndarray:
  """Token ids of `split` of the text source `path` under tokenizer `spec`, read from
  (or written to) the `.npy` cache; memory-mapped when read."""
  from sparsejax.train import data
  key = _cache_key(spec, path, split, val_fraction)
  file = os.path.join(cache_dir(), "tokens", f"{key}.npy")
  if os.path.exists(file):
    return np.load(file, mmap_mode="r")
  documents, tail = _documents(path, split, val_fraction)
  tokens = encode_documents(load_tokenizer(spec), documents)
  if tail:
    tokens = data._tail_split(tokens, split, val_fraction)
  os.makedirs(os.path.dirname(file), exist_ok=True)
  tmp = f"{file}.{os.getpid()}.tmp.npy"
  np.save(tmp, tokens)
  os.replace(tmp, file)
  return tokens
