"""memory_lookup's invalid-index rule (XLA and sharded paths), checkify checks, empty
shapes and the "auto" fallback when the kernel cannot take the inputs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from sparsejax.ops import dispatch
from sparsejax.ops.memory import memory_lookup
from sparsejax.ops.memory_sharded import memory_lookup_sharded
from sparsejax.sharding import MeshConfig, make_mesh

N, V, G = 16, 8, 3


def inputs(seed, lead=(6,), k=5):
  """Fresh values/weights/cotangent and indices/groups with ~1/3 invalid entries
  (negative, N, far past N; groups -1 and G)."""
  rng = np.random.default_rng(seed)
  values = rng.standard_normal((N, V)).astype(np.float32)
  weights = rng.standard_normal((*lead, k)).astype(np.float32)
  idx = rng.integers(0, N, (*lead, k))
  idx = np.where(rng.random(idx.shape) < 0.3, rng.choice([-1, -N, N, N + 5], idx.shape),
                 idx)
  groups = rng.integers(0, G, (*lead, k))
  groups = np.where(rng.random(idx.shape) < 0.1, rng.choice([-1, G], idx.shape), groups)
  cot = rng.standard_normal((*lead, G, V)).astype(np.float32)
  return values, idx.astype(np.int32), weights, groups.astype(np.int32), cot


def numpy_reference(values, idx, weights, groups, cot):
  """float64 loops over the valid lookups only: (out, dV, dw)."""
  lead, k = idx.shape[:-1], idx.shape[-1]
  idx, weights, groups = idx.reshape(-1, k), weights.reshape(-1, k), groups.reshape(-1, k)
  cot = cot.reshape(-1, G, V).astype(np.float64)
  out, dv, dw = np.zeros((len(idx), G, V)), np.zeros((N, V)), np.zeros(idx.shape)
  for l, j in np.ndindex(*idx.shape):
    r, g = idx[l, j], groups[l, j]
    if 0 <= r < N and 0 <= g < G:
      out[l, g] += weights[l, j] * values[r]
      dv[r] += weights[l, j] * cot[l, g]
      dw[l, j] = cot[l, g] @ values[r]
  return out.reshape(*lead, G, V), dv, dw.reshape(*lead, k)


def run(fn, values, idx, weights, groups, cot):
  def loss(values, weights):
    return jnp.sum(fn(values, idx, weights, groups=groups, num_groups=G) * cot)
  out = fn(values, idx, weights, groups=groups, num_groups=G)
  return (out,) + jax.grad(loss, (0, 1))(values, weights)


def assert_matches(got, want):
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_xla_invalid_lookups_contribute_exactly_zero(rng_seed):
  values, idx, weights, groups, cot = inputs(rng_seed)
  got = jax.jit(lambda *a: run(lambda *b, **k: memory_lookup(*b, impl="xla", **k),
                               *a))(values, idx, weights, groups, cot)
  want = numpy_reference(values, idx, weights, groups, cot)
  assert_matches(got, want)
  invalid = (idx < 0) | (idx >= N) | (groups < 0) | (groups >= G)
  assert invalid.any() and np.all(np.asarray(got[2])[invalid] == 0)
  # Not clamped: rows 0 and N-1 get only their own lookups' gradient.
  np.testing.assert_allclose(np.asarray(got[1])[[0, N - 1]], want[1][[0, N - 1]],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["rows", "columns", "none"])
def test_sharded_invalid_lookups_contribute_exactly_zero(rng_seed, mode):
  """Rows mode: an invalid index is in no shard's rows; columns / none: the per-shard
  lookup's rule."""
  values, idx, weights, groups, cot = inputs(rng_seed, lead=(8,))
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  fn = lambda *a, **k: memory_lookup_sharded(*a, mode=mode, impl="xla", **k)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: run(fn, *a))(values, idx, weights, groups, cot)
  assert_matches(got, numpy_reference(values, idx, weights, groups, cot))


@pytest.mark.parametrize("sharded", [False, True])
def test_check_indices_reports_under_checkify(rng_seed, sharded):
  values, idx, weights, groups, _ = inputs(rng_seed)
  op = memory_lookup_sharded if sharded else memory_lookup
  name = "memory_lookup_sharded" if sharded else "memory_lookup"

  def f(idx, groups):
    return op(values, idx, weights, groups=groups, num_groups=G, check_indices=True)

  checked = jax.jit(checkify.checkify(f))
  err, _ = checked(idx, groups)
  with pytest.raises(checkify.JaxRuntimeError,
                     match=rf"{name}: indices must be in \[0, {N}\)"):
    err.throw()
  ok_idx = np.clip(idx, 0, N - 1)
  err, _ = checked(ok_idx, groups)
  with pytest.raises(checkify.JaxRuntimeError, match=rf"groups must be in \[0, {G}\)"):
    err.throw()
  err, out = checked(ok_idx, np.clip(groups, 0, G - 1))
  assert err.get() is None and out.shape == (6, G, V)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
@pytest.mark.parametrize("idx_shape,grouped", [((0, 4), True), ((3, 0), True),
                                               ((2, 0, 4), False)],
                         ids=["no_tokens", "k0", "empty_batch"])
def test_empty_shapes_give_zeros_and_zero_grads(impl, idx_shape, grouped):
  values = jnp.full((N, V), 2.0)
  idx, weights = jnp.zeros(idx_shape, jnp.int32), jnp.ones(idx_shape)
  kw = dict(groups=jnp.zeros(idx_shape, jnp.int32), num_groups=G) if grouped else {}
  want_shape = idx_shape[:-1] + ((G,) if grouped else ()) + (V,)
  f = lambda v, w: memory_lookup(v, idx, w, impl=impl, **kw)
  out = jax.jit(f)(values, weights)
  assert out.shape == want_shape and not np.any(out)
  d_values, d_weights = jax.grad(lambda v, w: jnp.sum(f(v, w)), (0, 1))(values, weights)
  assert d_values.shape == (N, V) and not np.any(d_values)
  assert d_weights.shape == idx_shape


def test_auto_falls_back_when_the_kernel_cannot_take_the_inputs(monkeypatch):
  """On a TPU target, float16 values (and odd bf16 tables) make "auto" use XLA with one
  warning; an explicit kernel impl raises, naming the op and the reason."""
  monkeypatch.setattr(dispatch, "_warned", set())
  rng = np.random.default_rng(0)
  idx = jnp.asarray(rng.integers(0, 15, (4, 3)), jnp.int32)
  weights = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((15, V)), jnp.float16)
  want = memory_lookup(values, idx, weights, impl="xla")
  with dispatch.target_platform("tpu"):
    with pytest.warns(UserWarning, match="memory_lookup: the Pallas kernel does not "
                      "apply.*float16"):
      got = memory_lookup(values, idx, weights, impl="auto")
    with warnings.catch_warnings():
      warnings.simplefilter("error")           # one warning per op and reason
      memory_lookup(values, idx, weights, impl="auto")
    with pytest.raises(ValueError, match="memory_lookup: impl='interpret'.*float16"):
      memory_lookup(values, idx, weights, impl="interpret")
    with pytest.raises(ValueError, match="odd number of rows N=15"):
      memory_lookup(values.astype(jnp.bfloat16), idx, weights, impl="pallas")
  np.testing.assert_array_equal(got, want)
