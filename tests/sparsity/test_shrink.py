"""shrink: the shrunk model's logits (and gradients) equal the masked model's, for
SwiGLU / ReLU² / ReLU²-GLU / MoE FFNs and MHA / GQA / block-sparse attention, with
per-block sizes; exact param-count drop; checkpoint round trip; channel_masks against a
NumPy top-k; bad masks and configs raise errors naming the tensor or field."""

from __future__ import annotations

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config_dict
from sparsejax import validation
from sparsejax.models import DecoderLM, ModelConfig
from sparsejax.sharding import unbox
from sparsejax.sparsity.shrink import channel_masks, shrink
from sparsejax.validation import ConfigError

D, HQ, DH, F, T = 16, 4, 4, 24, 8
MOE = dict(ffn="moe", ffn_options=dict(num_experts=3, top_k=2, num_shared=1,
                                       d_expert=8, aux_loss_weight=0.0,
                                       z_loss_weight=0.0, log_expert_load=False))


def _config(**kw) -> ModelConfig:
  base = dict(vocab_size=64, d_model=D, num_layers=2, num_heads=HQ, num_kv_heads=HQ,
              head_dim=DH, d_ff=F)
  return ModelConfig(**{**base, **kw})


def _init(cfg, seed):
  tokens = jax.random.randint(jax.random.key(seed), (2, T), 0, cfg.vocab_size)
  params = unbox(DecoderLM(cfg).init(jax.random.key(seed + 1), tokens)["params"])
  return tokens, params


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _apply_masks(params, masks):
  m = _flat(masks)
  return traverse_util.unflatten_dict(
      {k: np.where(m[k], v, 0) if k in m else v for k, v in _flat(params).items()},
      sep="/")


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(DecoderLM(cfg).apply)({"params": params}, tokens))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _unit_mask(shape, axis, kept_index, batch=None):
  """bool mask of `shape` keeping the slices `kept_index` along `axis` (for MoE
  [E, ...] masks, `kept_index[e]` per expert along axis)."""
  mask = np.zeros(shape, bool)
  if batch is None:
    np.moveaxis(mask, axis, 0)[kept_index] = True
    return mask
  for e, index in enumerate(kept_index):
    np.moveaxis(mask[e], axis - 1, 0)[index] = True
  return mask


def _hand_masks(rng, cfg, params, channels, groups, per_group, kv_masks=True):
  """Random unit masks built directly: block l keeps `channels[l]` FFN channels (per
  expert for MoE), `groups[l]` kv groups with `per_group[l]` query heads each."""
  p, masks = _flat(params), {}
  g = cfg.num_heads // cfg.num_kv_heads
  for l in range(cfg.num_layers):
    ffn, att = f"block_{l}/ffn", f"block_{l}/attention"
    if cfg.ffn == "moe":
      e, _, f = p[f"{ffn}/w_up"].shape
      index = [np.sort(rng.choice(f, channels[l], replace=False)) for _ in range(e)]
      for name, axis in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
        masks[f"{ffn}/{name}"] = _unit_mask(p[f"{ffn}/{name}"].shape, axis, index, batch=0)
      shared = p[f"{ffn}/shared/up_proj/kernel"].shape[1]
      keep = rng.choice(shared, channels[l] * MOE["ffn_options"]["num_shared"],
                        replace=False)
      ffn = f"{ffn}/shared"
    else:
      keep = rng.choice(p[f"{ffn}/up_proj/kernel"].shape[1], channels[l], replace=False)
    for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
      if f"{ffn}/{name}/kernel" in p:
        masks[f"{ffn}/{name}/kernel"] = _unit_mask(p[f"{ffn}/{name}/kernel"].shape,
                                                   axis, keep)
    kept_groups = rng.choice(cfg.num_kv_heads, groups[l], replace=False)
    query = np.concatenate([grp * g + rng.choice(g, per_group[l], replace=False)
                            for grp in kept_groups])
    for name, axis, index in (("q_proj/kernel", 1, query), ("o_proj/kernel", 0, query),
                              ("q_bias", 0, query), ("k_proj/kernel", 1, kept_groups),
                              ("v_proj/kernel", 1, kept_groups), ("k_bias", 0, kept_groups),
                              ("v_bias", 0, kept_groups)):
      if f"{att}/{name}" in p and (kv_masks or name[0] == "q" or name[0] == "o"):
        masks[f"{att}/{name}"] = _unit_mask(p[f"{att}/{name}"].shape, axis, index)
  return traverse_util.unflatten_dict(masks, sep="/")


def _perturb_biases(params, rng):
  """Nonzero q/k/v biases (they init to zero), so slicing them is tested."""
  return traverse_util.unflatten_dict(
      {k: (v + rng.standard_normal(v.shape).astype(v.dtype) if "_bias" in k else v)
       for k, v in _flat(params).items()}, sep="/")


SLOW_CASES = ("block_sparse_mha", "moe_shared_gqa")
CASES = {  # name: (config overrides, channels kept per block, kv groups, q per group)
    "swiglu_mha": (dict(), (20, 5), (3, 1), (1, 1)),
    "relu2_gqa_groups": (dict(ffn="relu2", num_kv_heads=2, qkv_bias=True), (7, 7),
                         (1, 2), (2, 2)),
    "relu2_glu_gqa_per_group": (dict(ffn="relu2_glu", num_kv_heads=2), (12, 3),
                                (2, 2), (1, 2)),
    "block_sparse_mha": (dict(attention="block_sparse", attention_options=dict(
        pattern="local", window=3, block_q=4, block_kv=4)), (9, 9), (2, 2), (1, 1)),
    "moe_shared_gqa": (dict(MOE, num_kv_heads=2), (5, 2), (2, 1), (1, 2)),
}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_shrunk_logits_equal_masked_logits(case, rng_seed):
  overrides, channels, groups, per_group = CASES[case]
  rng = np.random.default_rng(rng_seed)
  cfg = _config(**overrides)
  tokens, params = _init(cfg, rng_seed % 1000)
  params = _perturb_biases(params, rng)
  masks = _hand_masks(rng, cfg, params, channels, groups, per_group,
                      kv_masks=case != "relu2_gqa_groups")   # derived from the q masks
  small, shrunk = shrink(params, masks, cfg)
  want = _logits(cfg, _apply_masks(params, masks), tokens)
  np.testing.assert_allclose(_logits(small, shrunk, tokens), want, atol=1e-5, rtol=0)

  heads = [gr * q for gr, q in zip(groups, per_group)]
  assert [small.for_layer(l).num_heads for l in range(2)] == heads
  assert [small.for_layer(l).num_kv_heads for l in range(2)] == list(groups)
  assert small.resolved_head_dim == DH
  # Exactly the pruned units' entries are gone (+ per-head q/k/v biases).
  bias = DH if cfg.qkv_bias else 0
  head_size, ffn = D * DH + bias, 2 if cfg.ffn == "relu2" else 3
  dropped = 0
  for l in range(2):
    dropped += (HQ - heads[l]) * (2 * D * DH + bias)
    dropped += (cfg.num_kv_heads - groups[l]) * 2 * head_size
    if cfg.ffn == "moe":
      opts = MOE["ffn_options"]
      dropped += (opts["num_experts"] + opts["num_shared"]) * (8 - channels[l]) * 3 * D
    else:
      dropped += (F - channels[l]) * ffn * D
  assert _count(params) - _count(shrunk) == dropped


@pytest.mark.slow
def test_config_sizes_single_when_blocks_agree(rng_seed):
  rng = np.random.default_rng(rng_seed)
  cfg = _config(num_kv_heads=2, head_dim=0)
  _, params = _init(cfg, 3)
  small, _ = shrink(params, _hand_masks(rng, cfg, params, (10, 10), (1, 1), (2, 2)), cfg)
  assert (small.d_ff, small.num_heads, small.num_kv_heads, small.head_dim) == (10, 2, 1, 4)
  assert not (small.d_ff_per_layer or small.num_heads_per_layer
              or small.num_kv_heads_per_layer)
  small, _ = shrink(params, _hand_masks(rng, cfg, params, (10, 4), (1, 2), (2, 1)), cfg)
  assert small.d_ff_per_layer == (10, 4) and small.num_heads_per_layer == (2, 2)
  assert small.num_kv_heads_per_layer == (1, 2)
  moe = _config(**MOE)
  _, params = _init(moe, 4)
  small, _ = shrink(params, _hand_masks(rng, moe, params, (5, 3), (4, 4), (1, 1)), moe)
  assert small.ffn_options["d_expert"] == 0 and small.d_ff_per_layer == (15, 9)
  small, _ = shrink(params, _hand_masks(rng, moe, params, (5, 5), (4, 4), (1, 1)), moe)
  assert small.ffn_options["d_expert"] == 5 and small.d_ff_per_layer == ()


def _take_kept(grads, masks):
  """NumPy reference: each masked tensor's gradient restricted to the kept slices."""
  m, out = _flat(masks), {}
  for path, g in _flat(grads).items():
    g = np.asarray(g)
    if path in m:
      for axis in range(g.ndim):   # drop slices that are pruned everywhere along axis
        others = tuple(a for a in range(g.ndim) if a != axis)
        g = np.compress(m[path].any(axis=others), g, axis=axis)
        m[path] = np.compress(m[path].any(axis=others), m[path], axis=axis)
    out[path] = g
  return out


@pytest.mark.slow
def test_shrunk_gradients_equal_masked_gradients(rng_seed):
  """Training the shrunk model is training the masked one: the gradients of a loss
  w.r.t. the kept weights agree."""
  rng = np.random.default_rng(rng_seed)
  cfg = _config(num_kv_heads=2)
  tokens, params = _init(cfg, 5)
  masks = _hand_masks(rng, cfg, params, (13, 6), (1, 2), (2, 1))
  small, shrunk = shrink(params, masks, cfg)
  cotangent = rng.standard_normal((2, T, cfg.vocab_size)).astype(np.float32)
  loss = lambda c, p: jnp.sum(DecoderLM(c).apply({"params": p}, tokens) * cotangent)
  want = _take_kept(jax.jit(jax.grad(lambda p: loss(cfg, p)))(_apply_masks(params, masks)),
                    masks)
  got = _flat(jax.jit(jax.grad(lambda p: loss(small, p)))(shrunk))
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], atol=1e-5, rtol=1e-5, err_msg=path)


@pytest.mark.slow
def test_channel_masks_keep_the_top_magnitude_units(rng_seed):
  cfg = _config(num_kv_heads=2, num_heads=8, head_dim=2)
  _, params = _init(cfg, rng_seed % 1000)
  p = {k: np.abs(np.asarray(v, np.float64)) for k, v in _flat(params).items()}
  masks = _flat(channel_masks(params, cfg, 0.5))
  for l in range(2):
    ffn, att = f"block_{l}/ffn", f"block_{l}/attention"
    score = (p[f"{ffn}/gate_proj/kernel"].mean(0) + p[f"{ffn}/up_proj/kernel"].mean(0)
             + p[f"{ffn}/down_proj/kernel"].mean(1))
    top = np.sort(np.argsort(-score, kind="stable")[:F // 2])
    np.testing.assert_array_equal(np.flatnonzero(masks[f"{ffn}/up_proj/kernel"][0]), top)
    q = (p[f"{att}/q_proj/kernel"].mean((0, 2)) + p[f"{att}/o_proj/kernel"].mean((1, 2)))
    group = (q.reshape(2, 4).sum(1) + p[f"{att}/k_proj/kernel"].mean((0, 2))
             + p[f"{att}/v_proj/kernel"].mean((0, 2)))
    best = int(np.argmax(group))
    np.testing.assert_array_equal(masks[f"{att}/k_proj/kernel"][0, :, 0],
                                  np.arange(2) == best)
    np.testing.assert_array_equal(masks[f"{att}/q_proj/kernel"][0, :, 0],
                                  np.arange(8) // 4 == best)
  small, _ = shrink(params, channel_masks(params, cfg, 0.5), cfg)
  assert (small.d_ff, small.num_heads, small.num_kv_heads) == (F // 2, 4, 1)


@pytest.mark.slow
def test_channel_masks_moe_keep_per_expert(rng_seed):
  cfg = _config(**MOE)
  tokens, params = _init(cfg, rng_seed % 1000)
  masks = channel_masks(params, cfg, 0.75)
  kept = np.asarray(_flat(masks)["block_0/ffn/w_down"][:, :, 0])
  assert (kept.sum(1) == 6).all()
  assert np.asarray(_flat(masks)["block_0/ffn/shared/down_proj/kernel"][:, 0]).sum() == 6
  small, shrunk = shrink(params, masks, cfg)
  np.testing.assert_allclose(_logits(small, shrunk, tokens),
                             _logits(cfg, _apply_masks(params, masks), tokens),
                             atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match=r"density=0.05 keeps round\(0.05·8\) = 0 of "
                     r"the block_0/ffn expert channels"):
    channel_masks(params, cfg, 0.05)


@pytest.mark.slow
def test_checkpoint_round_trip(tmp_path, rng_seed):
  from sparsejax.train.checkpoint import Checkpointer
  from sparsejax.train.config import config_to_dict, parse_config
  from sparsejax.train.trainer import Trainer, restore_run
  rng = np.random.default_rng(rng_seed)
  cfg = _config(num_kv_heads=2, vocab_size=256)   # the training data's byte vocabulary
  tokens, params = _init(cfg, 6)
  small, shrunk = shrink(params, _hand_masks(rng, cfg, params, (9, 3), (2, 1), (1, 2)),
                         cfg)
  config = parse_config(tiny_config_dict(model=validation.to_dict(small)))
  state = Trainer(config).state_from_params(shrunk)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(0, state, {}, config_to_dict(config))
  ckpt.wait()
  ckpt.close()
  restored_config, restored, _ = restore_run(str(tmp_path))
  assert restored_config.model == small
  np.testing.assert_array_equal(_logits(small, restored.params, tokens),
                                _logits(small, shrunk, tokens))


def _bad(params, masks, cfg, match, error=ValueError):
  with pytest.raises(error, match=match):
    shrink(params, masks, cfg)


def test_bad_masks_raise_naming_the_tensor(rng_seed):
  rng = np.random.default_rng(rng_seed)
  cfg = _config(num_kv_heads=2)
  _, params = _init(cfg, 7)
  good = _flat(_hand_masks(rng, cfg, params, (8, 8), (2, 2), (1, 1)))
  edit = lambda **kv: traverse_util.unflatten_dict({**good, **kv}, sep="/")
  partial = good["block_0/ffn/up_proj/kernel"].copy()
  partial[0, ~partial[0]] = True
  _bad(params, edit(**{"block_0/ffn/up_proj/kernel": partial}),
       cfg, r"mask of block_0/ffn/up_proj/kernel prunes part of unit \(\d+,\)")
  _bad(params, edit(**{"block_1/ffn/down_proj/kernel": ~good["block_1/ffn/down_proj/kernel"]}),
       cfg, "masks of block_1/ffn/gate_proj/kernel and block_1/ffn/down_proj/kernel "
       "disagree")
  all_q = np.ones_like(good["block_0/attention/q_proj/kernel"])
  _bad(params, edit(**{"block_0/attention/q_proj/kernel": all_q}), cfg,
       "masks of block_0/attention/q_proj/kernel and block_0/attention/o_proj/kernel")
  uneven = _flat(_hand_masks(rng, cfg, params, (8, 8), (2, 2), (2, 2)))
  q = uneven["block_1/attention/q_proj/kernel"].copy()
  q[:, 0] = False
  o = uneven["block_1/attention/o_proj/kernel"].copy()
  o[0] = False
  _bad(params, traverse_util.unflatten_dict(
      {**uneven, "block_1/attention/q_proj/kernel": q,
       "block_1/attention/o_proj/kernel": o}, sep="/"),
       cfg, r"block_1/attention: the kv groups keep \[1, 2\] query heads")
  kv = good["block_0/attention/k_proj/kernel"]
  _bad(params, edit(**{"block_0/attention/k_proj/kernel": np.zeros_like(kv),
                       "block_0/attention/v_proj/kernel": np.zeros_like(kv)}),
       cfg, "block_0/attention: the k/v masks drop kv head 0, whose query heads keep 1")
  _bad(params, edit(**{name: np.zeros_like(good[name]) for name in good
                       if name.startswith("block_1/ffn")}),
       cfg, r"block_1/ffn \(FFN channels\): the masks prune every unit")
  _bad(params, edit(**{"block_0/ffn/up_proj/kernel": good["block_0/ffn/up_proj/kernel"][:1]}),
       cfg, r"mask of block_0/ffn/up_proj/kernel must be bool \(16, 24\)")
  _bad(params, edit(**{"block_0/ffn/nope/kernel": np.ones(3, bool)}), cfg,
       "masks for tensors the params lack: block_0/ffn/nope/kernel")


def test_bad_moe_masks_and_configs(rng_seed):
  rng = np.random.default_rng(rng_seed)
  cfg = _config(**MOE)
  _, params = _init(cfg, 8)
  masks = _flat(_hand_masks(rng, cfg, params, (5, 5), (4, 4), (1, 1)))
  for name in ("w_gate", "w_up", "w_down"):
    masks[f"block_0/ffn/{name}"][1] = True                # expert 1 keeps all 8
  _bad(params, traverse_util.unflatten_dict(masks, sep="/"), cfg,
       r"block_0/ffn: the experts keep different channel counts \[5, 8, 5\]")
  masks = _flat(_hand_masks(rng, cfg, params, (5, 5), (4, 4), (1, 1)))
  shared = {k: np.ones_like(v) for k, v in masks.items() if "block_1/ffn/shared" in k}
  _bad(params, traverse_util.unflatten_dict({**masks, **shared}, sep="/"), cfg,
       "block_1/ffn/shared keeps 8 channels; with 5 per routed expert it must keep "
       "num_shared·F' = 5")
  for bad, match in ((dict(linear="bitnet"), r"config.model.linear='bitnet' is invalid"),
                     (dict(ffn="swiglu", attention="nsa"), "config.model.attention='nsa'")):
    with pytest.raises(ConfigError, match=match):
      shrink(params, {}, dataclasses.replace(cfg, **bad))
  with pytest.raises(ConfigError, match="score='wanda'"):
    channel_masks(params, cfg, 0.5, score="wanda")


def test_per_layer_config_validation():
  ok = _config(num_heads_per_layer=(4, 2), num_kv_heads_per_layer=(2, 1),
               d_ff_per_layer=(8, 16))
  ok.validate()
  assert ok.for_layer(1) == dataclasses.replace(ok, num_heads=2, num_kv_heads=1, d_ff=16,
                                                num_heads_per_layer=(),
                                                num_kv_heads_per_layer=(),
                                                d_ff_per_layer=())
  plain = _config()
  assert plain.for_layer(1) is plain   # no per-block sizes: the very same config
  for bad, match in (
      (dict(d_ff_per_layer=(8,)), r"d_ff_per_layer=\(8,\) is invalid: must be empty or "
                                  r"one size per block \(2 entries\)"),
      (dict(d_ff_per_layer=(8, 0)), r"d_ff_per_layer=\(8, 0\) is invalid: must be sizes"),
      (dict(num_heads_per_layer=(4, 2), head_dim=0), "head_dim=0 is invalid: must be > 0 "
                                                     "when num_heads_per_layer is set"),
      (dict(num_heads_per_layer=(4, 3), num_kv_heads=2),
       "num_kv_heads=2 is invalid: must be a divisor of block 1's num_heads=3")):
    with pytest.raises(ConfigError, match=match):
      _config(**bad).validate("config.model")
