"""Byte-level / pre-tokenized LM data pipelines on grain.

Sources (`DataConfig.path`):

* `""` (default): the embedded corpus, the Python standard-library `.py` sources of the
  running interpreter (`sysconfig.get_paths()["stdlib"]`). Excluded: anything under a
  directory named `site-packages`, `dist-packages` or `__pycache__`, hidden files/dirs, and
  tests, i.e. every path whose relative path has a component (directory or file name)
  equal to `test`, `tests` or `idle_test`, or starting with `test_` (so `test/...`,
  `ctypes/test/...`, `idlelib/idle_test/...`, `lib2to3/tests/...` and any `test_*.py`).
* a text file: its bytes; the last `val_fraction` of them is val, the rest train.
* a directory: if it holds any `*.npy` file it is a directory of pre-tokenized shards
  (only the `*.npy` files are used); otherwise all regular files under it, recursively,
  skipping hidden files/dirs, empty files and binary files (containing a NUL byte).
* a `.npy` file or shard directory: 1-D integer arrays, memory-mapped.

Multi-file sources are split by a stable hash of the `/`-separated relative path: a file
goes to val iff `int(md5(relpath).hexdigest(), 16) % 10_000 < val_fraction * 10_000`.
A source with a single usable file or shard is split by its tail, like a single text file.
Text files are byte tokens (uint8) joined by `EOS`, or, with `config.data.tokenizer` a
tokenizer.json path, its token ids (tokenized once and cached as .npy shards,
`sparsejax.train.tokenizer`); shards are concatenated as they are
(they are expected to carry their own separators) in their integer dtype. Given the
model's `vocab_size`, every token id is checked to lie in [0, vocab_size) when a source
is opened (an id outside would index past the embedding: NaN or silently wrong), and
the error names the shard, the id, its index and the range.

Bits-per-byte needs the UTF-8 bytes behind the tokens (`bytes_per_token`): one per
byte token; for a tokenizer.json, recorded when the text is tokenized (EOS separators
count one byte, like the byte pipeline's NUL); unknown (NaN) for `.npy` shards.

Examples are packed, non-overlapping windows: window i is
`tokens[i * seq_len : i * seq_len + seq_len + 1]`, `inputs = window[:-1]`,
`targets = window[1:]`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sysconfig

import grain
import numpy as np

from sparsejax import validation
from sparsejax.train import tokenizer as tokenizer_lib

EOS = 0  # document separator token (byte 0, NUL, never occurs in text sources)
VOCAB_SIZE = 256  # byte-level

_PATH_FIELD = "config.data.path"
_SPLITS = ("train", "val")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_NAMES = frozenset({"test", "tests", "idle_test"})


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Data pipeline config; see the module docstring for the meaning of `path`."""
  path: str = ""             # "" = embedded corpus; text file/dir, .npy file or dir of shards
  seq_len: int = 256          # tokens per example (inputs); >= 1
  batch_size: int = 32        # GLOBAL batch size; must be divisible by process count
  val_fraction: float = 0.05  # (0, 1): share of files (or tail of a single file) for val
  seed: int = 0               # shuffle seed
  tokenizer: str = "bytes"    # "bytes" or a tokenizer.json path (`sparsejax.train.tokenizer`)

  def validate(self, prefix: str) -> None:
    validation.check(isinstance(self.path, str), f"{prefix}.path", self.path, "a string")
    validation.check(self.seq_len >= 1, f"{prefix}.seq_len", self.seq_len, ">= 1")
    validation.check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size,
                     ">= 1")
    validation.check(0.0 < self.val_fraction < 1.0, f"{prefix}.val_fraction",
                     self.val_fraction, "in (0, 1)")
    validation.check(self.seed >= 0, f"{prefix}.seed", self.seed, ">= 0")
    tokenizer_lib.check_tokenizer(self.tokenizer, f"{prefix}.tokenizer")


def source_error(path: str, msg: str) -> validation.ConfigError:
  """A ConfigError "config.data.path=<path>: <msg>" about the data source `path`."""
  return validation.ConfigError(f"{_PATH_FIELD}={path!r}: {msg}")


def _is_val(relpath: str, val_fraction: float) -> bool:
  """Stable train/val assignment of a file by the md5 of its `/`-separated relpath."""
  h = int(hashlib.md5(relpath.encode()).hexdigest(), 16)
  return h % 10_000 < val_fraction * 10_000


def _is_test_path(parts: list[str]) -> bool:
  return any(p in _TEST_NAMES or p.startswith("test_") for p in parts)


def _walk(root: str, prune) -> list[tuple[str, str]]:
  """Sorted (relpath with '/', abspath) of regular files under `root`, walking only into
  directories whose relative-path components pass `prune(parts) -> keep`."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    reldir = os.path.relpath(dirpath, root)
    base = [] if reldir == "." else reldir.split(os.sep)
    dirnames[:] = [d for d in dirnames if prune(base + [d])]
    for f in filenames:
      full = os.path.join(dirpath, f)
      if prune(base + [f]) and os.path.isfile(full):
        out.append(("/".join(base + [f]), full))
  return sorted(out)


def _stdlib_files() -> list[tuple[str, str]]:
  """(relpath, abspath) of the embedded corpus's `.py` files, sorted by relpath."""
  def keep(parts):
    return not (parts[-1].startswith(".") or parts[-1] in _EXCLUDED_DIRS
                or _is_test_path(parts[-1:]))
  root = sysconfig.get_paths()["stdlib"]
  return [(r, p) for r, p in _walk(root, keep) if r.endswith(".py")]


def source_files(path: str) -> list[tuple[str, str]]:
  """(relpath with '/', abspath) of the files of the source `path`, sorted: the
  embedded corpus's `.py` files for "", `[(basename, path)]` for a file, else the
  regular files under the directory, skipping hidden files and directories."""
  if path == "":
    return _stdlib_files()
  if os.path.isfile(path):
    return [(os.path.basename(path), path)]
  return _walk(path, lambda parts: not parts[-1].startswith("."))


def is_text_source(path: str) -> bool:
  """Whether `path` is a text source (the embedded corpus, a text file or a directory
  of text files); False for pre-tokenized `.npy` sources and missing paths."""
  if path == "":
    return True
  if not os.path.exists(path):
    return False
  if os.path.isfile(path):
    return not path.endswith(".npy")
  return not any(r.endswith(".npy") for r, _ in source_files(path))


def read_texts(files: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
  """(relpath, bytes) of `files` (from `source_files`), dropping empty and binary
  (NUL-containing) ones."""
  out = []
  for rel, full in files:
    with open(full, "rb") as f:
      data = f.read()
    if data and b"\0" not in data:
      out.append((rel, data))
  return out


def text_documents(path: str, split: str, val_fraction: float) -> list[bytes]:
  """The documents (raw bytes, in order) of `split` of the text source `path`: the
  files whose relpath hashes to `split` (module docstring), or for a single usable file
  the tail `val_fraction` of its bytes (val) or the rest (train). Raises ConfigError
  naming `config.data.path` for a missing path, a single file with NUL bytes or a
  directory without usable files."""
  if path != "" and not os.path.exists(path):
    raise source_error(path, "path does not exist")
  if os.path.isfile(path):
    with open(path, "rb") as f:
      data = f.read()
    if b"\0" in data:
      raise source_error(path, "file contains NUL bytes (binary?); text sources must not")
    texts = [(os.path.basename(path), data)]
  else:
    texts = read_texts(source_files(path))
  if not texts:
    raise source_error(path, "directory has no usable files (non-hidden, non-empty text "
                             "files without NUL bytes, or *.npy shards)")
  if len(texts) == 1:
    return [_tail_split(texts[0][1], split, val_fraction)]
  return [d for r, d in texts if _is_val(r, val_fraction) == (split == "val")]


_CHECK_CHUNK = 1 << 24   # token ids scanned at a time (bounded memory on memory maps)
_CHECKED_SHARDS: set[tuple] = set()   # (realpath, size, mtime, vocab) found in range


def _check_ids(tokens: np.ndarray, source: str, vocab_size: int | None) -> None:
  """Raises ConfigError naming `source`, the first id outside [0, vocab_size) and its
  index. Skipped when `vocab_size` is None or the dtype cannot hold a bad id."""
  if vocab_size is None:
    return
  info = np.iinfo(tokens.dtype)
  if info.min >= 0 and info.max < vocab_size:
    return
  for start in range(0, len(tokens), _CHECK_CHUNK):
    chunk = np.asarray(tokens[start:start + _CHECK_CHUNK])
    if chunk.min() >= 0 and chunk.max() < vocab_size:
      continue
    i = int(np.argmax((chunk < 0) | (chunk >= vocab_size)))
    raise source_error(source, f"token id {int(chunk[i])} at index {start + i} is "
                               f"outside [0, {vocab_size}) (config.model.vocab_size="
                               f"{vocab_size})")


def _load_npy(path: str, vocab_size: int | None = None) -> np.ndarray:
  """A 1-D integer shard, memory-mapped, its ids checked against `vocab_size` (once
  per file version)."""
  try:
    arr = np.load(path, mmap_mode="r")
  except ValueError:  # e.g. an empty array cannot be memory-mapped
    arr = np.load(path)
  if arr.ndim != 1 or arr.dtype.kind not in "iu":
    raise source_error(path, f"pre-tokenized shards must be 1-D integer arrays, got "
                             f"shape {arr.shape} dtype {arr.dtype}")
  stat = os.stat(path)
  key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, vocab_size)
  if key not in _CHECKED_SHARDS:
    _check_ids(arr, path, vocab_size)
    _CHECKED_SHARDS.add(key)
  return arr


def _tail_split(tokens, split: str, val_fraction: float):
  """The last `int(len(tokens) * val_fraction)` items of an array or bytes (val), or
  the items before them (train)."""
  n_val = int(len(tokens) * val_fraction)
  return tokens[len(tokens) - n_val:] if split == "val" else tokens[:len(tokens) - n_val]


def _join_texts(texts: list[bytes]) -> np.ndarray:
  return np.frombuffer(bytes([EOS]).join(texts), dtype=np.uint8)


def _load(path: str, split: str, val_fraction: float,
          vocab_size: int | None = None) -> np.ndarray:
  if is_text_source(path) or not os.path.exists(path):
    return _join_texts(text_documents(path, split, val_fraction))
  if os.path.isfile(path):
    return _tail_split(_load_npy(path, vocab_size), split, val_fraction)
  shards = [(r, p) for r, p in source_files(path) if r.endswith(".npy")]
  if len(shards) == 1:
    return _tail_split(_load_npy(shards[0][1], vocab_size), split, val_fraction)
  chosen = [_load_npy(p, vocab_size) for r, p in shards
            if _is_val(r, val_fraction) == (split == "val")]
  return np.concatenate(chosen) if chosen else np.zeros((0,), np.int32)


@functools.lru_cache(maxsize=4)
def _load_embedded(split: str, val_fraction: float) -> np.ndarray:
  return _load("", split, val_fraction)


def load_tokens(cfg: DataConfig, split: str, *,
                vocab_size: int | None = None) -> np.ndarray:
  """The 1-D token array of `split` in {"train", "val"}.

  Returns uint8 bytes (text sources, documents joined by `EOS`) or the shards' integer
  dtype (pre-tokenized; possibly a read-only memory map). Shape `[num_tokens]`. The
  embedded corpus is cached per (split, val_fraction) and returned read-only. Raises
  ValueError naming `config.data.path` for a missing path, a directory without usable
  files, an empty split or (given `vocab_size`) a token id outside [0, vocab_size).
  """
  validation.check_choice("split", split, _SPLITS)
  if cfg.tokenizer != tokenizer_lib.BYTES and is_text_source(cfg.path):
    tokens = tokenizer_lib.load_tokenized(cfg.path, cfg.tokenizer, split,
                                          float(cfg.val_fraction))
    _check_ids(tokens, cfg.path, vocab_size)   # the tokenizer's ids vs the model's
  elif cfg.path == "":
    tokens = _load_embedded(split, float(cfg.val_fraction))
    _check_ids(tokens, cfg.path, vocab_size)
  else:   # each .npy shard is checked as it is opened; text bytes here
    tokens = _load(cfg.path, split, float(cfg.val_fraction), vocab_size)
    if tokens.dtype == np.uint8:
      _check_ids(tokens, cfg.path, vocab_size)
  if len(tokens) == 0:
    raise source_error(cfg.path, f"the {split} split is empty (val_fraction="
                                 f"{cfg.val_fraction}); add data or change "
                                 f"config.data.val_fraction")
  return tokens


def bytes_per_token(cfg: DataConfig, split: str) -> float:
  """Mean UTF-8 bytes per token of `split`, the denominator of bits-per-byte: 1 for
  byte tokens of a text source; with a tokenizer.json, the bytes of the split's text
  over its token count (`sparsejax.train.tokenizer.bytes_per_token`); NaN for
  pre-tokenized `.npy` sources, whose text is unknown."""
  validation.check_choice("split", split, _SPLITS)
  if not is_text_source(cfg.path):
    return math.nan
  if cfg.tokenizer == tokenizer_lib.BYTES:
    return 1.0
  return tokenizer_lib.bytes_per_token(cfg.path, cfg.tokenizer, split,
                                       float(cfg.val_fraction))


class WindowSource:
  """Random-access packed windows: item i is a dict of int32[seq_len] arrays
  `{"inputs": w[:-1], "targets": w[1:]}` with `w = tokens[i*seq_len : i*seq_len+seq_len+1]`.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len
    self._len = max(0, (len(tokens) - 1) // seq_len)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"window {index} out of range [0, {self._len})")
    start = index * self._seq_len
    w = np.asarray(self._tokens[start:start + self._seq_len + 1], dtype=np.int32)
    return {"inputs": w[:-1], "targets": w[1:]}

  def __repr__(self) -> str:
    return f"WindowSource(num_tokens={len(self._tokens)}, seq_len={self._seq_len})"


def make_dataset(cfg: DataConfig, split: str, *, vocab_size: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """An infinite grain dataset of batches for this process.

  Yields dicts `{"inputs": int32[local_b, seq_len], "targets": int32[local_b, seq_len]}`
  with `local_b = batch_size // process_count` and targets the inputs shifted by one.
  Process p takes windows `p::process_count` (disjoint across processes). "train" is
  shuffled by `cfg.seed` and reshuffled every epoch (batches may span epochs); "val" is
  in fixed order, the same batches every epoch. The iterator's `get_state()` is a
  JSON-serializable dict that `set_state()` accepts back. Process index/count default to
  `jax.process_index()` / `jax.process_count()`. `vocab_size` (the model's) checks the
  token ids when the source is opened (see `load_tokens`).
  """
  cfg.validate("config.data")
  validation.check_choice("split", split, _SPLITS)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  validation.check(process_count >= 1, "process_count", process_count, ">= 1")
  validation.check(0 <= process_index < process_count, "process_index", process_index,
                   f"in [0, {process_count})")
  validation.check(cfg.batch_size % process_count == 0, "config.data.batch_size",
                   cfg.batch_size, f"divisible by the process count {process_count}")
  local_b = cfg.batch_size // process_count
  tokens = load_tokens(cfg, split, vocab_size=vocab_size)
  source = WindowSource(tokens, cfg.seq_len)
  if len(source) < cfg.batch_size:
    need = cfg.batch_size * cfg.seq_len + 1
    raise source_error(cfg.path, f"the {split} split has {len(tokens)} tokens but one "
                                 f"global batch needs at least {need} (batch_size="
                                 f"{cfg.batch_size} windows of seq_len+1="
                                 f"{cfg.seq_len + 1} tokens, packed); use more data or "
                                 "a smaller seq_len/batch_size")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if split == "train":
    ds = ds.shuffle(seed=cfg.seed).repeat().batch(local_b, drop_remainder=True)
  else:
    ds = ds.batch(local_b, drop_remainder=True).repeat()
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
