"""MoE ops vs NumPy references (routers, losses, capacity rule, Hugging Face Mixtral
semantics), agreement of the loop / dropless / capacity / decode dispatches, the
invalid-expert-id rule and empty inputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental import checkify

from sparsejax.ops import moe

T, D, E, F = 12, 8, 6, 5


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(-1, keepdims=True)


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def np_silu(x):
  return x * np_sigmoid(x)


def np_route(z, k, scoring="softmax", bias=None, renormalize=True):
  s = np_softmax(z) if scoring == "softmax" else np_sigmoid(z)
  sel = s + (0.0 if bias is None else bias)
  idx = np.argsort(-sel, axis=-1, kind="stable")[:, :k]
  w = np.take_along_axis(s, idx, -1)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  return w, idx, s


def np_expert(x, wg, wu, wd, e):
  return (np_silu(x @ wg[e]) * (x @ wu[e])) @ wd[e]


def inputs(seed, t=T, d=D, e=E, f=F):
  rng = np.random.default_rng(seed)
  def arr(*shape, scale=1.0):
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))
  return (arr(t, d), arr(t, e), arr(e, d, f, scale=0.5), arr(e, d, f, scale=0.5),
          arr(e, f, d, scale=0.5))


def f64(*xs):
  return [np.asarray(x, np.float64) for x in xs]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_matches_numpy(rng_seed, scoring, renormalize, k):
  _, logits, *_ = inputs(rng_seed)
  w, idx, s = moe.route(logits, k, scoring=scoring, renormalize=renormalize)
  w_ref, idx_ref, s_ref = np_route(np.asarray(logits, np.float64), k, scoring,
                                   renormalize=renormalize)
  assert w.dtype == jnp.float32 and idx.dtype == jnp.int32 and s.dtype == jnp.float32
  assert w.shape == idx.shape == (T, k) and s.shape == (T, E)
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-6)
  if scoring == "softmax" and renormalize:  # = softmax over the top-k logits
    top = np.take_along_axis(np.asarray(logits, np.float64), idx_ref, -1)
    np.testing.assert_allclose(w, np_softmax(top), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_bias_changes_selection_but_gets_no_gradient(rng_seed, scoring):
  _, logits, *_ = inputs(rng_seed)
  rng = np.random.default_rng(rng_seed + 1)
  bias = jnp.asarray(rng.uniform(-0.5, 0.5, E).astype(np.float32)).at[E - 1].set(5.0)
  w, idx, _ = moe.route(logits, 2, scoring=scoring, bias=bias)
  w_ref, idx_ref, _ = np_route(np.asarray(logits, np.float64), 2, scoring,
                               bias=np.asarray(bias, np.float64))
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(idx)[:, 0] == E - 1)     # the biased expert is always chosen
  _, idx_nobias, _ = moe.route(logits, 2, scoring=scoring)
  assert not np.array_equal(idx, idx_nobias)
  c = jnp.asarray(rng.standard_normal((T, 2)).astype(np.float32))
  loss = lambda z, b: jnp.sum(moe.route(z, 2, scoring=scoring, bias=b)[0] * c)
  g_z, g_b = jax.grad(loss, (0, 1))(logits, bias)
  np.testing.assert_array_equal(g_b, np.zeros(E))
  assert np.abs(np.asarray(g_z)).max() > 0


def test_aux_losses_and_load_match_numpy(rng_seed):
  _, logits, *_ = inputs(rng_seed)
  k = 2
  _, idx, s = moe.route(logits, k)
  z, idx_np, s_np = np.asarray(logits, np.float64), np.asarray(idx), np.asarray(s,
                                                                              np.float64)
  f = np.bincount(idx_np.ravel(), minlength=E) / (T * k)
  np.testing.assert_allclose(moe.expert_load(idx, E), f, rtol=1e-6)
  np.testing.assert_allclose(moe.switch_aux_loss(s, idx, E),
                             E * np.sum(f * s_np.mean(0)), rtol=1e-5)
  lse = np.log(np.exp(z).sum(-1))
  np.testing.assert_allclose(moe.router_z_loss(logits), np.mean(lse ** 2), rtol=1e-5)
  # Uniform routing gives a Switch loss of exactly 1.
  flat = jnp.full((T, E), 1.0 / E)
  uniform_idx = jnp.asarray(np.arange(T * k).reshape(T, k) % E, jnp.int32)
  np.testing.assert_allclose(moe.switch_aux_loss(flat, uniform_idx, E), 1.0, rtol=1e-6)


def test_update_bias_sign_rule(rng_seed):
  rng = np.random.default_rng(rng_seed)
  bias = jnp.asarray(rng.standard_normal(4).astype(np.float32))
  load = jnp.asarray([0.5, 0.25, 0.25, 0.0])  # mean 0.25
  np.testing.assert_allclose(moe.update_bias(bias, load, 1e-3),
                             np.asarray(bias) + 1e-3 * np.array([-1.0, 0.0, 0.0, 1.0]),
                             rtol=1e-6)


@functools.partial(jax.jit, static_argnames=("dispatch", "k", "capacity_factor"))
def _run(dispatch, x, logits, wg, wu, wd, k=2, capacity_factor=100.0):
  w, idx, _ = moe.route(logits, k)
  return moe.moe_ffn(x, w, idx, wg, wu, wd, activation="silu", dispatch=dispatch,
                     capacity_factor=capacity_factor)


@functools.partial(jax.jit, static_argnames=("dispatch", "k"))
def _value_and_grads(dispatch, args, cot, k):
  """(y, grads w.r.t. x, logits, w_gate, w_up, w_down) of <y, cot>."""
  def f(args):
    y, dropped = _run(dispatch, *args, k=k)
    return jnp.sum(y * cot), (y, dropped)
  (_, (y, dropped)), grads = jax.value_and_grad(f, has_aux=True)(args)
  return y, dropped, grads


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_dispatches_agree_forward_and_grads(rng_seed, k):
  args = inputs(rng_seed)
  x, logits, wg, wu, wd = args
  # Reference by hand: y_t = Σ_j w_tj · expert_{e_tj}(x_t).
  w_np, idx_np, _ = np_route(np.asarray(logits, np.float64), k)
  x64, wg64, wu64, wd64 = f64(x, wg, wu, wd)
  ref = np.stack([sum(w_np[t, j] * np_expert(x64[t], wg64, wu64, wd64, idx_np[t, j])
                      for j in range(k)) for t in range(T)])
  rng = np.random.default_rng(rng_seed + 7)
  cot = jnp.asarray(rng.standard_normal((T, D)).astype(np.float32))
  results = {}
  for dispatch in moe.DISPATCHES:
    y, dropped, results[dispatch] = _value_and_grads(dispatch, args, cot, k)
    assert y.shape == (T, D) and y.dtype == jnp.float32 and float(dropped) == 0.0
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5, err_msg=dispatch)
  for dispatch in moe.DISPATCHES:
    for name, a, b in zip(("x", "logits", "w_gate", "w_up", "w_down"),
                          results[dispatch], results["loop"]):
      assert np.abs(np.asarray(b)).max() > 0, name
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{dispatch} {name}")


@pytest.mark.slow
def test_non_gated_experts_agree(rng_seed):
  x, logits, _, wu, wd = inputs(rng_seed)
  w, idx, _ = moe.route(logits, 2)
  run = jax.jit(moe.moe_ffn,
                static_argnames=("activation", "dispatch", "capacity_factor"))
  ys = {dispatch: run(x, w, idx, None, wu, wd, activation="relu2", dispatch=dispatch,
                      capacity_factor=100.0)[0] for dispatch in moe.DISPATCHES}
  x64, wu64, wd64 = f64(x, wu, wd)
  w64, idx64 = np.asarray(w, np.float64), np.asarray(idx)
  ref = np.stack([sum(w64[t, j] * (np.maximum(x64[t] @ wu64[idx64[t, j]], 0) ** 2)
                      @ wd64[idx64[t, j]] for j in range(2)) for t in range(T)])
  for dispatch, y in ys.items():
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5, err_msg=dispatch)


def test_decode_path_matches_at_batch_one(rng_seed):
  x, logits, wg, wu, wd = inputs(rng_seed, t=1, e=16)
  w, idx, _ = moe.route(logits, 2)
  np.testing.assert_allclose(jax.jit(moe.moe_decode)(x, w, idx, wg, wu, wd),
                             moe.moe_ffn(x, w, idx, wg, wu, wd, dispatch="dropless")[0],
                             rtol=1e-5, atol=1e-6)


def test_capacity_drops_by_cumsum_rule(rng_seed):
  x, logits, wg, wu, wd = inputs(rng_seed)
  k, cf = 2, 0.5
  c = math.ceil(k * T / E * cf)
  assert moe.capacity(T, k, E, cf) == c == 2
  w_np, idx_np, _ = np_route(np.asarray(logits, np.float64), k)
  # NumPy GShard rule: slot-major priority (all 1st choices, then 2nd), keep < C per expert.
  count, keep = np.zeros(E, int), np.zeros((T, k), bool)
  for j in range(k):
    for t in range(T):
      keep[t, j] = count[idx_np[t, j]] < c
      count[idx_np[t, j]] += 1
  assert not keep.all()
  x64, wg64, wu64, wd64 = f64(x, wg, wu, wd)
  ref = np.stack([sum((w_np[t, j] * np_expert(x64[t], wg64, wu64, wd64, idx_np[t, j])
                       if keep[t, j] else np.zeros(D)) for j in range(k))
                  for t in range(T)])
  y, dropped = _run("capacity", x, logits, wg, wu, wd, k=k, capacity_factor=cf)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dropped, 1 - keep.mean(), rtol=1e-6)


def test_matches_hugging_face_mixtral_semantics(rng_seed):
  """NumPy re-implementation of transformers' MixtralSparseMoeBlock.forward and
  load_balancing_loss_func on shared random weights.

  HF: router_logits = x @ gate.T; p = softmax(router_logits); top-k; renormalize;
  expert = w2(silu(w1 x) * w3 x) with nn.Linear weights [out, in]. Its balancing loss
  is E · Σ_{j,i} mean_t(onehot[t,j,i]) · mean_t(p[t,i]), whose token fractions sum to
  k over experts, so HF loss = k × our Switch loss (f_i counts the T·k slots).
  """
  k = 2
  x, _, wg, wu, wd = inputs(rng_seed)
  rng = np.random.default_rng(rng_seed + 3)
  gate = rng.standard_normal((E, D))                       # nn.Linear(D, E).weight
  x64, wg64, wu64, wd64 = f64(x, wg, wu, wd)
  w1 = np.transpose(wg64, (0, 2, 1))                       # [E, F, D] Linear weights
  w3 = np.transpose(wu64, (0, 2, 1))
  w2 = np.transpose(wd64, (0, 2, 1))                       # [E, D, F]
  # --- HF MixtralSparseMoeBlock.forward ---
  router_logits = x64 @ gate.T
  routing_weights = np_softmax(router_logits)
  selected = np.argsort(-routing_weights, axis=-1, kind="stable")[:, :k]
  top = np.take_along_axis(routing_weights, selected, -1)
  top = top / top.sum(-1, keepdims=True)
  final = np.zeros_like(x64)
  for e in range(E):
    token_idx, slot = np.nonzero(selected == e)
    h = x64[token_idx]
    out = (np_silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T
    np.add.at(final, token_idx, out * top[token_idx, slot, None])
  # --- HF load_balancing_loss_func ---
  expert_mask = np.eye(E)[selected]                          # [T, k, E]
  tokens_per_expert = expert_mask.mean(0)                    # [k, E]
  hf_loss = E * np.sum(tokens_per_expert * routing_weights.mean(0)[None])
  # --- ours ---
  logits = jnp.asarray(router_logits.astype(np.float32))
  w, idx, scores = moe.route(logits, k)
  for dispatch in ("loop", "dropless"):  # the others agree with these (test above)
    y, _ = _run(dispatch, x, logits, wg, wu, wd, k=k)
    np.testing.assert_allclose(y, final, rtol=1e-4, atol=1e-4, err_msg=dispatch)
  np.testing.assert_allclose(k * moe.switch_aux_loss(scores, idx, E), hf_loss, rtol=1e-5)


def test_bad_arguments_raise():
  x, logits, wg, wu, wd = inputs(0)
  with pytest.raises(ValueError, match="k=7"):
    moe.route(logits, 7)
  with pytest.raises(ValueError, match="scoring"):
    moe.route(logits, 2, scoring="tanh")
  w, idx, _ = moe.route(logits, 2)
  with pytest.raises(ValueError, match=r"dispatch='fast' must be one of \('loop'"):
    moe.moe_ffn(x, w, idx, wg, wu, wd, dispatch="fast")
  with pytest.raises(ValueError, match="w_down"):
    moe.moe_ffn(x, w, idx, wg, wu, wu, dispatch="loop")
  with pytest.raises(ValueError, match="capacity_factor=0"):
    moe.moe_ffn(x, w, idx, wg, wu, wd, dispatch="capacity", capacity_factor=0)
  with pytest.raises(TypeError, match="experts must be an integer array"):
    moe.moe_ffn(x, w, idx.astype(jnp.float32), wg, wu, wd)


# ------------------------------------------------------------- invalid ids, empty inputs

BAD_IDS = (-1, E, E + 3, -E)


def corrupt(idx, seed, frac=0.3):
  """(ids with a random `frac` of the pairs set to invalid values, bool mask of them)."""
  rng = np.random.default_rng(seed)
  bad = rng.random(idx.shape) < frac
  bad[0, 0] = True                                         # at least one
  ids = np.where(bad, rng.choice(BAD_IDS, idx.shape), np.asarray(idx))
  return jnp.asarray(ids, jnp.int32), bad


def np_moe(x, w, idx, use):
  """y_t = Σ_j [use_tj] w_tj · expert_{idx_tj}(x_t) in float64 (gated SwiGLU)."""
  x64, wg64, wu64, wd64 = x
  out = np.zeros((x64.shape[0], wd64.shape[-1]))
  for t, j in zip(*np.nonzero(use)):
    out[t] += w[t, j] * np_expert(x64[t], wg64, wu64, wd64, idx[t, j])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", moe.DISPATCHES)
def test_invalid_expert_ids_contribute_exactly_zero(rng_seed, dispatch):
  """Ids -1, -E, E, E+3: y equals the NumPy sum over the valid pairs only; the grads
  equal those of the same call with weight 0 on those pairs (ids made valid), and the
  invalid pairs' weights get exactly zero gradient."""
  x, logits, wg, wu, wd = inputs(rng_seed)
  k = 3
  w, idx, _ = moe.route(logits, k)
  ids, bad = corrupt(idx, rng_seed)
  ref = np_moe(f64(x, wg, wu, wd), np.asarray(w, np.float64), np.asarray(idx), ~bad)
  run = jax.jit(lambda x, w, ids, wg, wu, wd: moe.moe_ffn(
      x, w, ids, wg, wu, wd, dispatch=dispatch, capacity_factor=100.0))
  y, dropped = run(x, w, ids, wg, wu, wd)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  assert float(dropped) == 0.0
  cot = jnp.asarray(np.random.default_rng(rng_seed + 1).standard_normal((T, D)),
                    jnp.float32)
  loss = lambda *a: jnp.sum(run(*a)[0] * cot)
  grads = jax.grad(loss, (0, 1, 3, 4, 5))(x, w, ids, wg, wu, wd)
  w0, ids0 = jnp.where(bad, 0.0, w), jnp.where(bad, 0, ids)
  grads0 = jax.grad(loss, (0, 1, 3, 4, 5))(x, w0, ids0, wg, wu, wd)
  np.testing.assert_array_equal(np.asarray(grads[1])[bad], 0.0)
  for name, g, g0 in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads0):
    if name == "weights":
      g, g0 = np.asarray(g)[~bad], np.asarray(g0)[~bad]
    assert np.abs(np.asarray(g0)).max() > 0, name
    np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5, err_msg=name)


def test_invalid_ids_take_no_capacity_and_are_not_dropped(rng_seed):
  x, logits, wg, wu, wd = inputs(rng_seed)
  k, cf = 2, 0.5
  c = moe.capacity(T, k, E, cf)
  w, idx, _ = moe.route(logits, k)
  ids, bad = corrupt(idx, rng_seed, frac=0.25)
  ids_np = np.asarray(ids)
  count, keep = np.zeros(E, int), np.zeros((T, k), bool)
  for j in range(k):                                       # slot-major GShard rule
    for t in range(T):
      if not bad[t, j]:
        keep[t, j] = count[ids_np[t, j]] < c
        count[ids_np[t, j]] += 1
  dropped_ref = np.sum(~bad & ~keep) / (T * k)
  assert dropped_ref > 0
  ref = np_moe(f64(x, wg, wu, wd), np.asarray(w, np.float64), ids_np, keep)
  y, dropped = jax.jit(lambda *a: moe.moe_ffn(*a, dispatch="capacity",
                                              capacity_factor=cf))(x, w, ids, wg, wu, wd)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dropped, dropped_ref, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", moe.DISPATCHES)
def test_check_indices_reports_invalid_ids_through_checkify(rng_seed, dispatch):
  x, logits, wg, wu, wd = inputs(rng_seed)
  w, idx, _ = moe.route(logits, 2)
  f = checkify.checkify(jax.jit(lambda ids: moe.moe_ffn(
      x, w, ids, wg, wu, wd, dispatch=dispatch, check_indices=True)[0]))
  err, y = f(idx)
  assert err.get() is None
  np.testing.assert_allclose(y, moe.moe_ffn(x, w, idx, wg, wu, wd, dispatch=dispatch)[0],
                             rtol=1e-4, atol=1e-5)
  for bad in (-1, E):
    err, _ = f(idx.at[3, 1].set(bad))
    assert f"experts must be expert ids in [0, {E}), got {bad}" in err.get()


@pytest.mark.parametrize("dispatch", moe.DISPATCHES)
@pytest.mark.parametrize("t, k", [(0, 2), (4, 0)], ids=["no_tokens", "no_slots"])
def test_empty_tokens_or_slots_give_zeros_forward_and_backward(rng_seed, dispatch, t, k):
  x, logits, wg, wu, wd = inputs(rng_seed, t=t)
  w = jnp.ones((t, k), jnp.float32)
  ids = jnp.zeros((t, k), jnp.int32)
  f = jax.jit(lambda x, w, wg: jnp.sum(moe.moe_ffn(x, w, ids, wg, wu, wd,
                                                   dispatch=dispatch)[0]))
  y, dropped = moe.moe_ffn(x, w, ids, wg, wu, wd, dispatch=dispatch)
  assert y.shape == (t, D) and float(dropped) == 0.0
  np.testing.assert_array_equal(y, np.zeros((t, D)))
  gx, gw, gwg = jax.grad(f, (0, 1, 2))(x, w, wg)
  assert gx.shape == (t, D) and gw.shape == (t, k) and gwg.shape == wg.shape
  np.testing.assert_array_equal(gwg, np.zeros(wg.shape))


def test_route_and_losses_with_no_tokens():
  logits = jnp.zeros((0, E))
  w, idx, s = moe.route(logits, 2)
  assert w.shape == idx.shape == (0, 2) and s.shape == (0, E)
  np.testing.assert_array_equal(moe.expert_load(idx, E), np.zeros(E))
  assert float(moe.switch_aux_loss(s, idx, E)) == 0.0
  assert float(moe.router_z_loss(logits)) == 0.0
  g = jax.grad(lambda z: moe.router_z_loss(z) + moe.switch_aux_loss(
      moe.route(z, 2)[2], idx, E))(logits)
  assert g.shape == (0, E)
