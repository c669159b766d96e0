"""Variant sweeps: config merging, activated-parameter accounting, resumable results."""

import json
import os

import jax.numpy as jnp
import pytest

from conftest import tiny_config_dict
from sparsejax.train import sweep


def test_deep_update_merges_nested_without_mutating():
  base = {"model": {"d_model": 8, "linear_options": {"a": 1}}, "train": {"n": 1}}
  out = sweep.deep_update(base, {"model": {"linear_options": {"b": 2}}, "new": 3})
  assert out == {"model": {"d_model": 8, "linear_options": {"a": 1, "b": 2}},
                 "train": {"n": 1}, "new": 3}
  assert base["model"]["linear_options"] == {"a": 1}


def test_activated_params_weights_projections_by_kept_fraction():
  params = {"embedding": jnp.ones((256, 4)),
            "block_0": {"attention": {"q_proj": {"kernel": jnp.ones((4, 2, 2))}},
                        "attn_norm": {"scale": jnp.ones(4)}}}
  total, active = sweep.activated_params(
      params, {"block_0/attention/q_proj": 0.25})
  assert total == 16 + 4
  assert active == pytest.approx(16 * 0.75 + 4)


@pytest.mark.slow
def test_run_variant_measures_sparsity_and_reuses_finished_result(tmp_path):
  config = tiny_config_dict(model=dict(linear="qsparse",
                                       linear_options={"topk_ratio": 0.5}),
                            train=dict(num_steps=2, eval_every=0, checkpoint_every=0))
  result = sweep.run_variant("q50", config, str(tmp_path), "half")
  # Every projection input keeps half its entries (ties aside) -> >= 50% zeros.
  assert 0.5 <= result.act_sparsity < 0.75
  assert result.activated_params < 0.6 * result.nonembedding_params
  assert result.tokens == 2 * 8 * 32
  saved = json.load(open(os.path.join(tmp_path, "q50", "result.json")))
  assert saved["val_loss"] == pytest.approx(result.val_loss)
  again = sweep.run_variant("q50", config, str(tmp_path))     # read back, no training
  assert again == result
  table = sweep.markdown_table([result], baseline="q50")
  assert "| q50 |" in table and "+0.0000" in table
