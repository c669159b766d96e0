"""sparsejax.models.accounting: params, activated params, FLOPs and decode bytes against
hand counts, and the distinct units of a real decode step against its sown routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.models import DecoderLM, accounting, parse_model_config

D, V, FF = 32, 64, 96
BASE = dict(vocab_size=V, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=FF)
MOE = dict(BASE, ffn="moe", ffn_options=dict(num_experts=4, top_k=2, d_expert=16,
                                             num_shared=1))
MEMORY = dict(BASE, memory="ultramem", memory_layers="0:1",
              memory_options=dict(heads=2, knn=4, num_keys=6, kdim=8, vdim=16,
                                  tucker_rank=2, tucker_cores=2, value_expand=4))
PKM = dict(BASE, memory="pkm", memory_layers="0:0,1:1",
           memory_options=dict(heads=2, knn=3, num_keys=5, kdim=8))
ATTENTION = 2 * D * D + 2 * D * 16    # q, o: D×D; k, v: D×(2 kv heads · 8)
NORMS = 2 * 2 * D + D                 # attn_norm, ffn_norm per block + final_norm


def _model_and_params(cfg):
  model = parse_model_config(cfg)
  return model, accounting.abstract_params(model)


def test_dense_counts_and_flops_by_hand():
  model, params = _model_and_params(dict(BASE, tie_embeddings=False))
  counts = accounting.count_params(params)
  nonembed = 2 * (ATTENTION + 3 * D * FF) + NORMS
  assert counts == {"total_params": nonembed + 2 * V * D, "embedding_params": 2 * V * D,
                    "nonembedding_params": nonembed}
  assert accounting.activated_params(model, params) == nonembed
  assert accounting.routed_params(model, params) == {}
  seq = 10
  per_layer = 2 * (ATTENTION + 3 * D * FF) + 2 * 2 * (seq / 2) * D
  assert accounting.flops_per_token(model, seq) == 2 * per_layer + 2 * D * V
  bytes_ = accounting.decode_bytes_per_step(model, params, {})
  assert bytes_ == 4 * counts["total_params"]


def test_flops_sum_per_block_sizes():
  """A shrunk model (per-block d_ff / heads) counts each block at its own size."""
  model, _ = _model_and_params(dict(BASE, d_ff_per_layer=(FF, FF // 2),
                                    num_heads_per_layer=(4, 2),
                                    num_kv_heads_per_layer=(2, 1), head_dim=8))
  seq = 10
  block0 = 2 * (ATTENTION + 3 * D * FF) + 2 * 2 * (seq / 2) * D
  attention1 = 2 * D * 16 + 2 * D * 8            # q, o: 2 heads · 8; k, v: 1 kv head
  block1 = 2 * (attention1 + 3 * D * FF // 2) + 2 * 2 * (seq / 2) * 16
  assert accounting.flops_per_token(model, seq) == block0 + block1 + 2 * D * V


def test_moe_routed_experts_and_flops_by_hand():
  model, params = _model_and_params(MOE)
  routed = accounting.routed_params(model, params)
  assert sorted(routed) == [f"block_{i}/ffn/{w}" for i in range(2)
                            for w in ("w_down", "w_gate", "w_up")]
  assert routed["block_1/ffn/w_up"] == accounting.Routed(units=4, unit_size=D * 16,
                                                         per_token=2)
  shared, router, expert = 3 * D * 16, D * 4, 3 * D * 16
  ffn_total, ffn_active = router + shared + 4 * expert, router + shared + 2 * expert
  nonembed = 2 * (ATTENTION + ffn_total) + NORMS
  assert accounting.count_params(params)["nonembedding_params"] == nonembed
  assert accounting.activated_params(model, params) == nonembed - 2 * 2 * expert
  attention = 2 * ATTENTION + 2 * 2 * 4 * D
  assert accounting.flops_per_token(model, 8) == (2 * (attention + 2 * ffn_active)
                                                  + 2 * D * V)
  selected = {"block_0/ffn": 3, "block_1/ffn": 1}
  total = accounting.count_params(params)["total_params"]
  assert accounting.decode_bytes_per_step(model, params, selected) == 4 * (
      total - 2 * 4 * expert + (3 + 1) * expert)
  with pytest.raises(ValueError, match="no count for block_1/ffn"):
    accounting.decode_bytes_per_step(model, params, {"block_0/ffn": 2})


def test_memory_value_rows_by_hand():
  for cfg, rows, width, read in ((MEMORY, 36, 16, 2 * 4), (PKM, 25, D, 2 * 3)):
    model, params = _model_and_params(cfg)
    routed = accounting.routed_params(model, params)
    layers = len(model.memory_placements)
    assert sorted(routed) == [f"memory_{i}/values" for i in range(layers)]
    assert routed["memory_0/values"] == accounting.Routed(rows, width, read)
    counts = accounting.count_params(params)
    assert (counts["nonembedding_params"] - accounting.activated_params(model, params)
            == layers * (rows - read) * width)
    selected = {f"memory_{i}": 5 + i for i in range(layers)}
    assert accounting.decode_bytes_per_step(model, params, selected) == 4 * (
        counts["total_params"] - layers * rows * width
        + sum(selected.values()) * width)


def test_pkm_and_ultramem_flops_by_hand():
  model, _ = _model_and_params(PKM)
  h, k, n, kdim = 2, 3, 5, 8
  pkm = 2 * D * h * 2 * kdim + 2 * h * 2 * n * kdim + h * k * k + 2 * h * k * D
  dense = accounting.flops_per_token(parse_model_config(BASE), 16)
  assert accounting.flops_per_token(model, 16) == dense + 2 * pkm
  model, _ = _model_and_params(MEMORY)
  m, r, c, e, vdim, n = 4, 2, 2, 4, 16, 2 * 6      # keys per side: √E · num_keys
  um = (2 * D * 2 * kdim + 2 * 2 * n * kdim * r * h + 2 * 2 * h * n * r
        + h * m * m * 2 * r * r * c + 2 * h * m * vdim + 2 * e * vdim * D)
  assert accounting.flops_per_token(model, 16) == dense + um


@pytest.mark.parametrize("cfg,field", [
    (dict(BASE, attention="nsa"), "config.model.attention='nsa'"),
    (dict(BASE, linear="block_sparse"), "config.model.linear='block_sparse'"),
])
def test_flops_per_token_rejects_components_without_a_formula(cfg, field):
  with pytest.raises(ValueError, match=field):
    accounting.flops_per_token(parse_model_config(cfg), 16)


@pytest.mark.parametrize("linear", ["bitnet", "qsparse", "bitnet_qsparse"])
def test_ternary_and_topk_linears_count_the_dense_matmuls(linear):
  """Ternary weights and top-K-masked activations still run dense matmuls."""
  assert accounting.flops_per_token(parse_model_config(dict(BASE, linear=linear)), 16) \
      == accounting.flops_per_token(parse_model_config(BASE), 16)


def test_selected_units_from_hand_built_collections():
  model = parse_model_config(dict(MOE, memory="pkm", memory_layers="0:1",
                                  memory_options=PKM["memory_options"]))
  metrics = {"block_1": {"ffn": {"load_0": (0.5,), "load_1": (0.0,), "load_2": (0.25,),
                                 "load_3": (0.25,), "load_max_over_mean": (2.0,)}},
             "block_0": {"ffn": {"load_0": (0.0,), "load_1": (1.0,)}}}
  intermediates = {"memory_0": {"rows": (np.array([[3, 7], [7, 1]]),)}}
  assert list(accounting.selected_units(model, metrics, intermediates).items()) == [
      ("block_0/ffn", 1), ("block_1/ffn", 3), ("memory_0", 3)]


@pytest.mark.slow
def test_selected_units_of_a_real_forward_step(rng_seed):
  cfg = dict(MOE, memory="ultramem", memory_layers=MEMORY["memory_layers"],
             memory_options=MEMORY["memory_options"])
  module = DecoderLM(parse_model_config(cfg))
  rng = np.random.default_rng(rng_seed)
  tokens = jnp.asarray(rng.integers(0, V, (3, 1)), jnp.int32)
  variables = module.init(jax.random.key(rng_seed), tokens)
  variables = {c: t for c, t in variables.items() if c not in ("metrics", "intermediates", "aux_loss")}
  _, state = module.apply(variables, tokens, mutable=["metrics", "intermediates"])
  selected = accounting.selected_units(module.cfg, state["metrics"],
                                       state["intermediates"])
  assert list(selected) == ["block_0/ffn", "block_1/ffn", "memory_0"]
  assert all(2 <= selected[f"block_{i}/ffn"] <= 4 for i in range(2))  # 3 tokens × top-2
  rows = np.asarray(state["intermediates"]["memory_0"]["rows"][0])
  assert selected["memory_0"] == len(set(rows.reshape(-1).tolist())) <= 3 * 2 * 4
  params = variables["params"]
  read = accounting.decode_bytes_per_step(module.cfg, params, selected)
  assert read < 4 * accounting.count_params(params)["total_params"]
