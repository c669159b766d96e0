"""The "block_sparse" linear entry: params hold only the stored blocks, the logits equal
the dense model whose kernels are the block-masked weights, the patterns are balanced,
bad options name their field, and on the 8-device mesh the kernel lowers for TPU and
CUDA inside jax.shard_map."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sharding
from sparsejax.layers import registry
from sparsejax.layers.block_sparse_linear import block_pattern, clamp_block
from sparsejax.models.config import parse_model_config
from sparsejax.models.transformer import DecoderLM
from sparsejax.ops import dispatch
from sparsejax.ops.block_sparse_matmul import from_block_sparse
from sparsejax.validation import ConfigError

OPTIONS = dict(block=(16, 16), density=0.5, pattern="random", seed=3, impl="xla")


def model_for(linear, options=None, **model):
  cfg = dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128,
             linear=linear, linear_options=options or {})
  cfg.update(model)
  return DecoderLM(parse_model_config(cfg))


def dense_params(sparse, dense, options):
  """`dense` (a dense model's params) with every projection kernel replaced by the
  block-sparse model's masked weight (from_block_sparse of its w_blocks)."""
  def walk(s, d, path):
    if "w_blocks" in s:
      kernel = d["kernel"]
      contract = 2 if path[-1] == "o_proj" else 1
      shape = (int(np.prod(kernel.shape[:contract])), int(np.prod(kernel.shape[contract:])))
      layer = int(re.search(r"block_(\d+)", "/".join(path)).group(1))
      block = clamp_block(options["block"], shape)
      index = block_pattern(shape, block, options["density"], options["pattern"],
                            options["seed"], f"{layer}/{path[-1]}")
      w = from_block_sparse(s["w_blocks"], index, shape)
      return {**{k: v for k, v in d.items() if k != "kernel"},
              "kernel": w.reshape(kernel.shape)}
    return {k: walk(s[k], v, path + (k,)) if isinstance(v, dict) else s[k]
            for k, v in d.items()}
  return walk(sparse, dense, ())


@pytest.mark.slow
def test_logits_equal_the_dense_model_with_the_masked_weights(rng_seed):
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 8), 0, 256)
  sparse_model, dense_model = model_for("block_sparse", OPTIONS), model_for("dense")
  sparse = sharding.unbox(jax.jit(sparse_model.init)(jax.random.key(rng_seed), tokens))
  dense = sharding.unbox(jax.jit(dense_model.init)(jax.random.key(0), tokens))
  sparse, dense = sparse["params"], dense["params"]
  leaves = jax.tree_util.tree_leaves_with_path(sparse)
  names = {jax.tree_util.keystr(p) for p, _ in leaves}
  assert not any("kernel" in n for n in names if "proj" in n)      # only stored blocks
  stored = sum(x.size for p, x in leaves if "w_blocks" in jax.tree_util.keystr(p))
  full = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(dense)
             if "proj" in jax.tree_util.keystr(p))
  assert stored == full // 2                                       # density 0.5
  dense_apply = jax.jit(dense_model.apply)
  want = dense_apply({"params": dense_params(sparse, dense, OPTIONS)}, tokens)
  got = jax.jit(sparse_model.apply)({"params": sparse}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The masks matter: the dense model with unmasked random kernels differs.
  assert not np.allclose(got, dense_apply({"params": dense}, tokens), atol=1e-3)


@pytest.mark.parametrize("pattern", ["random", "diagonal"])
def test_patterns_are_balanced_and_seeded(pattern):
  index = block_pattern((512, 384), (32, 64), 0.25, pattern, seed=1, name="0/q_proj")
  rows, cols = index[:, 0], index[:, 1]
  assert len(index) == 4 * 6 and len(set(map(tuple, index))) == len(index)
  np.testing.assert_array_equal(np.bincount(cols), 4)              # k per column block
  assert np.bincount(rows, minlength=16).max() <= 2                # ⌈24 / 16⌉ per row
  again = block_pattern((512, 384), (32, 64), 0.25, pattern, seed=1, name="0/q_proj")
  np.testing.assert_array_equal(index, again)
  other = block_pattern((512, 384), (32, 64), 0.25, pattern, seed=2, name="0/q_proj")
  assert (pattern == "diagonal") == np.array_equal(index, other)


def test_bad_options_name_their_field():
  with pytest.raises(ConfigError, match=r"config.model.linear_options.density=0.0"):
    registry.parse_options("linear", "block_sparse", dict(density=0.0),
                           "config.model.linear_options")
  with pytest.raises(ConfigError, match=r"linear_options.pattern='zigzag'"):
    registry.parse_options("linear", "block_sparse", dict(pattern="zigzag"),
                           "config.model.linear_options")
  with pytest.raises(ConfigError, match=r"linear_options.block=\(24, 16\) is invalid for "
                     r"q_proj \(64 x 64\): bh=24 must divide the weight dim 64"):
    model_for("block_sparse", dict(OPTIONS, block=(24, 16))).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("lowering", ["tpu", "cuda"])
def test_sharded_model_lowers_with_the_kernel_inside_shard_map(lowering):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
  block = (128, 128) if lowering == "tpu" else (64, 64)
  model = model_for("block_sparse", dict(OPTIONS, block=block, impl="pallas"),
                    d_model=256, d_ff=512, num_layers=1)
  tokens = jax.ShapeDtypeStruct((4, 8), jnp.int32)
  target = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[lowering]
  with dispatch.target_platform("gpu" if lowering == "cuda" else "tpu"), \
      jax.set_mesh(mesh):
    params = jax.eval_shape(lambda: sharding.unbox(model.init(
        jax.random.key(0), jnp.zeros((4, 8), jnp.int32))))
    loss = lambda p, t: jnp.sum(model.apply(p, t))
    text = jax.jit(jax.grad(loss)).trace(params, tokens).lower(
        lowering_platforms=(lowering,)).as_text()
  calls = re.findall(rf"custom_call @{re.escape(target)}\(", text)
  assert len(calls) >= 7 * 3                  # 7 projections × (fwd, dx, dw)
  assert text.count("sdy.manual_computation(") >= 7


@pytest.mark.slow
def test_trains_on_the_8_device_mesh(rng_seed):
  """Trainer integration: the whole train step (params sharded by the mesh rules, the
  stored blocks replicated) runs on data × fsdp × tensor = 2 × 2 × 2 and learns."""
  from conftest import tiny_config_dict
  from sparsejax.train.config import parse_config
  from sparsejax.train.trainer import Trainer
  config = tiny_config_dict(
      model=dict(linear="block_sparse", linear_options=dict(OPTIONS, density=0.5)),
      mesh=dict(data=2, fsdp=2, tensor=2), data=dict(seq_len=16, batch_size=8))
  trainer = Trainer(parse_config(config))
  state = trainer.init_state(seed=0)
  tokens = np.random.default_rng(rng_seed).integers(0, 256, (8, 17)).astype(np.int32)
  batch = trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  losses = []
  for _ in range(4):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(state.params)]
  assert any("w_blocks" in n for n in names)
  assert not any("proj" in n and "kernel" in n for n in names)


def test_pruned_dense_model_runs_with_its_pattern_file(rng_seed, tmp_path):
  """prune_to_block_sparse keeps the k largest-L1 blocks per output column block; with
  pattern="file" the block-sparse model's logits equal the dense model with the pruned
  (block-masked) kernels, and the patterns are the score-chosen ones."""
  from sparsejax.layers.block_sparse_linear import (prune_to_block_sparse,
                                                    save_patterns)
  tokens = jax.random.randint(jax.random.key(rng_seed), (2, 8), 0, 256)
  dense_model = model_for("dense")
  dense = sharding.unbox(jax.jit(dense_model.init)(jax.random.key(rng_seed), tokens))
  params, patterns = prune_to_block_sparse(dense["params"], block=(16, 16), density=0.25)
  path = str(tmp_path / "patterns.npz")
  save_patterns(path, patterns, (16, 16))
  options = dict(block=(16, 16), pattern="file", pattern_file=path, impl="xla")
  sparse_model = model_for("block_sparse", options)
  shapes = jax.eval_shape(sparse_model.init, jax.random.key(0), tokens)["params"]
  assert jax.tree.map(lambda a: a.shape, sharding.unbox(shapes)) == jax.tree.map(
      lambda a: a.shape, params)
  got = jax.jit(sparse_model.apply)({"params": params}, tokens)

  def masked(tree, prefix=()):
    out = {}
    for k, v in tree.items():
      if isinstance(v, dict) and "kernel" in v:
        key = "/".join(prefix + (k,))
        c = 2 if k == "o_proj" else 1
        shape = (int(np.prod(v["kernel"].shape[:c])), int(np.prod(v["kernel"].shape[c:])))
        w = np.asarray(v["kernel"]).reshape(shape)
        keep = np.zeros((shape[0] // 16, shape[1] // 16), bool)
        keep[patterns[key][:, 0], patterns[key][:, 1]] = True
        np.testing.assert_array_equal(keep.sum(0), max(1, round(shape[0] / 16 / 4)))
        score = np.abs(w).reshape(shape[0] // 16, 16, -1, 16).sum(axis=(1, 3))
        for j in range(keep.shape[1]):           # kept blocks outscore dropped ones
          if (~keep[:, j]).any():
            assert score[keep[:, j], j].min() >= score[~keep[:, j], j].max()
        out[k] = {**v, "kernel": (w * np.kron(keep, np.ones((16, 16)))).reshape(
            v["kernel"].shape)}
      else:
        out[k] = masked(v, prefix + (k,)) if isinstance(v, dict) else v
    return out

  want = jax.jit(dense_model.apply)({"params": masked(dense["params"])}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="pattern file .* was written for blocks"):
    model_for("block_sparse", dict(options, block=(32, 32))).init(
        jax.random.key(0), tokens)
  with pytest.raises(ConfigError, match=r"linear_options.pattern_file='' is invalid"):
    registry.parse_options("linear", "block_sparse", dict(pattern="file"),
                           "config.model.linear_options")
