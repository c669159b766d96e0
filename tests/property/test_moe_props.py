"""Properties of the MoE router, balancing losses and dispatch algorithms (random inputs).

Reference (float64 NumPy): y_t = Σ_j w_tj · FFN_{e_tj}(x_t) over the valid (token, slot)
pairs only (expert id in [0, E)); GShard capacity drops the pairs whose slot-major
position within their expert reaches C. Every dispatch algorithm must equal it, and
give the same gradients as the "loop" reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify

from prop_helpers import assert_close, f64, float_arrays, float_dtypes, rng_for, shapes
from sparsejax.ops import (expert_load, moe_ffn, route, router_z_loss, switch_aux_loss,
                           update_bias)

DISPATCHES = ("loop", "dropless", "capacity", "decode")
ACTS = {"silu": lambda h: h / (1 + np.exp(-h)), "relu": lambda h: np.maximum(h, 0),
        "relu2": lambda h: np.maximum(h, 0) ** 2}


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@st.composite
def route_case(draw):
  lead = draw(shapes(1, 2, 1, 5))
  e = draw(st.integers(1, 8))
  logits = draw(float_arrays((*lead, e), draw(float_dtypes), kinds=("normal", "ties")))
  rng = rng_for(draw)
  bias = draw(st.one_of(st.none(), st.just(rng.integers(-2, 3, size=e) * 0.25)))
  return (logits, draw(st.integers(1, e)), draw(st.sampled_from(("softmax", "sigmoid"))),
          None if bias is None else bias.astype(np.float32), draw(st.booleans()))


@pytest.mark.slow
@given(route_case())
def test_route_picks_top_k_of_scores_plus_bias(case):
  logits, k, scoring, bias, renorm = case
  f = jax.jit(lambda z, b: route(z, k, scoring=scoring, bias=b, renormalize=renorm))
  weights, experts, scores = f(logits, bias)
  z = f64(logits)
  ref_scores = softmax(z) if scoring == "softmax" else 1 / (1 + np.exp(-z))
  assert scores.dtype == weights.dtype == jnp.float32 and experts.dtype == jnp.int32
  np.testing.assert_allclose(f64(scores), ref_scores, rtol=1e-5, atol=1e-6)
  # selection: the k largest scores + bias (computed like the op, in float32), lowest
  # expert index first among ties; no gradient flows through the bias
  sel = np.asarray(scores) + (np.float32(0) if bias is None else bias)
  for row in np.ndindex(sel.shape[:-1]):
    order = np.lexsort((np.arange(sel.shape[-1]), -sel[row]))[:k]
    np.testing.assert_array_equal(experts[row], order)
  picked = np.take_along_axis(f64(scores), np.asarray(experts), -1)
  if renorm:
    picked = picked / picked.sum(-1, keepdims=True)
  np.testing.assert_allclose(f64(weights), picked, rtol=1e-5, atol=1e-7)


@functools.partial(jax.jit, static_argnames="e")
def losses(logits, scores, experts, bias, e):
  load = expert_load(experts, e)
  return (load, switch_aux_loss(scores, experts, e), router_z_loss(logits),
          update_bias(bias, load, 0.1))


@settings(max_examples=12)
@given(shapes(1, 2, 0, 5), st.integers(1, 6), st.data())
def test_balancing_losses(lead, e, data):
  """Load fractions (invalid ids count for no expert), the Switch aux loss, the z-loss
  and the aux-loss-free bias update against NumPy; zeros for no tokens."""
  rng = rng_for(data.draw)
  k = data.draw(st.integers(1, e))
  logits = rng.standard_normal((*lead, e)).astype(np.float32)
  experts = rng.integers(-1, e + 1, size=(*lead, k)).astype(np.int32)   # some invalid
  scores = softmax(f64(logits))
  bias = rng.standard_normal(e).astype(np.float32)
  load, aux, z, new_bias = losses(logits, scores.astype(np.float32), experts, bias, e)
  ref_load = np.array([(experts == i).sum() / max(experts.size, 1) for i in range(e)])
  np.testing.assert_allclose(load, ref_load, rtol=1e-6, atol=1e-7)
  p = scores.reshape(-1, e).mean(0) if scores.size else np.zeros(e)
  np.testing.assert_allclose(aux, e * (ref_load * p).sum(), rtol=1e-5, atol=1e-7)
  lse = np.log(np.exp(f64(logits)).sum(-1)) if logits.size else np.zeros(1)
  np.testing.assert_allclose(z, np.mean(lse**2), rtol=1e-5)
  diff = ref_load.mean() - ref_load
  step = np.where(np.abs(diff) <= 1e-6 * abs(ref_load.mean()), 0.0, np.sign(diff))
  # atol: float32(0.1) is 0.1 - 1.5e-9, visible where bias ± 0.1 cancels to ~0
  np.testing.assert_allclose(new_bias, bias + 0.1 * step, rtol=1e-6, atol=1e-7)


@st.composite
def moe_case(draw, max_t=6):
  t, d = draw(st.integers(1, max_t)), draw(st.integers(1, 6))
  e, f = draw(st.integers(1, 4)), draw(st.integers(1, 6))
  k = draw(st.integers(1, 3))
  dtype = draw(float_dtypes)
  rng = rng_for(draw)
  invalid = draw(st.sampled_from((0.0, 0.3)))
  experts = rng.integers(0, e, size=(t, k))
  bad = rng.random((t, k)) < invalid
  experts = np.where(bad, rng.choice([-1, -e - 3, e, e + 5], size=(t, k)), experts)
  cast = lambda a: np.asarray(jnp.asarray(a, dtype))
  gated = draw(st.booleans())
  return dict(
      x=cast(rng.standard_normal((t, d))),
      weights=rng.random((t, k)).astype(np.float32),
      experts=experts.astype(np.int32),
      w_gate=cast(rng.standard_normal((e, d, f)) / math.sqrt(d)) if gated else None,
      w_up=cast(rng.standard_normal((e, d, f)) / math.sqrt(d)),
      w_down=cast(rng.standard_normal((e, f, d)) / math.sqrt(f)),
      activation=draw(st.sampled_from(sorted(ACTS))))


def ref_moe(c, keep=None):
  """float64 y [T, D] from the valid (and, with `keep`, kept) (token, slot) pairs."""
  x, w, ex = f64(c["x"]), f64(c["weights"]), c["experts"]
  wu, wd = f64(c["w_up"]), f64(c["w_down"])
  act = ACTS[c["activation"]]
  y = np.zeros_like(x)
  for t, j in np.ndindex(ex.shape):
    e = ex[t, j]
    if not 0 <= e < wu.shape[0] or (keep is not None and not keep[t, j]):
      continue
    up = x[t] @ wu[e]
    h = act(up) if c["w_gate"] is None else act(x[t] @ f64(c["w_gate"])[e]) * up
    y[t] += w[t, j] * (h @ wd[e])
  return y


def ref_capacity_keep(experts, e, cap):
  """GShard: positions counted slot-major (all first choices, then second, ...)."""
  count, keep = np.zeros(e, int), np.zeros(experts.shape, bool)
  for j in range(experts.shape[1]):
    for t in range(experts.shape[0]):
      i = experts[t, j]
      if 0 <= i < e:
        keep[t, j] = count[i] < cap
        count[i] += 1
  return keep


def moe_args(c):
  return (c["x"], c["weights"], c["experts"], c["w_gate"], c["w_up"], c["w_down"])


@functools.partial(jax.jit, static_argnames=("activation", "cf"))
def all_dispatches(x, weights, experts, w_gate, w_up, w_down, dy, activation, cf):
  """{dispatch: (y, grads w.r.t. x, weights and the expert weights)}."""
  out = {}
  for dispatch in DISPATCHES:
    def f(x, weights, w_gate, w_up, w_down, dispatch=dispatch):
      return moe_ffn(x, weights, experts, w_gate, w_up, w_down, activation=activation,
                     dispatch=dispatch, capacity_factor=cf)[0]
    y, vjp = jax.vjp(f, x, weights, w_gate, w_up, w_down)
    out[dispatch] = (y, vjp(dy.astype(y.dtype)))
  return out


@pytest.mark.slow
@settings(max_examples=6)
@given(moe_case())
def test_every_dispatch_matches_reference(c):
  """No drops (capacity_factor = E): all four algorithms give the reference y, and the
  gradients of "loop"; pairs with an invalid expert id get exactly zero weight grad."""
  e = c["w_up"].shape[0]
  dy = np.random.default_rng(c["experts"].size).standard_normal(c["x"].shape)
  res = all_dispatches(*moe_args(c), dy, c["activation"], float(e))
  want = ref_moe(c)
  scale = c["experts"].shape[1] * max(1.0, np.abs(want).max())
  valid = (c["experts"] >= 0) & (c["experts"] < e)
  for dispatch, (y, grads) in res.items():
    assert y.dtype == c["x"].dtype and y.shape == c["x"].shape
    assert_close(y, want, scale=scale)
    assert (f64(grads[1])[~valid] == 0).all(), dispatch
    for g, g_loop in zip(grads, res["loop"][1]):
      if g is not None:
        assert_close(g, f64(g_loop), scale=scale * 4, dtype=c["x"].dtype)


@pytest.mark.slow
@settings(max_examples=12)
@given(moe_case(max_t=8), st.sampled_from((0.25, 0.5, 1.0, 1.5)))
def test_capacity_drops_slot_major_overflow(c, cf):
  t, k = c["experts"].shape
  e = c["w_up"].shape[0]
  f = jax.jit(lambda *a: moe_ffn(*a, activation=c["activation"], dispatch="capacity",
                                 capacity_factor=cf))
  y, dropped = f(*moe_args(c))
  cap = max(1, math.ceil(k * t / e * cf))
  keep = ref_capacity_keep(c["experts"], e, cap)
  valid = (c["experts"] >= 0) & (c["experts"] < e)
  want = ref_moe(c, keep)
  assert_close(y, want, scale=k * max(1.0, np.abs(want).max()))
  np.testing.assert_allclose(float(dropped), (valid & ~keep).sum() / (t * k), rtol=1e-6)


@settings(max_examples=5)
@given(moe_case(max_t=3))
def test_check_indices_reports_invalid_ids(c):
  """Every dispatch algorithm reports an id outside [0, E) under `checkify`."""
  invalid = not ((c["experts"] >= 0) & (c["experts"] < c["w_up"].shape[0])).all()
  checked = [checkify.checkify(functools.partial(moe_ffn, dispatch=d, check_indices=True))
             for d in DISPATCHES]
  errors = jax.jit(lambda *a: [f(*a)[0] for f in checked])(*moe_args(c))
  for dispatch, err in zip(DISPATCHES, errors):
    assert (err.get() is not None) == invalid, dispatch
    if invalid:
      assert "experts" in err.get()


@settings(max_examples=6)
@given(st.integers(0, 3), st.integers(0, 2), st.sampled_from(DISPATCHES), float_dtypes)
def test_no_tokens_or_no_slots_give_zeros(t, k, dispatch, dtype):
  if t and k:
    k = 0
  d, e, f = 3, 2, 4
  x = jnp.ones((t, d), dtype)
  y, dropped = moe_ffn(x, jnp.ones((t, k)), jnp.zeros((t, k), jnp.int32), None,
                       jnp.ones((e, d, f), dtype), jnp.ones((e, f, d), dtype),
                       dispatch=dispatch)
  assert y.shape == (t, d) and y.dtype == dtype and not np.asarray(y).any()
  assert float(dropped) == 0.0
  assert float(switch_aux_loss(jnp.ones((t, e)), jnp.zeros((t, k), jnp.int32), e)) == 0
  assert float(router_z_loss(jnp.ones((t, 0 if t else e)))) in (0.0, math.log(e) ** 2)


@given(st.data())
def test_bad_arguments_raise(data):
  t, d, e, f, k = 3, 4, 3, 5, 2
  x, w = np.ones((t, d), np.float32), np.ones((t, k), np.float32)
  ex = np.zeros((t, k), np.int32)
  wg, wu, wd = np.ones((e, d, f)), np.ones((e, d, f)), np.ones((e, f, d))
  ffn_cases = [
      ("x", (np.ones((t, d, 1), np.float32), w, ex, wg, wu, wd), {}),
      ("weights", (x, np.ones((t, k + 1)), ex, wg, wu, wd), {}),
      ("weights", (x, np.ones((t + 1, k)), np.zeros((t + 1, k), np.int32), wg, wu, wd),
       {}),
      ("experts", (x, w, ex.astype(np.float32), wg, wu, wd), {}),
      ("w_up", (x, w, ex, wg, np.ones((e, d + 1, f)), wd), {}),
      ("w_down", (x, w, ex, wg, wu, np.ones((e, f + 1, d))), {}),
      ("w_gate", (x, w, ex, np.ones((e, d, f + 1)), wu, wd), {}),
      ("dispatch=", (x, w, ex, wg, wu, wd), dict(dispatch="sorted")),
      ("capacity_factor=", (x, w, ex, wg, wu, wd),
       dict(dispatch="capacity", capacity_factor=data.draw(st.sampled_from((0.0, -1.0))))),
      ("activation=", (x, w, ex, wg, wu, wd), dict(activation="swish")),
  ]
  name, args, kwargs = data.draw(st.sampled_from(ffn_cases))
  with pytest.raises((ValueError, TypeError), match=name):
    moe_ffn(*args, **kwargs)
  logits = np.ones((t, e), np.float32)
  with pytest.raises(ValueError, match="k="):
    route(logits, data.draw(st.sampled_from((0, -1, e + 1))))
  with pytest.raises(ValueError, match="scoring="):
    route(logits, 1, scoring="relu")
  with pytest.raises(ValueError, match="bias"):
    route(logits, 1, bias=np.zeros(e + 1, np.float32))


def test_integer_activations_are_refused():
  w = np.ones((3, 4, 5), np.float32)
  for dtype, dispatch in zip((np.int32, np.int8, np.uint8, np.int32), DISPATCHES):
    x = np.ones((2, 4), dtype)
    with pytest.raises((ValueError, TypeError), match="x"):
      moe_ffn(x, np.ones((2, 1), np.float32), np.zeros((2, 1), np.int32), None, w,
              np.ones((3, 5, 4), np.float32), dispatch=dispatch)
    with pytest.raises((ValueError, TypeError), match="logits"):
      route(x, 1)
