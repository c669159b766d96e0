"""Properties of memory_lookup (PKM / UltraMem weighted gather-sum) on random inputs.

Reference (float64 NumPy loops): y[..., g, :] = Σ_k w·[groups = g]·V[idx] over the valid
lookups only (index in [0, N), group in [0, G)); dV[n] = Σ w·dY[g] over the valid
lookups reading row n; dw = ⟨dY[g], V[idx]⟩ (0 for invalid lookups).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify

from prop_helpers import assert_close, assert_equal, f64, float_dtypes, rng_for, shapes
from sparsejax.ops import memory_lookup


@st.composite
def lookup_case(draw, dtypes=float_dtypes, max_lead=2):
  n, v, k = draw(st.integers(1, 12)), draw(st.integers(1, 8)), draw(st.integers(1, 5))
  lead = draw(shapes(0, max_lead, 1, 4))
  g = draw(st.one_of(st.none(), st.integers(1, 3)))
  rng = rng_for(draw)
  invalid = draw(st.sampled_from((0.0, 0.3, 1.0)))
  idx = rng.integers(0, n, size=(*lead, k))
  bad = rng.random(idx.shape) < invalid
  idx = np.where(bad, rng.choice([-1, -n - 1, n, n + 7, 2**31 - 1], size=idx.shape), idx)
  groups = None
  if g is not None:
    groups = rng.integers(0, g, size=idx.shape)
    badg = rng.random(idx.shape) < invalid / 2
    groups = np.where(badg, rng.choice([-1, g, g + 2], size=idx.shape), groups)
    groups = groups.astype(np.int32)
  values = np.asarray(jnp.asarray(rng.standard_normal((n, v)), draw(dtypes)))
  weights = np.asarray(jnp.asarray(rng.standard_normal(idx.shape), draw(dtypes)))
  return values, idx.astype(np.int32), weights, groups, g


def ref_valid(values, idx, groups, g):
  ok = (idx >= 0) & (idx < values.shape[0])
  if groups is not None:
    ok &= (groups >= 0) & (groups < g)
  return ok


def ref_lookup(values, idx, weights, groups, g, d_out):
  """(y, dV, dw) in float64; y [..., v] or [..., G, v]."""
  vals, w = f64(values), f64(weights)
  lead, k = idx.shape[:-1], idx.shape[-1]
  grp = np.zeros(idx.shape, int) if groups is None else groups
  ok = ref_valid(values, idx, groups, g)
  y = np.zeros((*lead, g or 1, vals.shape[1]))
  dy = np.asarray(d_out, np.float64).reshape(y.shape)
  dv, dw = np.zeros_like(vals), np.zeros(idx.shape)
  for pos in np.ndindex(*lead, k):
    if ok[pos]:
      row, gi = idx[pos], grp[pos]
      y[pos[:-1] + (gi,)] += w[pos] * vals[row]
      dv[row] += w[pos] * dy[pos[:-1] + (gi,)]
      dw[pos] = dy[pos[:-1] + (gi,)] @ vals[row]
  return (y if groups is not None else y[..., 0, :]), dv, dw


@functools.partial(jax.jit, static_argnames=("g", "impl"))
def lookup_and_grads(values, idx, weights, groups, d_out, g, impl="xla"):
  f = lambda values, weights: memory_lookup(values, idx, weights, groups=groups,
                                            num_groups=g, impl=impl)
  y, vjp = jax.vjp(f, values, weights)
  return (y, *vjp(d_out))


def out_dtype(values, weights):
  return jnp.result_type(values.dtype, weights.dtype)


def cotangent(case, seed=0):
  values, idx, weights, groups, g = case
  shape = (*idx.shape[:-1], *(() if groups is None else (g,)), values.shape[1])
  d = np.random.default_rng(seed).standard_normal(shape)
  return np.asarray(jnp.asarray(d, out_dtype(values, weights)))


@pytest.mark.slow
@settings(max_examples=15)
@given(lookup_case(), st.integers(0, 2**31))
def test_lookup_matches_reference(case, seed):
  """Forward, dV and dw against the float64 reference; invalid lookups add nothing."""
  values, idx, weights, groups, g = case
  d_out = cotangent(case, seed)
  y, dv, dw = lookup_and_grads(values, idx, weights, groups, d_out, g)
  ry, rdv, rdw = ref_lookup(values, idx, weights, groups, g, d_out)
  dtype = out_dtype(values, weights)
  assert y.dtype == dtype and y.shape == ry.shape
  assert dv.dtype == values.dtype and dw.dtype == weights.dtype
  k = idx.shape[-1]
  assert_close(y, ry, scale=k)
  assert_close(dv, rdv, scale=max(k, 1) * idx.size / max(1, idx.shape[-1]))
  assert_close(dw, rdw, scale=values.shape[1])
  ok = ref_valid(values, idx, groups, g)
  assert (f64(dw)[~ok] == 0).all()


@pytest.mark.slow
@settings(max_examples=12)
@given(lookup_case(max_lead=1), st.integers(0, 2**31))
def test_invalid_lookups_equal_zero_weight(case, seed):
  """Invalid lookups give bit-for-bit the output of the same call with their weight
  set to 0 (and a valid index/group), and their weights get exactly zero gradient."""
  values, idx, weights, groups, g = case
  ok = ref_valid(values, idx, groups, g)
  d_out = cotangent(case, seed)
  y, dv, dw = lookup_and_grads(values, idx, weights, groups, d_out, g)
  idx0 = np.where(ok, idx, 0).astype(idx.dtype)
  g0 = None if groups is None else np.where(ok, groups, 0).astype(groups.dtype)
  w0 = np.where(ok, weights, np.zeros_like(weights))
  y0, dv0, dw0 = lookup_and_grads(values, idx0, w0, g0, d_out, g)
  assert_equal(y, y0)
  np.testing.assert_allclose(f64(dv), f64(dv0), rtol=1e-6, atol=1e-6)
  assert_equal(np.where(ok, dw, 0), np.where(ok, dw0, 0))
  assert (f64(dw)[~ok] == 0).all()


@settings(max_examples=6)
@given(lookup_case(max_lead=1))
def test_check_indices_reports_invalid(case):
  values, idx, weights, groups, g = case
  f = checkify.checkify(lambda v, i, w, gr: memory_lookup(
      v, i, w, groups=gr, num_groups=g, impl="xla", check_indices=True))
  err, _ = jax.jit(f)(values, idx, weights, groups)
  invalid = not ref_valid(values, idx, groups, g).all()
  assert (err.get() is not None) == invalid
  if invalid:
    assert "indices" in err.get() or "groups" in err.get()


@settings(max_examples=10)
@given(st.integers(0, 3), st.integers(0, 3), st.integers(0, 4), st.integers(1, 4),
       float_dtypes, st.one_of(st.none(), st.integers(1, 3)))
def test_empty_inputs_give_zeros(t, n, k, v, dtype, g):
  if t and n and k:
    n = 0                                           # at least one empty dimension
  values = jnp.ones((n, v), dtype)
  idx = jnp.zeros((t, k), jnp.int32)
  w = jnp.ones((t, k), dtype)
  groups = None if g is None else idx
  y, dv, dw = lookup_and_grads(values, idx, w, groups, jnp.ones(
      (t, v) if g is None else (t, g, v), dtype), g)
  assert y.shape == ((t, v) if g is None else (t, g, v)) and y.dtype == dtype
  assert not np.asarray(y).any() and not np.asarray(dw).any() and dv.shape == (n, v)
  assert not np.asarray(dv).any()


@given(st.data())
def test_bad_arguments_raise(data):
  n, v, k = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4)), 3
  values = np.ones((n, v), np.float32)
  idx = np.zeros((2, k), np.int32)
  w = np.ones((2, k), np.float32)
  cases = [
      ("values", (np.ones((n,), np.float32), idx, w), {}),
      ("values", (np.ones((1, n, v), np.float32), idx, w), {}),
      ("values", (values.astype(data.draw(st.sampled_from((np.int32, np.int8)))), idx, w),
       {}),
      ("weights", (values, idx, w.astype(np.int32)), {}),
      ("indices", (values, idx.astype(np.float32), w), {}),
      ("weights", (values, idx, np.ones((2, k + 1), np.float32)), {}),
      ("weights", (values, idx, np.ones((3, k), np.float32)), {}),
      ("num_groups", (values, idx, w), dict(num_groups=2)),
      ("num_groups", (values, idx, w), dict(groups=idx)),
      ("num_groups", (values, idx, w),
       dict(groups=idx, num_groups=data.draw(st.sampled_from((0, -1, 2.0))))),
      ("groups", (values, idx, w), dict(groups=idx[:, :1], num_groups=2)),
      ("groups", (values, idx, w), dict(groups=idx.astype(np.float32), num_groups=2)),
  ]
  name, args, kwargs = data.draw(st.sampled_from(cases))
  with pytest.raises((ValueError, TypeError), match=name):
    memory_lookup(*args, impl="xla", **kwargs)


@pytest.mark.slow
@settings(max_examples=2)
@given(lookup_case(dtypes=st.just(jnp.float32), max_lead=1), st.integers(0, 2**31))
def test_interpret_kernel_matches_xla(case, seed):
  """The Pallas kernel (interpret mode): same output and gradients as XLA, including
  invalid lookups."""
  values, idx, weights, groups, g = case
  d_out = cotangent(case, seed)
  got = lookup_and_grads(values, idx, weights, groups, d_out, g, impl="interpret")
  want = lookup_and_grads(values, idx, weights, groups, d_out, g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(f64(a), f64(b), rtol=1e-5, atol=1e-5)
