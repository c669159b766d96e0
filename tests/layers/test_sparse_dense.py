"""SparseDense (Q-Sparse) and BitDense (BitNet b1.58) vs NumPy references; the
"qsparse", "bitnet" and "bitnet_qsparse" linear entries in a full DecoderLM."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.layers import registry
from sparsejax.layers.dense import Dense
from sparsejax.layers.sparse_dense import BitDense, SparseDense, topk_count
from sparsejax.models import DecoderLM, parse_model_config
from sparsejax.sharding import unbox
from sparsejax.train.config import parse_config
from sparsejax.train.state import sown_metrics
from sparsejax.validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS = 1e-6


def normal(rng, shape, scale=1.0):
  return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))


def np_topk_mask(x, k):
  """k largest |x| per row of the last axis; ties keep the lowest index."""
  x = np.asarray(x)
  order = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
  mask = np.zeros(x.shape, bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return mask


def np_nm_mask(x, n, m):
  x = np.asarray(x)
  return np_topk_mask(x.reshape(*x.shape[:-1], -1, m), n).reshape(x.shape)


def random_params(module, rng, *args, std=0.05):
  """Fresh N(0, std²) params of `module`'s shapes (eval_shape: no init compile)."""
  shapes = unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
  return jax.tree.map(lambda s: normal(rng, s.shape, std), shapes)


def init_apply(module, x, seed=0, kernel=None):
  """(params, jitted apply returning (y, sown metrics))."""
  if kernel is None:
    params = random_params(module, np.random.default_rng(seed + 1), x)
  else:
    params = {"kernel": jnp.asarray(kernel, jnp.float32)}

  @jax.jit
  def apply(params, x):
    y, updates = module.apply({"params": params}, x, mutable=["metrics"])
    return y, sown_metrics(updates.get("metrics", {}))

  return params, apply


def vjp(fn, primals, cotangent):
  """The VJP of fn at primals applied to cotangent, jitted."""
  return jax.jit(lambda primals, g: jax.vjp(fn, *primals)[1](g))(primals, cotangent)


def flat(x, contract_dims):
  x = np.asarray(x, np.float64)
  return x.reshape(*x.shape[:x.ndim - contract_dims], -1)


# ------------------------------------------------------------------ SparseDense (Q-Sparse)

@pytest.mark.parametrize("ratio", [0.7, 0.25, 1.0, 0.01])
def test_sparse_dense_equals_dense_on_numpy_topk_input(rng_seed, ratio):
  rng = np.random.default_rng(rng_seed)
  x = normal(rng, (2, 5, 16))
  layer = SparseDense((6,), ("embed", "mlp"), topk_ratio=ratio)
  params, apply = init_apply(layer, x, rng_seed)
  y, metrics = apply(params, x)
  k = max(1, int(ratio * 16))
  xs = np.where(np_topk_mask(x, k), np.asarray(x), 0.0)
  w = np.asarray(params["kernel"], np.float64)
  np.testing.assert_allclose(y, xs @ w, rtol=1e-5, atol=1e-6)
  dense_y = Dense((6,), ("embed", "mlp")).apply({"params": params}, jnp.asarray(xs))
  np.testing.assert_allclose(y, dense_y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["act_sparsity"], 1 - k / 16, rtol=1e-6)


def test_topk_count_floor_is_robust_to_float_error():
  assert topk_count(0.29, 100) == 29          # 0.29 · 100 = 28.999999999999996
  assert topk_count(0.7, 10) == 7 and topk_count(0.7, 32) == 22
  assert topk_count(0.01, 16) == 1 and topk_count(1.0, 16) == 16
  assert topk_count(0.7, 0) == 0


@pytest.mark.parametrize("layer", [
    SparseDense((6,), ("embed", "mlp"), impl="interpret"),
    BitDense((6,), ("embed", "mlp"), qsparse=True, impl="interpret")],
    ids=["qsparse", "bitnet_qsparse"])
def test_no_tokens_give_an_empty_output_and_zero_sparsity(rng_seed, layer):
  rng = np.random.default_rng(rng_seed)
  params = random_params(layer, rng, jnp.zeros((1, 16)))
  x = jnp.zeros((2, 0, 16))
  _, apply = init_apply(layer, x)
  y, metrics = apply(params, x)
  assert y.shape == (2, 0, 6) and float(metrics["act_sparsity"]) == 0.0
  g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)))(params)
  np.testing.assert_array_equal(g["kernel"], np.zeros((16, 6)))


def test_exactly_k_nonzeros_per_token_are_fed_into_the_matmul(rng_seed):
  """With an identity kernel the output is the matmul's input; ties keep the lowest index."""
  rng = np.random.default_rng(rng_seed)
  x = normal(rng, (3, 4, 12))
  ties = jnp.asarray(rng.choice([-2.0, -1.0, 1.0, 2.0], (3, 4, 12)).astype(np.float32))
  layer = SparseDense((12,), ("embed", "mlp"), topk_ratio=0.5)
  params, apply = init_apply(layer, x, kernel=np.eye(12))
  for inp in (x, ties):
    fed, _ = apply(params, inp)
    np.testing.assert_array_equal(np.count_nonzero(fed, axis=-1), 6)
    np.testing.assert_array_equal(fed, np.where(np_topk_mask(inp, 6), inp, 0.0))


def test_o_proj_takes_topk_over_the_concatenated_heads(rng_seed):
  rng = np.random.default_rng(rng_seed)
  b, t, h, dh, d = 2, 3, 4, 8, 16
  x = np.array(normal(rng, (b, t, h, dh)))
  x[:, :, 0] += 10.0 * np.sign(x[:, :, 0])  # head 0 dominates: all of it is kept (a
                                             # per-head top-k would keep only 70%)
  x = jnp.asarray(x)
  layer = SparseDense((d,), ("heads", "head_dim", "embed"), contract_dims=2)
  params, apply = init_apply(layer, x, rng_seed)
  y, _ = apply(params, x)
  k = int(0.7 * h * dh)
  xf = flat(x, 2)
  mask = np_topk_mask(xf, k).reshape(x.shape)
  assert np.all(mask[:, :, 0])                      # not per-head
  w = np.asarray(params["kernel"], np.float64).reshape(h * dh, d)
  np.testing.assert_allclose(y, np.where(mask, x, 0.0).reshape(b, t, -1) @ w,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mode(rng_seed, n, m):
  rng = np.random.default_rng(rng_seed)
  x = normal(rng, (2, 3, 16))
  layer = SparseDense((16,), ("embed", "mlp"), mode="nm", n=n, m=m)
  params, apply = init_apply(layer, x, kernel=np.eye(16))
  fed, metrics = apply(params, x)
  nz = np.count_nonzero(np.asarray(fed).reshape(2, 3, -1, m), axis=-1)
  np.testing.assert_array_equal(nz, n)
  np.testing.assert_array_equal(fed, np.where(np_nm_mask(x, n, m), x, 0.0))
  np.testing.assert_allclose(metrics["act_sparsity"], 1 - n / m)


def test_rescale_option(rng_seed):
  rng = np.random.default_rng(rng_seed)
  x = normal(rng, (4, 10))
  layer = SparseDense((10,), ("embed", "mlp"), topk_ratio=0.3, rescale=True)
  params, apply = init_apply(layer, x, kernel=np.eye(10))
  fed, _ = apply(params, x)
  xs = np.where(np_topk_mask(x, 3), np.asarray(x, np.float64), 0.0)
  xs *= np.linalg.norm(np.asarray(x, np.float64), axis=-1, keepdims=True) / np.linalg.norm(
      xs, axis=-1, keepdims=True)
  np.testing.assert_allclose(fed, xs, rtol=1e-5)


def test_sparse_dense_gradients_are_straight_through(rng_seed):
  """∂L/∂x = g·Wᵀ (STE: the same as Dense's input gradient, also at dropped entries);
  ∂L/∂W = TopK(x)ᵀ·g."""
  rng = np.random.default_rng(rng_seed)
  x, g = normal(rng, (2, 5, 16)), normal(rng, (2, 5, 6))
  layer = SparseDense((6,), ("embed", "mlp"), topk_ratio=0.5)
  params = random_params(layer, rng, x)
  dparams, dx = vjp(lambda p, x: layer.apply({"params": p}, x), (params, x), g)
  w, g64 = np.asarray(params["kernel"], np.float64), np.asarray(g, np.float64)
  xs = np.where(np_topk_mask(x, 8), np.asarray(x, np.float64), 0.0)
  np.testing.assert_allclose(dx, g64 @ w.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dparams["kernel"], np.einsum("btd,btf->df", xs, g64),
                             rtol=1e-5, atol=1e-6)
  (dense_dx,) = vjp(lambda x: Dense((6,), ("embed", "mlp")).apply({"params": params}, x),
                    (x,), g)
  np.testing.assert_allclose(dx, dense_dx, rtol=1e-6, atol=1e-7)


def test_same_params_as_dense(rng_seed):
  x = normal(np.random.default_rng(rng_seed), (2, 3, 4, 8))
  args = ((16,), ("heads", "head_dim", "embed"), 2)
  shapes = lambda mdl: jax.tree.map(lambda p: (p.value.shape, p.value.dtype, p.names),
                                    jax.eval_shape(mdl.init, jax.random.key(0), x)["params"],
                                    is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))
  for cls in (SparseDense, BitDense):
    assert shapes(cls(*args)) == shapes(Dense(*args))


def test_module_errors_name_the_projection(rng_seed):
  x = normal(np.random.default_rng(rng_seed), (2, 6))
  with pytest.raises(ValueError, match="'q_proj': N:M needs m=4 to divide the input size 6"):
    jax.eval_shape(SparseDense((3,), ("embed", "mlp"), mode="nm", name="q_proj").init,
                   jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"topk_ratio=0 must be in \(0, 1\]"):
    jax.eval_shape(SparseDense((3,), ("embed", "mlp"), topk_ratio=0).init,
                   jax.random.key(0), x)


# -------------------------------------------------------------------- BitDense (BitNet)

def away_from_half(v, tol=2e-3):
  """True if no |v| is within tol of a rounding boundary (float32 vs float64 safe)."""
  return np.all(np.abs(np.abs(v) % 1.0 - 0.5) > tol)


def np_bitlinear_parts(x, w, contract_dims):
  """NumPy BitLinear (float64): x_n, x̂ (per-token absmax int8), codes, Ŵ (ternary)."""
  xf = flat(x, contract_dims)
  x_n = xf / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + EPS)
  s = 127.0 / np.maximum(np.max(np.abs(x_n), axis=-1, keepdims=True), 1e-5)
  codes = np.clip(np.round(x_n * s), -128, 127)
  w = np.asarray(w, np.float64)
  sw = 1.0 / max(np.mean(np.abs(w)), 1e-5)
  w_hat = np.clip(np.round(w * sw), -1, 1) / sw
  ok = away_from_half(x_n * s) and away_from_half(w * sw)
  return xf, x_n, codes / s, codes, w_hat.reshape(xf.shape[-1], -1), ok


def bit_case(rng, x_shape, contract_dims, features):
  """Fresh (x, kernel) whose quantizer inputs are not near a rounding boundary."""
  in_dims = x_shape[len(x_shape) - contract_dims:]
  for _ in range(200):
    x = normal(rng, x_shape, 3.0)
    w = normal(rng, (*in_dims, *features), 0.05)
    parts = np_bitlinear_parts(x, w, contract_dims)
    if parts[-1]:
      return x, w, parts[:-1]
  raise AssertionError("no boundary-free sample")


@pytest.mark.parametrize("x_shape,contract_dims,features,axes", [
    ((2, 5, 16), 1, (8,), ("embed", "mlp")),
    ((2, 3, 4, 8), 2, (16,), ("heads", "head_dim", "embed")),        # o_proj
    ((2, 3, 16), 1, (2, 4), ("embed", "heads", "head_dim")),         # q_proj
])
def test_bit_dense_matches_numpy_bitlinear(rng_seed, x_shape, contract_dims, features,
                                           axes):
  x, w, (_, _, x_hat, _, w_hat) = bit_case(np.random.default_rng(rng_seed), x_shape,
                                           contract_dims, features)
  layer = BitDense(features, axes, contract_dims)
  params, apply = init_apply(layer, x, kernel=w)
  y, metrics = apply(params, x)
  ref = (x_hat @ w_hat).reshape(*x_shape[:len(x_shape) - contract_dims], *features)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  assert not metrics                       # plain BitNet sows no sparsity
  assert params["kernel"].dtype == jnp.float32


def test_bit_dense_gradients_are_the_ste_formula(rng_seed):
  """∂L/∂W = x̂ᵀ·g (STE through the ternary weights); ∂L/∂x = RMSNorm'(x)ᵀ·(g·Ŵᵀ)
  (STE through the activation quantizer, exact through the norm)."""
  rng = np.random.default_rng(rng_seed)
  x, w, (xf, _, x_hat, _, w_hat) = bit_case(rng, (2, 5, 16), 1, (8,))
  g = normal(rng, (2, 5, 8))
  layer = BitDense((8,), ("embed", "mlp"))
  dparams, dx = vjp(lambda p, x: layer.apply({"params": p}, x), ({"kernel": w}, x), g)
  g64 = np.asarray(g, np.float64)
  v = g64 @ w_hat.T                                           # ∂L/∂x_n
  r = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + EPS)
  dx_ref = r * v - (r ** 3 / xf.shape[-1]) * xf * np.sum(v * xf, axis=-1, keepdims=True)
  assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dparams["kernel"]))
  np.testing.assert_allclose(dparams["kernel"], np.einsum("btd,btf->df", x_hat, g64),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "nm"])
def test_bit_dense_qsparse_is_masked_quantized_input(rng_seed, mode):
  """Y = (Q(x) ⊙ M)·Ŵ with M the top-k of the quantized input (int8 ties: lowest index)."""
  rng = np.random.default_rng(rng_seed)
  x, w, (_, _, x_hat, codes, w_hat) = bit_case(rng, (2, 5, 16), 1, (8,))
  layer = BitDense((8,), ("embed", "mlp"), qsparse=True, topk_ratio=0.5, mode=mode)
  params, apply = init_apply(layer, x, kernel=w)
  y, metrics = apply(params, x)
  mask = np_topk_mask(codes, 8) if mode == "topk" else np_nm_mask(codes, 2, 4)
  fed = np.where(mask, x_hat, 0.0)
  np.testing.assert_allclose(y, fed @ w_hat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["act_sparsity"], np.mean(fed == 0), rtol=1e-6)


# ------------------------------------------------------------------- full model, config

SMALL = dict(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=64,
             tie_embeddings=False, ffn="relu2_glu")
PROJECTIONS = ("attention/q_proj", "attention/k_proj", "attention/v_proj",
               "attention/o_proj", "ffn/gate_proj", "ffn/up_proj", "ffn/down_proj")


@pytest.mark.slow
@pytest.mark.parametrize("linear", ["qsparse", "bitnet", "bitnet_qsparse"])
def test_decoder_lm_forward_backward_with_plain_embedding_and_head(rng_seed, linear):
  cfg = parse_model_config({**SMALL, "linear": linear})
  model = DecoderLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(rng_seed).integers(0, cfg.vocab_size, (2, 8)),
                       jnp.int32)
  params = random_params(model, np.random.default_rng(rng_seed), tokens, std=0.1)
  seen = []   # paths of the quantized/sparsified modules (filled while tracing)

  def record(next_fun, args, kwargs, context):
    mdl = context.module
    if isinstance(mdl, (SparseDense, BitDense)):
      seen.append("/".join(mdl.path))
    if mdl.path == ("block_0", "attn_norm"):
      mdl.sow("intermediates", "block_input", args[0])
    out = next_fun(*args, **kwargs)
    if mdl.path == ("final_norm",):
      mdl.sow("intermediates", "head_input", out)
    return out

  def loss(params):
    with nn.intercept_methods(record):
      logits, updates = model.apply({"params": params}, tokens,
                                    mutable=["metrics", "intermediates"])
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
    return ce, (logits, sown_metrics(updates.get("metrics", {})),
                updates["intermediates"])

  (ce, (logits, metrics, inter)), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(ce)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
  expected = {f"block_0/{p}/act_sparsity" for p in PROJECTIONS} if "qsparse" in linear \
      else set()
  assert set(metrics) == expected
  for name, value in metrics.items():      # 70% kept: ≥ 30% zeros (more at down_proj)
    assert 0.3 - 1e-6 <= float(value) < 1, name

  # The quantized/sparsified modules are exactly the 7 block projections ...
  assert sorted(seen) == sorted(f"block_0/{p}" for p in PROJECTIONS)
  # ... the embedding is a plain lookup of the latent table, lm_head a float matmul.
  block_input = inter["block_0"]["attn_norm"]["block_input"][0]
  head_input = np.asarray(inter["final_norm"]["head_input"][0], np.float64)
  np.testing.assert_array_equal(block_input, params["embedding"][tokens])
  np.testing.assert_allclose(logits, head_input @ np.asarray(params["lm_head"], np.float64),
                             rtol=1e-5, atol=1e-6)
  assert len(np.unique(np.asarray(params["lm_head"]))) > 3   # not ternary


@pytest.mark.parametrize("linear,options,field,message", [
    ("qsparse", dict(topk_ratio=0), "topk_ratio", r"in \(0, 1\]"),
    ("qsparse", dict(topk_ratio=1.5), "topk_ratio", r"in \(0, 1\]"),
    ("qsparse", dict(mode="block"), "mode", "one of"),
    ("qsparse", dict(n=5, m=4), "n", r"in \[1, m=4\]"),
    ("qsparse", dict(m=0), "m", ">= 1"),
    ("qsparse", dict(mode="nm", rescale=True), "rescale", "False when mode='nm'"),
    ("qsparse", dict(impl="cuda"), "impl", "one of"),
    ("bitnet_qsparse", dict(topk_ratio=-0.1), "topk_ratio", r"in \(0, 1\]"),
    ("qsparse", dict(topk_ratio="0.5"), "topk_ratio", "a number"),
])
def test_config_errors_name_the_field(linear, options, field, message):
  with pytest.raises(ConfigError,
                     match=rf"config\.model\.linear_options\.{field}=.*{message}"):
    parse_model_config({**SMALL, "linear": linear, "linear_options": options})


def test_config_errors_for_unknown_options():
  with pytest.raises(ConfigError, match=r"config\.model\.linear_options\.rescale"):
    parse_model_config({**SMALL, "linear": "bitnet_qsparse",
                        "linear_options": dict(rescale=True)})
  with pytest.raises(ConfigError, match=r"unknown field\(s\) config\.model\.linear_options"
                     r"\.topk_ratio; allowed: weights"):
    parse_model_config({**SMALL, "linear": "bitnet", "linear_options": dict(topk_ratio=1)})
  assert {"qsparse", "bitnet", "bitnet_qsparse"} <= set(registry.names("linear"))
  assert {"relu2", "relu2_glu"} <= set(registry.names("ffn"))


@pytest.mark.parametrize("name,linear,ffn", [("qsparse", "qsparse", "relu2_glu"),
                                             ("bitnet", "bitnet", "swiglu"),
                                             ("bitnet_qsparse", "bitnet_qsparse",
                                              "relu2_glu")])
def test_experiment_configs_parse(name, linear, ffn):
  path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert f"--config=experiments/configs/{name}.py" in module.__doc__
  model = parse_config(module.get_config()).model
  assert (model.linear, model.ffn) == (linear, ffn)
  if "qsparse" in name:
    assert model.linear_options["topk_ratio"] == 0.7
