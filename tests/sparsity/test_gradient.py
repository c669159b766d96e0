"""Gradient compression pieces against NumPy references: top-k (values, indices), chunked
top-k and the bfloat16 / uint16 wire format, scatter-add, error feedback's invariant,
DGC's momentum correction / masking / local clipping, the ratio warm-up, and the
8-device exchange inside shard_map."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sparsejax import sharding
from sparsejax.sparsity import gradient
from sparsejax.sparsity.gradient import GradCompressionConfig
from sparsejax.validation import ConfigError, from_mapping


def np_topk(x, k):
  """Indices of the k largest |x| (ties: lower flat index), values at them."""
  flat = np.asarray(x, np.float64).reshape(-1)
  order = sorted(range(flat.size), key=lambda i: (-abs(flat[i]), i))[:k]
  return flat[order], np.array(order)


def np_chunked_topk(x, k, chunk):
  """Per chunk of `chunk` flat entries: the k largest |x| (ties: lower index), as flat
  indices of x; a short last chunk contributes only its real entries."""
  flat = np.asarray(x, np.float64).reshape(-1)
  out = []
  for start in range(0, flat.size, chunk):
    part = flat[start:start + chunk]
    order = np.lexsort((np.arange(part.size), -np.abs(part)))[:k]
    out.append(start + order)
  indices = np.concatenate(out)
  return flat[indices], indices


def bf16(x):
  """x rounded to bfloat16 (nearest even), back in float64."""
  return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16), np.float64)


def test_topk_compress_matches_numpy(rng_seed):
  rng = np.random.default_rng(rng_seed)
  x = rng.standard_normal((7, 9)).astype(np.float32)
  x[0, :4] = 2.5          # ties: the lower indices win
  x[1, 0] = -2.5
  for k in (1, 5, 13, 63):
    values, indices = gradient.topk_compress(jnp.asarray(x), k)
    ref_values, ref_indices = np_topk(x, k)
    assert indices.dtype == jnp.int32 and values.dtype == jnp.float32
    assert indices.shape == values.shape == (1, k)
    np.testing.assert_array_equal(np.asarray(indices)[0], ref_indices)
    np.testing.assert_array_equal(np.asarray(values)[0], ref_values.astype(np.float32))


@pytest.mark.parametrize("shape,k,chunk", [((7, 9), 3, 16), ((7, 9), 10, 16),
                                           ((5, 8), 4, 8), ((300, 250), 5, 1 << 16)])
def test_chunked_topk_and_uint16_wire_match_numpy(shape, k, chunk, rng_seed):
  """Per-chunk top-k equals a NumPy loop over chunks (63 = 3·16 + 15: a padded last
  chunk; k = 10 > 15 real entries of no chunk, k = 10 with chunk 16 and 63 entries:
  the last chunk has 15); the uint16 chunk-local indices decode to the same flat
  positions, and scatter there like the int32 path."""
  rng = np.random.default_rng(rng_seed)
  x = rng.standard_normal(shape).astype(np.float32)
  values, indices = gradient.topk_compress(jnp.asarray(x), k, chunk)
  num = -(-x.size // chunk)
  assert values.shape == indices.shape == (num, k)
  ref_values, ref_indices = np_chunked_topk(x, k, chunk)
  real = np.asarray(indices).reshape(-1) < x.size
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1)[real], ref_indices)
  np.testing.assert_array_equal(np.asarray(values).reshape(-1)[real],
                                ref_values.astype(np.float32))
  assert np.all(np.asarray(values).reshape(-1)[~real] == 0)   # padding sends zeros
  cfg = GradCompressionConfig(value_dtype="bfloat16", index_dtype="uint16")
  wire = gradient.to_wire(cfg, values, indices, chunk)
  assert wire[0].dtype == jnp.bfloat16 and wire[1].dtype == jnp.uint16
  assert int(np.asarray(wire[1]).max()) < chunk
  decoded_values, decoded = gradient.from_wire(*wire, chunk, jnp.float32)
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(indices))
  np.testing.assert_array_equal(np.asarray(decoded_values).reshape(-1)[real],
                                bf16(ref_values))
  # uint16 and int32 wire scatter to the same positions.
  int32_wire = gradient.to_wire(GradCompressionConfig(), values, indices, chunk)
  assert int32_wire[1].dtype == jnp.int32
  np.testing.assert_array_equal(
      np.asarray(gradient.scatter_add(*int32_wire, shape)) != 0,
      np.asarray(gradient.scatter_add(decoded_values, decoded, shape)) != 0)
  ref = np.zeros(x.size)
  ref[ref_indices] = bf16(ref_values)
  np.testing.assert_array_equal(
      np.asarray(gradient.scatter_add(decoded_values, decoded, shape)).reshape(-1), ref)


def test_scatter_add_sums_gathered_rows(rng_seed):
  rng = np.random.default_rng(rng_seed)
  values = rng.standard_normal((4, 6)).astype(np.float32)
  indices = rng.integers(0, 15, (4, 6)).astype(np.int32)   # repeats across rows
  ref = np.zeros(15)
  for v, i in zip(values.reshape(-1), indices.reshape(-1)):
    ref[i] += v
  out = gradient.scatter_add(jnp.asarray(values), jnp.asarray(indices), (3, 5))
  np.testing.assert_allclose(np.asarray(out), ref.reshape(3, 5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value_dtype,index_dtype", [("float32", "int32"),
                                                     ("bfloat16", "uint16")])
def test_error_feedback_conserves_the_gradient_sum(value_dtype, index_dtype, rng_seed):
  """Each step: sent (as float32) + e_t = p_t = e_{t-1} + g_t exactly (the bfloat16
  rounding error stays in e); so Σ_t sent_t + e_T = Σ_t g_t."""
  rng = np.random.default_rng(rng_seed)
  cfg = GradCompressionConfig(method="topk_ef", value_dtype=value_dtype,
                              index_dtype=index_dtype)
  shape, k = (6, 8), 3
  residual = jnp.zeros(shape)
  total_sent, total_grad = np.zeros(shape), np.zeros(shape)
  for _ in range(6):
    g = rng.standard_normal(shape).astype(np.float32)
    p = np.asarray(residual) + g                     # float32, as on the device
    wire, residual = gradient.error_feedback(cfg, residual, jnp.asarray(g), k)
    assert wire[0].dtype == value_dtype and wire[1].dtype == index_dtype
    values, indices = gradient.from_wire(*wire, cfg.chunk(p.size), jnp.float32)
    ref_values, ref_indices = np_topk(p, k)
    np.testing.assert_array_equal(np.asarray(indices).reshape(-1), ref_indices)
    rounded = bf16(ref_values) if value_dtype == "bfloat16" else ref_values
    np.testing.assert_array_equal(np.asarray(values).reshape(-1), rounded)
    expected = p.reshape(-1).astype(np.float64)
    expected[ref_indices] -= rounded
    np.testing.assert_array_equal(np.asarray(residual).reshape(-1), expected)
    sent = np.asarray(gradient.scatter_add(values, indices, shape))
    np.testing.assert_array_equal(sent + np.asarray(residual), p)   # exact, float32
    total_sent += sent
    total_grad += g
  np.testing.assert_allclose(total_sent + np.asarray(residual), total_grad, rtol=1e-5,
                             atol=1e-5)


def np_dgc_step(u, v, g, m, k, clip, n):
  """NumPy DGC on one device's flat gradient: clip, u ← m·u + g, v ← v + u, top-k(v),
  mask u and v where sent."""
  norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g))
  scale = min(1.0, clip * math.sqrt(n) / norm)
  out = []
  for ui, vi, gi in zip(u, v, g):
    ui = m * ui + gi * scale
    vi = vi + ui
    values, indices = np_topk(vi, k)
    ui, vi = ui.reshape(-1).copy(), vi.reshape(-1).copy()
    ui[indices] = 0
    vi[indices] = 0
    out.append((ui.reshape(gi.shape), vi.reshape(gi.shape), values, indices))
  return out


def test_dgc_pieces_match_numpy(rng_seed):
  rng = np.random.default_rng(rng_seed)
  shapes, k, m, clip, n = [(5, 6), (4, 4)], 4, 0.9, 0.5, 8
  u = [np.zeros(s) for s in shapes]
  v = [np.zeros(s) for s in shapes]
  ju = [jnp.zeros(s) for s in shapes]
  jv = [jnp.zeros(s) for s in shapes]
  for _ in range(4):
    g = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref = np_dgc_step(u, v, g, m, k, clip, n)
    clipped = gradient.clip_local([jnp.asarray(x) for x in g], clip, n)
    for i, (ru, rv, rvalues, rindices) in enumerate(ref):
      ju[i], jv[i] = gradient.dgc_accumulate(ju[i], jv[i], clipped[i], m)
      values, indices = gradient.topk_compress(jv[i], k)
      np.testing.assert_array_equal(np.asarray(indices)[0], rindices)
      np.testing.assert_allclose(np.asarray(values)[0], rvalues, rtol=1e-5, atol=1e-6)
      ju[i], jv[i] = gradient.zero_at(ju[i], indices), gradient.zero_at(jv[i], indices)
      np.testing.assert_allclose(np.asarray(ju[i]), ru, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(jv[i]), rv, rtol=1e-5, atol=1e-6)
      u[i], v[i] = ru, rv


def test_clip_local_bounds_the_norm(rng_seed):
  rng = np.random.default_rng(rng_seed)
  g = {"a": jnp.asarray(rng.standard_normal((8, 8)) * 10, jnp.float32),
       "b": jnp.asarray(rng.standard_normal(8), jnp.float32)}
  out = gradient.clip_local(g, 1.0, 4)
  norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in out.values()))
  assert norm == pytest.approx(2.0, rel=1e-5)        # max_norm · √N
  np.testing.assert_allclose(np.asarray(out["a"]) / np.asarray(g["a"]), norm /
                             np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                         for x in g.values())), rtol=1e-5)
  small = gradient.clip_local(jax.tree.map(lambda x: x * 1e-4, g), 1.0, 4)
  np.testing.assert_array_equal(np.asarray(small["a"]), np.asarray(g["a"] * 1e-4))
  assert gradient.clip_local(g, 0.0, 4) is g


def test_warmup_follows_dgc_schedule():
  cfg = GradCompressionConfig(method="dgc", ratio=0.001, warmup_steps=8)
  assert cfg.stage_ratios() == (0.25, 0.0625, 0.015625, 0.004, 0.001)
  stages = [int(gradient.stage_index(cfg, s)) for s in range(11)]
  assert stages == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
  coarse = GradCompressionConfig(method="topk_ef", ratio=0.1, warmup_steps=4)
  assert coarse.stage_ratios() == (0.25, 0.1, 0.1, 0.1, 0.1)   # never below ratio
  assert GradCompressionConfig(ratio=0.01).stage_ratios() == (0.01,)
  assert int(gradient.stage_index(GradCompressionConfig(), 123)) == 0


def test_stage_ks_sparsify_only_matrices():
  params = {"w": jnp.zeros((100, 30)), "b": jnp.zeros(30), "e": jnp.zeros((3, 1))}
  ks = gradient.stage_ks(GradCompressionConfig(ratio=0.001, warmup_steps=4), params)
  assert [k["w"] for k in ks] == [750, 188, 47, 12, 3]
  assert all(k["b"] is None for k in ks)
  assert ks[-1]["e"] == 1 and ks[0]["e"] == 1
  dense = gradient.stage_ks(GradCompressionConfig(ratio=1.0), params)
  assert dense == [{"w": None, "b": None, "e": None}]
  # uint16 indices: k per chunk of 2^16 entries (here one chunk of 3000 / two of 65536).
  big = {"w": jnp.zeros((100, 30)), "v": jnp.zeros((1000, 100))}
  cfg = GradCompressionConfig(ratio=0.001, index_dtype="uint16")
  assert cfg.chunk(3000) == 3000 and cfg.chunk(100_000) == 65536
  assert gradient.stage_ks(cfg, big) == [{"w": 3, "v": 66}]


@pytest.mark.parametrize("field,value,allowed", [
    ("ratio", 0.0, "in (0, 1]"), ("ratio", 1.5, "in (0, 1]"),
    ("method", "powersgd", "one of"), ("warmup_steps", -1, ">= 0"),
    ("momentum", 1.0, "in [0, 1)"), ("value_dtype", "float16", "one of"),
    ("index_dtype", "int16", "one of")])
def test_config_errors_name_the_field(field, value, allowed):
  with pytest.raises(ConfigError, match=rf"config\.train\.grad_compression\.{field}=.*"
                     + re.escape(allowed)):
    from_mapping(GradCompressionConfig, {field: value}, "config.train.grad_compression")
  with pytest.raises(ConfigError, match=r"grad_compression\.warmup_ratios\[1\]=0\.0"):
    from_mapping(GradCompressionConfig, {"warmup_ratios": (0.5, 0.0)},
                 "config.train.grad_compression")


@pytest.mark.parametrize("method,value_dtype,index_dtype", [
    ("topk_ef", "float32", "int32"), ("dgc", "float32", "int32"),
    ("topk_ef", "bfloat16", "uint16"), ("dgc", "bfloat16", "uint16")])
def test_exchange_on_8_devices_matches_numpy(method, value_dtype, index_dtype, rng_seed):
  """Each device compresses its own gradient; every device receives the mean of all
  devices' sparse gradients; per-device state and the bytes sent match NumPy (with
  bfloat16 values the rounding error stays in the residual / velocity)."""
  rng = np.random.default_rng(rng_seed)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
  n, m = 8, 0.9
  cfg = GradCompressionConfig(method=method, ratio=0.1, momentum=m,
                              value_dtype=value_dtype, index_dtype=index_dtype)
  rnd = bf16 if value_dtype == "bfloat16" else (lambda x: x)
  entry_bytes = 4 if value_dtype == "bfloat16" else 8
  shapes = {"w": (6, 10), "b": (10,)}
  grads = {name: rng.standard_normal((n, *s)).astype(np.float32)
           for name, s in shapes.items()}
  state = jax.tree.map(lambda x: np.broadcast_to(x, (n, *x.shape)),
                       gradient.init_state(cfg, {k: np.zeros(s, np.float32)
                                                 for k, s in shapes.items()}))
  if method == "topk_ef":   # a nonzero residual to start from
    state["residual"]["w"] = rng.standard_normal((n, 6, 10)).astype(np.float32)
  ks = gradient.stage_ks(cfg, {k: jnp.zeros(s) for k, s in shapes.items()})[0]
  assert ks == {"w": 6, "b": None}

  def local(state, grads):
    state, grads = jax.tree.map(lambda x: x[0], (state, grads))
    mean, state, sent = gradient.compress_and_exchange(cfg, state, grads, ks, "data", n)
    return mean, jax.tree.map(lambda x: x[None], state), jnp.full((1,), sent)

  run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                              out_specs=(P(), P("data"), P("data")), check_vma=False))
  mean, new_state, sent = run(state, grads)
  assert np.all(np.asarray(sent) == 6 * entry_bytes + 10 * 4)   # values + indices + dense b

  total = np.zeros(60)
  for d in range(n):
    g = grads["w"][d].astype(np.float64)
    if method == "topk_ef":
      p = state["residual"]["w"][d] + g
      values, indices = np_topk(p, 6)
      values = rnd(values)
      left = p.reshape(-1).copy()
      left[indices] -= values
      np.testing.assert_allclose(np.asarray(new_state["residual"]["w"][d]).reshape(-1),
                                 left, rtol=1e-5, atol=1e-6)
      # Per device: sent + new residual = old residual + gradient.
      sent_dense = np.zeros(60)
      sent_dense[indices] = values
      np.testing.assert_allclose(
          sent_dense + np.asarray(new_state["residual"]["w"][d]).reshape(-1),
          p.reshape(-1), rtol=1e-5, atol=1e-6)
    else:
      u = g                     # u = m·0 + g, v = 0 + u
      values, indices = np_topk(u, 6)
      values = rnd(values)
      masked = u.reshape(-1).copy()
      masked[indices] = 0
      np.testing.assert_allclose(np.asarray(new_state["momentum"]["w"][d]).reshape(-1),
                                 masked, rtol=1e-5, atol=1e-6)
      left = u.reshape(-1).copy()
      left[indices] -= values   # v keeps the rounding error of what it sent
      np.testing.assert_allclose(np.asarray(new_state["velocity"]["w"][d]).reshape(-1),
                                 left, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(new_state["momentum"]["b"][d]),
                                 grads["b"][d], rtol=1e-6)
    np.add.at(total, indices, values)
  np.testing.assert_allclose(np.asarray(mean["w"]).reshape(-1), total / n, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(mean["b"]), grads["b"].mean(0), rtol=1e-5,
                             atol=1e-6)


def test_clip_local_clips_about_as_often_as_the_dense_average(rng_seed):
  """N independent noise gradients whose average has norm c (the dense run's threshold)
  each have norm ≈ c·√N: the local clipping at c·√N leaves them (nearly) as they are,
  as the dense clipping leaves their average."""
  n, c = 8, 1.0
  rng = np.random.default_rng(rng_seed)
  local = rng.standard_normal((n, 4096)).astype(np.float32)
  local *= c / np.linalg.norm(local.mean(0))            # ‖mean‖ = c exactly
  scales = [float(np.linalg.norm(np.asarray(gradient.clip_local([jnp.asarray(g)], c, n)[0]))
                  / np.linalg.norm(g)) for g in local]
  assert min(scales) > 0.9, scales
