"""experiments/evaluate.py and experiments/export_hf.py, in process."""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
import optax
import pytest

from conftest import experiment_module, run_main, tiny_config_dict
from sparsejax.interop import load_hf
from sparsejax.models import DecoderLM
from sparsejax.train import tokenizer as tokenizer_lib
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import train

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")
TEXT = os.path.join(FIXTURES, "text.txt")


@pytest.mark.slow
def test_evaluate_scores_every_window(capsys):
  path = os.path.join(FIXTURES, "qwen2_bf16")
  with experiment_module("evaluate") as module:
    run_main(module, ["evaluate", f"--hf_path={path}", f"--data={TEXT}",
                      "--seq_len=48", "--batch_size=3"])
  out = capsys.readouterr().out
  nll = float(re.search(r"nll/token ([\d.]+)", out).group(1))
  bpb = float(re.search(r"bits-per-byte ([\d.]+)", out).group(1))
  # Reference: one unpadded window at a time.
  cfg, params = load_hf(path)
  tokens = tokenizer_lib.encode_documents(
      tokenizer_lib.load_tokenizer(os.path.join(path, "tokenizer.json")),
      [open(TEXT, "rb").read()])
  total = 0.0
  for start in range(0, len(tokens) - 1, 48):
    window = tokens[start:start + 49].astype(np.int32)[None]
    logits = DecoderLM(cfg).apply({"params": params}, window[:, :-1])
    total += float(optax.softmax_cross_entropy_with_integer_labels(
        logits, window[:, 1:]).sum())
  assert nll == pytest.approx(total / (len(tokens) - 1), abs=1e-4)
  assert bpb == pytest.approx(total / math.log(2) / os.path.getsize(TEXT), abs=1e-4)


@pytest.mark.slow
def test_export_a_run_and_load_it_back(tmp_path, capsys):
  config = parse_config(tiny_config_dict(train=dict(num_steps=1, eval_every=1,
                                                    eval_batches=1, checkpoint_every=1)))
  result = train(config, str(tmp_path / "run"))
  out = str(tmp_path / "hf")
  with experiment_module("export_hf") as module:
    run_main(module, ["export_hf", f"--workdir={tmp_path / 'run'}", f"--out={out}"])
    assert "wrote step 1" in capsys.readouterr().out
    cfg, params = load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, params, result.state.params)
    assert cfg.d_model == config.model.d_model and cfg.tie_embeddings
    with pytest.raises(SystemExit, match="error: .*exists"):
      run_main(module, ["export_hf", f"--workdir={tmp_path / 'run'}", f"--out={out}"])
