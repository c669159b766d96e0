"""Expert parallelism (shard_map + all_to_all over mesh axis "expert"): equals the
unsharded capacity dispatch applied per device token block (forward, dropped fraction
and gradients), equals dropless when nothing is dropped, really shards the experts, and
the "moe" layer's `expert_parallel` option gives the same loss and grads in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import tiny_config_dict
from sparsejax.layers.moe import expert_parallel_mesh
from sparsejax.ops import moe as moe_ops
from sparsejax.ops import moe_ep
from sparsejax.ops.moe_ep import moe_ffn_expert_parallel
from sparsejax.sharding import MeshConfig, logical_to_spec, make_mesh
from sparsejax.train.config import parse_config
from sparsejax.train.trainer import Trainer
from sparsejax.validation import ConfigError

T, D, F, E, K = 32, 8, 6, 8, 2
N_BLOCKS = 8  # token blocks = all 8 devices (batch axes data × fsdp × expert)


def inputs(seed, gated=True):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  weights, experts, _ = moe_ops.route(
      jnp.asarray(rng.standard_normal((T, E)), jnp.float32), K)
  w = [jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)
       for s in ((E, D, F), (E, D, F), (E, F, D))]
  return x, weights, experts, (w if gated else [None, *w[1:]])


def per_block_capacity(x, weights, experts, w_gate, w_up, w_down, cf):
  """Unsharded `moe_ffn(dispatch="capacity")` applied to each device's token block."""
  b = T // N_BLOCKS
  ys, drops = [], []
  for i in range(N_BLOCKS):
    s = slice(i * b, (i + 1) * b)
    y, d = moe_ops.moe_ffn(x[s], weights[s], experts[s], w_gate, w_up, w_down,
                           dispatch="capacity", capacity_factor=cf)
    ys.append(y)
    drops.append(d)
  return jnp.concatenate(ys), jnp.mean(jnp.stack(drops))


def place_experts(w, names, mesh):
  return None if w is None else jax.device_put(
      w, NamedSharding(mesh, logical_to_spec(names, w.shape, mesh)))


MESHES = [dict(data=2, expert=4), dict(data=1, fsdp=2, expert=4)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["data2_expert4", "fsdp2_expert4"])
@pytest.mark.parametrize("cf, gated", [(0.5, True), (4.0, False)],
                         ids=["drops_gated", "nodrop_plain"])
def test_ep_equals_per_device_capacity_and_grads(rng_seed, mesh_cfg, cf, gated):
  mesh = make_mesh(MeshConfig(**mesh_cfg))
  x, weights, experts, (wg, wu, wd) = inputs(rng_seed, gated)
  names = {"w_gate": ("expert", "embed", "mlp"), "w_up": ("expert", "embed", "mlp"),
           "w_down": ("expert", "mlp", "embed")}
  swg, swu, swd = (place_experts(w, names[n], mesh)
                   for w, n in ((wg, "w_gate"), (wu, "w_up"), (wd, "w_down")))
  # The experts really live sharded over "expert" (and embed over fsdp when present).
  fsdp = mesh.shape["fsdp"]
  assert swu.sharding.spec == (P("expert", "fsdp", None) if fsdp > 1
                               else P("expert", None, None))
  assert {s.data.shape for s in swu.addressable_shards} == {(E // 4, D // fsdp, F)}
  assert {s.data.shape for s in swd.addressable_shards} == {(E // 4, F, D // fsdp)}

  def ep(x, wg, wu, wd):
    return moe_ffn_expert_parallel(x, weights, experts, wg, wu, wd, mesh=mesh,
                                   activation="silu", capacity_factor=cf)

  def ref(x, wg, wu, wd):
    return per_block_capacity(x, weights, experts, wg, wu, wd, cf)

  def loss(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a)[0]) * jnp.arange(1.0, D + 1))

  argnums = (0, 1, 2, 3) if gated else (0, 2, 3)
  ep_jit = jax.jit(ep)
  y, dropped = ep_jit(x, swg, swu, swd)
  y_ref, dropped_ref = ref(x, wg, wu, wd)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dropped, dropped_ref, rtol=1e-6)
  assert (float(dropped) > 0) == (cf < 1)
  grads = jax.jit(jax.grad(loss(ep), argnums))(x, swg, swu, swd)
  grads_ref = jax.grad(loss(ref), argnums)(x, wg, wu, wd)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  if cf >= 4:  # nothing dropped: also equals the dropless dispatch
    y_dl, _ = moe_ops.moe_ffn(x, weights, experts, wg, wu, wd, dispatch="dropless")
    np.testing.assert_allclose(y, y_dl, rtol=1e-5, atol=1e-6)
    grads_dl = jax.grad(loss(lambda *a: moe_ops.moe_ffn(
        a[0], weights, experts, *a[1:], dispatch="dropless")), argnums)(x, wg, wu, wd)
    for g, g_dl in zip(grads, grads_dl):
      np.testing.assert_allclose(g, g_dl, rtol=1e-4, atol=1e-5)
  hlo = ep_jit.lower(x, swg, swu, swd).compile().as_text()
  assert "all-to-all" in hlo


@pytest.mark.slow
def test_ep_invalid_expert_ids_contribute_exactly_zero(rng_seed):
  """Ids -1 and E (out of [0, E)): the sharded result and grads equal the dropless
  dispatch with those pairs' weights set to 0 (capacity 4: nothing dropped); the
  invalid pairs' weights get zero gradient; check_indices reports them."""
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  x, weights, experts, (wg, wu, wd) = inputs(rng_seed)
  bad = np.random.default_rng(rng_seed).random(experts.shape) < 0.3
  bad[0, 0] = True
  ids = jnp.where(bad, jnp.where(jnp.arange(T)[:, None] % 2 == 0, -1, E), experts)
  cot = jnp.asarray(np.random.default_rng(rng_seed + 1).standard_normal((T, D)),
                    jnp.float32)

  def ep(x, w, wg, wu, wd):
    return jnp.sum(cot * moe_ffn_expert_parallel(x, w, ids, wg, wu, wd, mesh=mesh,
                                                 capacity_factor=4.0)[0])

  def ref(x, w, wg, wu, wd):
    return jnp.sum(cot * moe_ops.moe_ffn(x, jnp.where(bad, 0.0, w),
                                         jnp.where(bad, 0, ids), wg, wu, wd,
                                         dispatch="dropless")[0])

  args = (x, weights, wg, wu, wd)
  (l_ep, g_ep), (l_ref, g_ref) = (jax.jit(jax.value_and_grad(f, range(5)))(*args)
                                  for f in (ep, ref))
  np.testing.assert_allclose(l_ep, l_ref, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(g_ep[1])[bad], 0.0)
  for i, (g, g0) in enumerate(zip(g_ep, g_ref)):
    g, g0 = (np.asarray(g)[~bad], np.asarray(g0)[~bad]) if i == 1 else (g, g0)
    np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5)
  _, dropped = moe_ffn_expert_parallel(x, weights, ids, wg, wu, wd, mesh=mesh,
                                       capacity_factor=4.0)
  assert float(dropped) == 0.0
  check = checkify.checkify(jax.jit(lambda e: moe_ffn_expert_parallel(
      x, weights, e, wg, wu, wd, mesh=mesh, check_indices=True)[0]))
  assert check(experts)[0].get() is None
  assert f"experts must be expert ids in [0, {E}), got -1" in check(ids)[0].get()


def test_ep_with_no_tokens_gives_empty_output():
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  _, _, _, (wg, wu, wd) = inputs(0)
  x, w, e = jnp.zeros((0, D)), jnp.zeros((0, K)), jnp.zeros((0, K), jnp.int32)
  y, dropped = moe_ffn_expert_parallel(x, w, e, wg, wu, wd, mesh=mesh)
  assert y.shape == (0, D) and float(dropped) == 0.0
  g = jax.grad(lambda wu: jnp.sum(moe_ffn_expert_parallel(x, w, e, wg, wu, wd,
                                                          mesh=mesh)[0]))(wu)
  np.testing.assert_array_equal(g, np.zeros(wu.shape))


def test_ep_validates_divisibility():
  mesh = make_mesh(MeshConfig(data=2, expert=4))
  x, weights, experts, (wg, wu, wd) = inputs(0)
  with pytest.raises(ValueError, match="divisible"):
    moe_ffn_expert_parallel(x[:12], weights[:12], experts[:12], wg, wu, wd, mesh=mesh)
  with pytest.raises(ValueError, match="divisible"):
    moe_ffn_expert_parallel(x, weights, experts % 6, wg[:6], wu[:6], wd[:6], mesh=mesh)
  with pytest.raises(ValueError, match="needs a mesh"):
    moe_ffn_expert_parallel(x, weights, experts, wg, wu, wd)


def test_expert_parallel_option_requires_capacity_dispatch():
  with pytest.raises(ConfigError, match=r"config\.model\.ffn_options\.expert_parallel"):
    parse_config(tiny_config_dict(model=dict(
        ffn="moe", ffn_options=dict(expert_parallel=True, dispatch="dropless"))))


def test_expert_parallel_mesh_needs_an_expert_axis_above_one():
  assert expert_parallel_mesh() is None                       # no mesh set
  with jax.set_mesh(make_mesh(MeshConfig(data=-1))):
    assert expert_parallel_mesh() is None                     # expert = 1: local
  with jax.set_mesh(make_mesh(MeshConfig(data=-1, expert=4))):
    assert expert_parallel_mesh().shape["expert"] == 4
    assert expert_parallel_mesh(num_tokens=16, num_experts=8).shape["expert"] == 4
    assert expert_parallel_mesh(num_tokens=1) is None         # e.g. decoding one token
    assert expert_parallel_mesh(num_experts=6) is None


@pytest.mark.slow
def test_layer_expert_parallel_loss_and_grads_equal_local(monkeypatch):
  """Trainer.loss with expert_parallel on mesh (data=2, expert=4) equals the local
  capacity dispatch on the same params (capacity_factor 4: nothing dropped either
  way)."""
  calls = []
  original = moe_ep.moe_ffn_expert_parallel

  def counting(*args, **kwargs):
    calls.append(kwargs["mesh"].shape["expert"])
    return original(*args, **kwargs)

  monkeypatch.setattr(moe_ep, "moe_ffn_expert_parallel", counting)

  def trainer(expert_parallel):
    options = dict(num_experts=4, top_k=2, dispatch="capacity", capacity_factor=4.0,
                   expert_parallel=expert_parallel)
    config = parse_config(tiny_config_dict(
        model=dict(num_layers=1, ffn="moe", ffn_options=options),
        data=dict(seq_len=8, batch_size=8), mesh=dict(data=-1, expert=4)))
    return Trainer(config)

  ep, local = trainer(True), trainer(False)
  state = local.init_state()
  rng = np.random.default_rng(0)
  vocab = local.config.model.vocab_size
  tokens = rng.integers(0, vocab, (8, 9)).astype(np.int32)
  batch = local.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  results = {}
  for name, tr in (("ep", ep), ("local", local)):
    calls.clear()
    with tr.activate():
      args = (state.params, state.model_state, batch)
      fn = jax.jit(jax.value_and_grad(tr.loss, has_aux=True)).lower(*args).compile()
      (loss, (ce, aux, _, metrics)), grads = fn(*args)
    results[name] = (loss, ce, aux, grads, metrics)
    assert bool(calls) == (name == "ep") and set(calls) <= {4}
    if name == "ep":  # (XLA may also pick all-to-alls for the local resharding)
      assert "all-to-all" in fn.as_text()
  (l_ep, ce_ep, aux_ep, g_ep, m_ep), (l_lo, ce_lo, aux_lo, g_lo, m_lo) = (
      results["ep"], results["local"])
  np.testing.assert_allclose(l_ep, l_lo, rtol=1e-5)
  np.testing.assert_allclose(ce_ep, ce_lo, rtol=1e-5)
  np.testing.assert_allclose(aux_ep, aux_lo, rtol=1e-5)
  assert float(m_ep["block_0/ffn/dropped_fraction"]) == 0.0
  np.testing.assert_allclose(m_ep["block_0/ffn/load_max_over_mean"],
                             m_lo["block_0/ffn/load_max_over_mean"], rtol=1e-6)
  flat_ep = jax.tree_util.tree_leaves_with_path(g_ep)
  flat_lo = dict(jax.tree_util.tree_leaves_with_path(g_lo))
  assert len(flat_ep) == len(flat_lo)
  for path, g in flat_ep:
    np.testing.assert_allclose(g, flat_lo[path], rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  ffn_grads = g_ep["block_0"]["ffn"]
  assert float(jnp.abs(ffn_grads["w_up"]).max()) > 0
