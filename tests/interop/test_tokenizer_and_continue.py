"""tokenizer.json data pipelines (batched, cached .npy, bits-per-byte from the tokenized
text's bytes) and continue-training a Hugging Face checkpoint with
--config.train.init_from_hf (sampling with its tokenizer)."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest
import tokenizers

from conftest import REPO, experiment_module, run_main, tiny_config_dict
from sparsejax.interop import load_hf
from sparsejax.models import DecoderLM
from sparsejax.train import tokenizer as tokenizer_lib
from sparsejax.train.config import parse_config
from sparsejax.train.data import DataConfig, bytes_per_token, load_tokens
from sparsejax.train.generate import generate_text
from sparsejax.train.trainer import Trainer, restore_run, train
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
    # Beside each shard: its token count and the UTF-8 bytes it tokenized (+1 per EOS).
    size = sum(len(t.encode()) for t in texts) + len(texts) - 1
    assert bytes_per_token(cfg, split) == pytest.approx(size / len(want), rel=1e-12)
  shards = lambda: sorted(f for f in os.listdir(cache_dir / "tokens"))
  assert len(shards()) == 4 and {f[-4:] for f in shards()} == {".npy", "json"}
  cached = load_tokens(cfg, "train")
  assert isinstance(cached, np.memmap) and cached.dtype == np.uint16
  (source / "doc0.txt").write_text("changed")           # a new key, not stale tokens
  load_tokens(cfg, "train")
  assert len(shards()) == 6


def test_tokenizer_field_is_validated():
  with pytest.raises(ConfigError, match="config.data.tokenizer='nope.json'"):
    DataConfig(tokenizer="nope.json").validate("config.data")
  tok = tokenizer_lib.load_tokenizer(TOKENIZER)
  assert (tok.vocab_size, tok.eos_id) == (300, 0)
  ids = tok.encode_batch(["for i in range(10):"])[0]
  assert tok.decode(ids) == "for i in range(10):"


@pytest.mark.slow
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


@pytest.mark.slow
def test_bits_per_byte_counts_the_bytes_of_the_tokenized_text(rng_seed):
  """bpb = Σ nats / (Σ bytes · ln 2), bytes per token of the val text tokenized by the
  tokenizers library, over the evaluated windows (computed here from the logits)."""
  config = parse_config(tiny_config_dict(
      model=dict(vocab_size=300),
      data=dict(path=TEXT, tokenizer=TOKENIZER, seq_len=4, batch_size=8,
                val_fraction=0.3)))
  trainer = Trainer(config)
  state = trainer.init_state(seed=rng_seed % 1000)
  got = trainer.evaluate(state, num_batches=3)
  with open(TEXT, "rb") as f:
    raw = f.read()
  val_text = raw[len(raw) - int(len(raw) * 0.3):]            # the tail split, as bytes
  ids = tokenizers.Tokenizer.from_file(TOKENIZER).encode(
      val_text.decode(), add_special_tokens=False).ids
  np.testing.assert_array_equal(load_tokens(config.data, "val"), ids)
  windows = np.asarray(ids[:3 * 8 * 4 + 1]).astype(np.int32)   # 3 batches of 8 × 4
  inputs, targets = windows[:-1].reshape(24, 4), windows[1:].reshape(24, 4)
  logits = np.asarray(trainer.model.apply({"params": state.params}, inputs), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -np.take_along_axis(logp, targets[..., None], -1).sum()
  bytes_per_token = len(val_text) / len(ids)
  assert bytes_per_token > 1.2                        # BPE tokens: more than a byte
  want = nats / (targets.size * bytes_per_token * np.log(2))
  assert got["bpb"] == pytest.approx(want, rel=1e-5)
  assert got["loss"] == pytest.approx(nats / targets.size, rel=1e-5)


def test_train_cli_samples_with_the_checkpoints_tokenizer(tmp_path, monkeypatch, capsys):
  """train.py --config.train.init_from_hf prints a sample decoded by the checkpoint's
  tokenizer.json: the same text as generate_text on the saved params."""
  workdir = str(tmp_path / "run")
  tiny = os.path.join(REPO, "experiments", "configs", "tiny.py")
  argv = ["experiments/train.py", f"--config={tiny}", f"--workdir={workdir}",
          f"--config.train.init_from_hf={LLAMA}", f"--config.data.path={TEXT}",
          "--config.data.seq_len=4", "--config.data.val_fraction=0.3",
          "--config.train.num_steps=1", "--config.train.eval_batches=1",
          "--config.train.sample_tokens=12", "--config.train.sample_prompt=def f"]
  monkeypatch.setattr(sys, "argv", argv)
  with experiment_module("train") as module:
    run_main(module, argv)
  out = capsys.readouterr().out
  printed = out.split("--- sample ---\n", 1)[1].split("\n--------------", 1)[0]
  config, state, _ = restore_run(workdir)
  assert config.data.tokenizer == TOKENIZER
  tokenizer = tokenizer_lib.load_tokenizer(TOKENIZER)
  sample = generate_text(DecoderLM(config.model),
                         {"params": state.params, **state.model_state}, "def f",
                         max_new_tokens=12, seed=config.train.seed, tokenizer=tokenizer)
  assert printed == "def f" + sample and sample
  assert "bits-per-byte n/a" not in out and "## Sample" in open(
      os.path.join(workdir, "report.md")).read()


def test_byte_tokenizer_decodes_out_of_range_ids_as_replacement():
  """A byte model with vocab_size > 256 can sample ids >= 256: they decode as U+FFFD,
  the valid bytes around them (multi-byte UTF-8 included) decode unchanged."""
  from sparsejax.train.tokenizer import ByteTokenizer
  text = "héllo"
  ids = list(text.encode("utf-8"))
  assert ByteTokenizer().decode(ids) == text
  assert ByteTokenizer().decode(ids[:1] + [256, 1000] + ids[1:]) == "h\ufffd\ufffd" + text[1:]
