"""Tests for sparsejax.train.data (small inputs; runs in a few seconds on CPU)."""

import hashlib
import itertools
import json
import os
import sysconfig

import numpy as np
import pytest

from sparsejax import validation
from sparsejax.train import data


def _hash_val(relpath, frac):
  return int(hashlib.md5(relpath.encode()).hexdigest(), 16) % 10_000 < frac * 10_000


def _text(rng, n):
  """Random bytes without NUL (so windows are unique and EOS-free)."""
  return rng.integers(1, 256, size=n, dtype=np.uint8).tobytes()


def _take(ds, n):
  return list(itertools.islice(iter(ds), n))


def _rows(batches):
  return [tuple(r) for b in batches for r in b["inputs"]]


@pytest.fixture
def text_file(tmp_path):
  p = tmp_path / "corpus.txt"
  p.write_bytes(_text(np.random.default_rng(0), 20_000))
  return p


def _ds(path, split, pi=0, pc=1, **kw):
  cfg = data.DataConfig(path=str(path), **{"seq_len": 16, "batch_size": 4, **kw})
  return data.make_dataset(cfg, split, process_index=pi, process_count=pc)


# ---------------------------------------------------------------- embedded corpus


def test_default_corpus_files_and_split():
  files = [r for r, _ in data.source_files("")]
  assert files == sorted(files) and len(files) > 100
  assert "os.py" in files and "json/__init__.py" in files
  for r in files:
    parts = r.split("/")
    assert r.endswith(".py")
    assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts)
    assert not any(p.startswith("test_") for p in parts), r
  # Test dirs that exist in this stdlib really were excluded (checked on disk).
  root = sysconfig.get_paths()["stdlib"]
  for test_file in ("test/__init__.py", "unittest/test/__init__.py",
                    "idlelib/idle_test/__init__.py"):
    if os.path.exists(os.path.join(root, test_file)):
      assert test_file not in files
  val = {r for r in files if _hash_val(r, 0.05)}
  train = set(files) - val
  assert val and train and not val & train

  cfg = data.DataConfig()
  tr, va = data.load_tokens(cfg, "train"), data.load_tokens(cfg, "val")
  assert tr.dtype == va.dtype == np.uint8 and tr.ndim == va.ndim == 1
  # Non-empty documents joined by EOS: n-1 separators and exactly the files' bytes.
  sizes = {r: os.path.getsize(os.path.join(root, r)) for r in files}
  val, train = ({r for r in s if sizes[r]} for s in (val, train))
  assert (va == data.EOS).sum() == len(val) - 1
  assert len(va) == sum(sizes[r] for r in val) + len(val) - 1
  assert len(tr) == sum(sizes[r] for r in train) + len(train) - 1
  assert int(tr.max()) < data.VOCAB_SIZE
  # Deterministic: a fresh (uncached) load gives the same tokens.
  np.testing.assert_array_equal(data._load_embedded.__wrapped__("val", 0.05), va)
  with open(os.path.join(root, sorted(val)[0]), "rb") as f:
    first = f.read()
  assert va[:len(first)].tobytes() == first


# ---------------------------------------------------------------- batches


def test_batch_shapes_and_shifted_targets(text_file):
  tokens = np.frombuffer(text_file.read_bytes(), np.uint8)
  n_train = len(tokens) - int(len(tokens) * 0.05)
  b0, b1 = _take(_ds(text_file, "val", seq_len=16, batch_size=4), 2)
  for b in (b0, b1):
    assert set(b) == {"inputs", "targets"}
    for x in b.values():
      assert x.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  # Val batch 1, row 2 is window 6 of the val tail: tokens[n_train + 96 : ... + 17].
  ref = tokens[n_train + 6 * 16:n_train + 6 * 16 + 17].astype(np.int32)
  np.testing.assert_array_equal(b1["inputs"][2], ref[:-1])
  np.testing.assert_array_equal(b1["targets"][2], ref[1:])


def test_shuffle_determinism_and_epochs(text_file):
  a = _take(_ds(text_file, "train", seed=1), 3)
  b = _take(_ds(text_file, "train", seed=1), 3)
  c = _take(_ds(text_file, "train", seed=2), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert _rows(a) != _rows(c)
  # Each epoch is a permutation of all windows, and epochs are reshuffled.
  n_tokens = len(data.load_tokens(data.DataConfig(path=str(text_file)), "train"))
  n_win = (n_tokens - 1) // 64
  ds = _ds(text_file, "train", seq_len=64, batch_size=1, seed=1)
  rows = _rows(_take(ds, 2 * n_win))
  assert len(set(rows[:n_win])) == n_win and set(rows[:n_win]) == set(rows[n_win:])
  assert rows[:n_win] != rows[n_win:]


def test_val_order_fixed_and_repeats(text_file):
  val = data.load_tokens(data.DataConfig(path=str(text_file)), "val")
  n_batches = ((len(val) - 1) // 16) // 4
  a = _take(_ds(text_file, "val"), n_batches + 1)
  b = _take(_ds(text_file, "val"), n_batches + 1)
  assert _rows(a) == _rows(b)
  expected = [tuple(val[i * 16:i * 16 + 16].astype(np.int32)) for i in range(4)]
  assert _rows(a[:1]) == expected  # in order, not shuffled
  assert _rows(a[-1:]) == expected  # infinite: the next epoch starts over


def test_process_sharding_disjoint_and_complete(tmp_path):
  rng = np.random.default_rng(1)
  for i in range(6):
    (tmp_path / f"doc{i}.txt").write_bytes(_text(rng, 3000))
  kw = dict(seq_len=16, val_fraction=0.3)
  n_tokens = len(data.load_tokens(data.DataConfig(path=str(tmp_path), **kw), "train"))
  n_win = (n_tokens - 1) // 16
  # One epoch each: 1 process x 1 row/batch vs. 2 processes x 1 row/batch.
  full = _rows(_take(_ds(tmp_path, "train", batch_size=1, **kw), n_win))
  p0 = _rows(_take(_ds(tmp_path, "train", 0, 2, batch_size=2, **kw), (n_win + 1) // 2))
  p1 = _rows(_take(_ds(tmp_path, "train", 1, 2, batch_size=2, **kw), n_win // 2))
  assert len(set(full)) == n_win
  assert len(set(p0)) == len(p0) and len(set(p1)) == len(p1)
  assert not set(p0) & set(p1)
  assert set(p0) | set(p1) == set(full)
  assert _take(_ds(tmp_path, "train", 1, 2, batch_size=4, **kw), 1)[0]["inputs"].shape == (
      2, 16)
  with pytest.raises(ValueError, match="config.data.batch_size"):
    _ds(tmp_path, "train", 0, 3, batch_size=4, **kw)


# ---------------------------------------------------------------- user sources


def test_user_text_directory(tmp_path):
  rng = np.random.default_rng(2)
  docs = {}
  for i in range(8):
    rel = f"sub{i % 2}/f{i}.txt" if i % 3 else f"f{i}.txt"
    (tmp_path / rel).parent.mkdir(exist_ok=True)
    docs[rel] = _text(rng, 500 + i)
    (tmp_path / rel).write_bytes(docs[rel])
  (tmp_path / ".hidden.txt").write_bytes(b"HIDDEN" * 100)
  (tmp_path / ".git").mkdir()
  (tmp_path / ".git" / "x.txt").write_bytes(b"HIDDEN" * 100)
  (tmp_path / "blob.bin").write_bytes(b"ab\0cd" * 100)  # binary: skipped
  cfg = data.DataConfig(path=str(tmp_path), val_fraction=0.4)
  for split in ("train", "val"):
    want = [docs[r] for r in sorted(docs) if _hash_val(r, 0.4) == (split == "val")]
    assert want, "fixture should populate both splits"
    got = data.load_tokens(cfg, split)
    assert got.dtype == np.uint8
    assert got.tobytes() == b"\0".join(want)


def test_single_text_file_tail_split(text_file):
  raw = text_file.read_bytes()
  cfg = data.DataConfig(path=str(text_file), val_fraction=0.1)
  tr, va = data.load_tokens(cfg, "train"), data.load_tokens(cfg, "val")
  assert len(va) == 2000 and tr.tobytes() + va.tobytes() == raw


def test_npy_shards_uint16(tmp_path):
  rng = np.random.default_rng(3)
  shards = {}
  for i in range(6):
    shards[f"shard_{i:03d}.npy"] = rng.integers(0, 50_000, 2000, dtype=np.uint16)
    np.save(tmp_path / f"shard_{i:03d}.npy", shards[f"shard_{i:03d}.npy"])
  (tmp_path / "README.txt").write_text("ignored when shards are present")
  cfg = data.DataConfig(path=str(tmp_path), val_fraction=0.4, seq_len=32, batch_size=2)
  for split in ("train", "val"):
    want = [shards[r] for r in sorted(shards) if _hash_val(r, 0.4) == (split == "val")]
    assert want
    got = data.load_tokens(cfg, split)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, np.concatenate(want))
  b = _take(data.make_dataset(cfg, "val", process_index=0, process_count=1), 1)[0]
  assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (2, 32)
  np.testing.assert_array_equal(b["inputs"][0], np.concatenate(
      [shards[r] for r in sorted(shards) if _hash_val(r, 0.4)])[:32])
  assert b["inputs"].max() > 255
  # A single .npy file is split by its tail.
  one = tmp_path / "shard_000.npy"
  cfg1 = data.DataConfig(path=str(one), val_fraction=0.25)
  np.testing.assert_array_equal(data.load_tokens(cfg1, "val"), shards[one.name][1500:])
  np.testing.assert_array_equal(data.load_tokens(cfg1, "train"), shards[one.name][:1500])


def test_errors(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(ValueError, match=r"config\.data\.path.*nope.*does not exist"):
    data.load_tokens(data.DataConfig(path=str(missing)), "train")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / ".hidden").write_text("x")
  with pytest.raises(ValueError, match=r"config\.data\.path.*empty.*no usable files"):
    data.load_tokens(data.DataConfig(path=str(empty)), "train")
  small = tmp_path / "small.txt"
  small.write_bytes(b"x" * 100)
  with pytest.raises(ValueError, match=r"config\.data\.path.*small\.txt.*has 95 "
                     r"tokens.*at least 257"):
    _ds(small, "train", seq_len=64, batch_size=4)
  with pytest.raises(ValueError, match=r"config\.data\.path.*val split is empty"):
    data.load_tokens(data.DataConfig(path=str(tmp_path / "small.txt"),
                                     val_fraction=0.001), "val")
  with pytest.raises(ValueError, match=r"config\.data\.seq_len=0"):
    validation.from_mapping(data.DataConfig, {"seq_len": 0}, "config.data")
  with pytest.raises(ValueError, match=r"config\.data\.val_fraction"):
    data.DataConfig(val_fraction=1.0).validate("config.data")
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match=r"config\.data\.path.*1-D integer"):
    data.load_tokens(data.DataConfig(path=str(bad)), "train")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_token_ids_outside_the_vocab_are_rejected_naming_the_shard(tmp_path, dtype):
  rng = np.random.default_rng(7)
  vocab = 1000
  for i in range(4):
    np.save(tmp_path / f"s{i}.npy", rng.integers(0, vocab, 3000).astype(dtype))
  cfg = data.DataConfig(path=str(tmp_path), val_fraction=0.5, seq_len=16, batch_size=2)
  for split in ("train", "val"):   # in range: accepted, same tokens as unchecked
    np.testing.assert_array_equal(data.load_tokens(cfg, split, vocab_size=vocab),
                                  data.load_tokens(cfg, split))
  bad_id, at = (-3, 1234) if np.issubdtype(dtype, np.signedinteger) else (vocab, 2999)
  tokens = rng.integers(0, vocab, 3000).astype(dtype)
  tokens[at] = bad_id
  tokens[at + 1:] = vocab + 5           # only the first bad id is reported
  name = "s0.npy"   # rewritten: checked again although it passed before
  np.save(tmp_path / name, tokens)
  split = "val" if _hash_val(name, 0.5) else "train"
  with pytest.raises(validation.ConfigError,
                     match=rf"config\.data\.path='.*{name}': token id {bad_id} at "
                           rf"index {at} is outside \[0, {vocab}\) "
                           rf"\(config\.model\.vocab_size"):
    data.make_dataset(cfg, split, vocab_size=vocab, process_index=0, process_count=1)
  # A single .npy file is checked whole, whichever split is asked for.
  cfg1 = data.DataConfig(path=str(tmp_path / name), val_fraction=0.5)
  for split in ("train", "val"):
    with pytest.raises(validation.ConfigError, match=f"token id {bad_id} at index {at}"):
      data.load_tokens(cfg1, split, vocab_size=vocab)


def test_text_bytes_are_checked_against_a_small_vocab(text_file):
  cfg = data.DataConfig(path=str(text_file))
  assert len(data.load_tokens(cfg, "train", vocab_size=256))
  first = int(np.argmax(data.load_tokens(cfg, "train") >= 100))
  with pytest.raises(validation.ConfigError,
                     match=rf"corpus\.txt': token id \d+ at index {first} is outside "
                           rf"\[0, 100\)"):
    data.load_tokens(cfg, "train", vocab_size=100)


# ---------------------------------------------------------------- checkpointing


def test_iterator_state_json_resume(text_file):
  ds = _ds(text_file, "train", seed=3)
  uninterrupted = _take(ds, 12)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  for _ in range(3):  # advance further before restoring
    next(it)
  restored = iter(_ds(text_file, "train", seed=3))
  restored.set_state(state)
  for want in uninterrupted[5:]:
    got = next(restored)
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["targets"], want["targets"])
