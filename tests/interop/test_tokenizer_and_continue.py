"""tokenizer.json data pipelines (batched, cached .npy) and continue-training a Hugging
Face checkpoint with --config.train.init_from_hf."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import tokenizers

from conftest import tiny_config_dict
from sparsejax.interop import load_hf
from sparsejax.train import tokenizer as tokenizer_lib
from sparsejax.train.config import parse_config
from sparsejax.train.data import DataConfig, load_tokens
from sparsejax.train.trainer import train
from sparsejax.validation import ConfigError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")
LLAMA = os.path.join(FIXTURES, "llama")
TOKENIZER = os.path.join(LLAMA, "tokenizer.json")
TEXT = os.path.join(FIXTURES, "text.txt")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSEJAX_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_tokenized_directory_matches_the_library_and_is_cached(tmp_path, cache_dir):
  source = tmp_path / "docs"
  source.mkdir()
  for i in range(40):
    (source / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}  # ünïcode\n")
  cfg = DataConfig(path=str(source), tokenizer=TOKENIZER, val_fraction=0.3)
  train_tokens, val_tokens = load_tokens(cfg, "train"), load_tokens(cfg, "val")
  # Independent reference: the tokenizers library on the same split, joined by EOS (0).
  ref = tokenizers.Tokenizer.from_file(TOKENIZER)
  byte_cfg = DataConfig(path=str(source), val_fraction=0.3)
  for split, tokens in (("train", train_tokens), ("val", val_tokens)):
    texts = bytes(load_tokens(byte_cfg, split)).decode().split("\0")
    want = sum(([0] + ref.encode(t).ids for t in texts), [])[1:]
    np.testing.assert_array_equal(tokens, want)
  assert len(os.listdir(cache_dir / "tokens")) == 2
  cached = load_tokens(cfg, "train")
  assert isinstance(cached, np.memmap) and cached.dtype == np.uint16
  (source / "doc0.txt").write_text("changed")           # a new key, not stale tokens
  load_tokens(cfg, "train")
  assert len(os.listdir(cache_dir / "tokens")) == 3


def test_tokenizer_field_is_validated():
  with pytest.raises(ConfigError, match="config.data.tokenizer='nope.json'"):
    DataConfig(tokenizer="nope.json").validate("config.data")
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  assert (tok.vocab_size, tok.eos_id) == (300, 0)
  ids = tok.encode_batch(["for i in range(10):"])[0]
  assert tok.decode(ids) == "for i in range(10):"


def test_continue_training_a_hf_checkpoint(tmp_path):
  config = parse_config(tiny_config_dict(
      model=dict(linear="qsparse", linear_options={"topk_ratio": 0.5}),
      data=dict(path=TEXT, seq_len=4, batch_size=8, val_fraction=0.3),
      optim=dict(learning_rate=1e-3, warmup_steps=1),
      train=dict(num_steps=1, eval_every=1, eval_batches=1, checkpoint_every=1,
                 init_from_hf=LLAMA)))
  seen = {}
  result = train(config, str(tmp_path / "run"),
                 hooks=[lambda step, state: seen.setdefault(step, state.params)])
  used = result.trainer.config
  assert (used.model.vocab_size, used.model.d_model, used.model.linear) == (
      300, 32, "qsparse")
  assert used.model.rope_scaling["rope_type"] == "llama3"
  assert used.data.tokenizer == TOKENIZER
  _, hf_params = load_hf(LLAMA)
  moved = jax.tree.map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                       seen[1], hf_params)
  assert 0 < max(jax.tree.leaves(moved)) < 1e-3 * 1.5   # one Adam step from HF's params
  with pytest.raises(ConfigError, match="config.train.sample_tokens=5"):
    train(parse_config(tiny_config_dict(
        data=dict(path=TEXT), train=dict(init_from_hf=LLAMA, sample_tokens=5))),
          str(tmp_path / "x"))


def test_byte_tokenizer_decodes_out_of_range_ids_as_replacement():
  """A byte model with vocab_size > 256 can sample ids >= 256: they decode as U+FFFD,
  the valid bytes around them (multi-byte UTF-8 included) decode unchanged."""
  from sparsejax.train.tokenizer import ByteTokenizer
  text = "héllo"
  ids = list(text.encode("utf-8"))
  assert ByteTokenizer().decode(ids) == text
  assert ByteTokenizer().decode(ids[:1] + [256, 1000] + ids[1:]) == "h\ufffd\ufffd" + text[1:]
