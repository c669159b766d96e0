"""The distributed top-k of tensor-sharded SAE latents equals the single-device top-k
(lax.top_k tie rule), gathers no float latents, and serves the SAE's encoder."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax import sharding
from sparsejax.ops.topk import topk_mask as reference_mask
from sparsejax.ops.topk import topk_sparsify
from sparsejax.sae import model as sm
from sparsejax.sae import sharded_topk


def _mesh(**axes):
  return sharding.make_mesh(sharding.MeshConfig(**axes))


def _inputs(rng, rows, n, kind):
  r = np.maximum(rng.normal(size=(rows, n)), 0).astype(np.float32)
  if kind == "ties":
    r = np.round(r * 2) / 2          # many equal values across shards
  elif kind == "sparse":
    r[:, : n - 5] = 0                  # fewer positives than k in most rows
  return r


@pytest.mark.parametrize("kind", ["random", "ties", "sparse"])
@pytest.mark.parametrize("rows,k", [(6, 7), (5, 16), (8, 1)])
def test_matches_single_device_topk(rng_seed, kind, rows, k):
  rng = np.random.default_rng(rng_seed)
  r = _inputs(rng, rows, 64, kind)
  want = np.asarray(reference_mask(jnp.asarray(r), k)) & (r > 0)
  with jax.set_mesh(_mesh(data=2, tensor=4)):
    assert sharded_topk.applies(64, k)
    got = jax.jit(lambda x: sharded_topk.topk_mask(x, k, "xla"))(jnp.asarray(r))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_kernel_in_interpret_mode_per_shard(rng_seed):
  r = _inputs(np.random.default_rng(rng_seed), 4, 256, "random")
  with jax.set_mesh(_mesh(data=2, tensor=4)):
    got = jax.jit(lambda x: sharded_topk.topk_mask(x, 8, "interpret"))(jnp.asarray(r))
  want = np.asarray(reference_mask(jnp.asarray(r), 8)) & (r > 0)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_no_float_all_gather_and_fallback_conditions():
  mesh = _mesh(data=2, tensor=4)
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32, sharding=NamedSharding(
      mesh, P("data", "tensor")))
  float_gather = re.compile(r"f32\[[^\]]*\][^\n]*all-gather")
  with jax.set_mesh(mesh):
    compiled = lambda f: jax.jit(f).lower(x).compile().as_text()
    assert not float_gather.search(compiled(lambda x: sharded_topk.topk_mask(x, 4, "xla")))
    # the per-row-block kernel path gathers the latents: the check can fail
    assert float_gather.search(compiled(lambda x: topk_sparsify(x, 4, impl="interpret")))
    assert sharded_topk.applies(64, 16) and not sharded_topk.applies(64, 17)
    assert not sharded_topk.applies(66, 4)      # 4 does not divide 66
  with jax.set_mesh(_mesh(data=8)):
    assert not sharded_topk.applies(64, 4)      # latents not split
  assert not sharded_topk.applies(64, 4)        # no mesh


def test_encoder_and_gradients_on_mesh_equal_single_device(rng_seed):
  rng = np.random.default_rng(rng_seed)
  d, n = 8, 64
  p = {"W_enc": rng.normal(size=(d, n)) / 3, "b_lat": rng.normal(size=n) * .1,
       "W_dec": rng.normal(size=(n, d)), "b_pre": rng.normal(size=d) * .1}
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p)
  x = jnp.asarray(rng.normal(size=(16, d)), jnp.float32)
  dead = jnp.asarray(rng.random(n) < 0.3)
  cfg = sm.SAEConfig(num_latents=n, k=6, k_aux=10, impl="xla")
  run = jax.jit(jax.value_and_grad(
      lambda q: sm.loss_fn(q, x, dead, cfg, 1.0, 1.0)[0]))
  want_loss, want_g = run(p)
  with jax.set_mesh(_mesh(data=2, tensor=4)):
    got_loss, got_g = jax.jit(jax.value_and_grad(
        lambda q: sm.loss_fn(q, x, dead, cfg, 1.0, 1.0)[0]))(p)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for name in p:
    np.testing.assert_allclose(got_g[name], want_g[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)
