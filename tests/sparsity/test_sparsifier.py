"""Sparsifier.wrap_optax: every algorithm against a NumPy re-derivation of its update
(SGD inner optimizer, so w' = w − η·g is known exactly), on fresh random tensors."""

from __future__ import annotations

import dataclasses
import math
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from sparsejax.models.accounting import abstract_params
from sparsejax.sparsity import cosine_drop_fraction, erk_densities, polynomial_sparsity
from sparsejax.sparsity.config import SparsityConfig
from sparsejax.sparsity.param_filter import named_leaves
from sparsejax.sparsity.sparsifier import Sparsifier, SparsifierState, apply_masks
from sparsejax.train.config import parse_config
from sparsejax.validation import ConfigError

LR = 0.1
SHAPES = {"dense_0/kernel": (16, 12), "dense_1/kernel": (12, 8)}


def _params(seed, ties=False):
  rng = np.random.default_rng(seed)
  draw = (lambda s: rng.integers(-3, 4, s).astype(np.float32)) if ties else \
      (lambda s: rng.normal(size=s).astype(np.float32))
  return {"dense_0": {"kernel": jnp.asarray(draw((16, 12))), "bias": jnp.ones(12)},
          "dense_1": {"kernel": jnp.asarray(draw((12, 8)))},
          "embedding": jnp.asarray(draw((10, 16)))}


def _grads(seed, params):
  rng = np.random.default_rng(seed + 1000)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _kernels(tree):
  return {"dense_0/kernel": np.asarray(tree["dense_0"]["kernel"]),
          "dense_1/kernel": np.asarray(tree["dense_1"]["kernel"])}


def np_topk(scores, k):
  """bool mask of the k largest (ties: lower flat index), by a stable sort."""
  flat = np.asarray(scores, np.float64).ravel()
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:k]] = True
  return keep.reshape(np.shape(scores))


def _run(sp, params, steps, seed, inner=None):
  """Runs `steps` updates with fresh random grads; yields (params before, grads,
  params after, state after) per step."""
  tx = sp.wrap_optax(inner or optax.sgd(LR))
  state = tx.init(params)
  params = apply_masks(params, sp.masks(state))
  update = jax.jit(tx.update)
  out = []
  for t in range(steps):
    grads = _grads(seed + t, params)
    updates, state = update(grads, state, params)
    new = optax.apply_updates(params, updates)
    out.append((params, grads, new, state))
    params = new
  return out


def _sp(num_steps=10, **fields):
  return Sparsifier(SparsityConfig(**fields), num_steps=num_steps, learning_rate=LR)


@pytest.mark.parametrize("ties", [False, True])
def test_one_shot_magnitude_matches_numpy(rng_seed, ties):
  sp = _sp(algorithm="magnitude", sparsity=0.7, begin_step=1)
  history = _run(sp, _params(rng_seed, ties), 3, rng_seed)
  # step 0: nothing pruned, plain SGD
  p0, g0, p1, s1 = history[0]
  assert all(np.all(m) for m in jax.device_get(sp.masks(s1)).values())
  np.testing.assert_array_equal(p1["embedding"], p0["embedding"] - LR * g0["embedding"])
  # step 1: prune to round(0.3·n) largest |w − ηg|; pruned entries exactly 0
  p1, g1, p2, s2 = history[1]
  w1, gk = _kernels(p1), _kernels(g1)
  for name, w in w1.items():
    dense = (w - np.float32(LR) * gk[name]).astype(np.float32)
    want = np_topk(np.abs(dense), round(0.3 * w.size))
    mask = np.asarray(sp.masks(s2)[name])
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(_kernels(p2)[name], np.where(want, dense, 0))
  # step 2: no update; the pruned entries stay exactly 0 whatever the gradient
  _, _, p3, s3 = history[2]
  for name, m in sp.masks(s3).items():
    np.testing.assert_array_equal(np.asarray(m), np.asarray(sp.masks(s2)[name]))
    assert np.all(_kernels(p3)[name][~np.asarray(m)] == 0)
  assert "bias" in p3["dense_0"] and np.all(np.asarray(p3["dense_0"]["bias"]) != 0)


def test_gradual_magnitude_follows_the_polynomial_schedule(rng_seed):
  sp = _sp(algorithm="magnitude", sparsity=0.8, schedule="polynomial", begin_step=1,
           end_step=7, update_every=2, num_steps=9)
  history = _run(sp, _params(rng_seed), 9, rng_seed)
  previous = None
  for t, (_, _, _, state) in enumerate(history):
    s_t = polynomial_sparsity(t, final=0.8, begin=1, end=7, every=2)
    masks = jax.device_get(sp.masks(state))
    for name, m in masks.items():
      want = m.size if t < 1 else round((1 - s_t) * m.size)
      if t >= 1 and (t - 1) % 2 and t != 7:   # between updates: the last count
        want = round((1 - polynomial_sparsity(t - 1, final=0.8, begin=1, end=7,
                                              every=2)) * m.size)
      assert m.sum() == want, (t, name)
      if previous is not None:
        assert not np.any(m & ~previous[name]), "a pruned weight came back"
    previous = masks
  assert all(m.mean() == pytest.approx(0.2, abs=0.01) for m in previous.values())


@pytest.mark.slow   # several compiles (~10 s on a 2-core CPU)
def test_random_and_snip_scores(rng_seed):
  params = _params(rng_seed)
  (p0, g0, _, s_snip), = _run(_sp(algorithm="snip", sparsity=0.5), params, 1, rng_seed)
  for name, w in _kernels(p0).items():
    dense = w - np.float32(LR) * _kernels(g0)[name]
    want = np_topk(np.abs(dense * _kernels(g0)[name]), round(0.5 * w.size))
    np.testing.assert_array_equal(np.asarray(sp_masks(s_snip)[name]), want)
  masks = [sp_masks(_run(_sp(algorithm="random", sparsity=0.5, seed=s), params, 1,
                         rng_seed)[0][3]) for s in (0, 0, 1)]
  for name in SHAPES:
    assert masks[0][name].sum() == round(0.5 * masks[0][name].size)
    np.testing.assert_array_equal(masks[0][name], masks[1][name])
  assert any(np.any(masks[0][n] != masks[2][n]) for n in SHAPES)


def sp_masks(state):
  return {k: np.asarray(v) for k, v in state.masks.items()}


@pytest.mark.parametrize("ties", [False, True])
def test_global_magnitude_is_one_threshold(rng_seed, ties):
  sp = _sp(algorithm="global_magnitude", sparsity=0.75)
  (p0, g0, p1, s1), = _run(sp, _params(rng_seed, ties), 1, rng_seed)
  dense = {n: w - np.float32(LR) * _kernels(g0)[n] for n, w in _kernels(p0).items()}
  names = list(SHAPES)   # tree order
  flat = np.concatenate([np.abs(dense[n]).ravel() for n in names])
  keep = np_topk(flat, round(0.25 * flat.size))
  start = 0
  for n in names:
    size = dense[n].size
    np.testing.assert_array_equal(sp_masks(s1)[n], keep[start:start + size]
                                  .reshape(dense[n].shape))
    start += size
  kept = np.concatenate([dense[n][sp_masks(s1)[n]] for n in names])
  dropped = np.concatenate([dense[n][~sp_masks(s1)[n]] for n in names])
  assert np.abs(kept).min() >= np.abs(dropped).max()


def test_ste_keeps_dense_weights_and_masks_the_forward(rng_seed):
  sp = _sp(algorithm="ste", sparsity=0.6)
  init = sp_masks(sp.wrap_optax(optax.sgd(LR)).init(_params(rng_seed)))
  for name, w in _kernels(_params(rng_seed)).items():   # the first forward is masked
    np.testing.assert_array_equal(init[name], np_topk(np.abs(w), round(0.4 * w.size)))
  history = _run(sp, _params(rng_seed), 3, rng_seed)
  for p, g, new, state in history:
    for name, w in _kernels(new).items():   # dense weights: plain SGD
      np.testing.assert_allclose(w, _kernels(p)[name] - LR * _kernels(g)[name], rtol=1e-6)
      np.testing.assert_array_equal(sp_masks(state)[name],
                                    np_topk(np.abs(w), round(0.4 * w.size)))
  params, state = history[-1][2], history[-1][3]
  x = jnp.asarray(np.random.default_rng(rng_seed).normal(size=(3, 16)), jnp.float32)

  def loss(kernels):
    return jnp.sum(jnp.tanh(x @ kernels["dense_0"]["kernel"]) @ kernels["dense_1"]["kernel"])
  masked = sp.pre_forward(params, state)
  for name, w in _kernels(masked).items():
    np.testing.assert_array_equal(w, np.where(sp_masks(state)[name], _kernels(params)[name], 0))
  # straight-through: the gradient w.r.t. the dense weights is the masked model's
  ste = jax.grad(lambda p: loss(sp.pre_forward(p, state)))(params)
  want = jax.grad(loss)(masked)
  for name in SHAPES:
    np.testing.assert_allclose(_kernels(ste)[name], _kernels(want)[name], rtol=1e-6)
    pruned = ~sp_masks(state)[name]   # dense gradient: pruned weights get one too
    assert np.mean(_kernels(ste)[name][pruned] != 0) > 0.5


@pytest.mark.slow   # several compiles (~10 s on a 2-core CPU)
def test_static_mask_never_changes(rng_seed):
  sp = _sp(algorithm="static", sparsity=0.9, distribution="erk")
  history = _run(sp, _params(rng_seed), 3, rng_seed)
  erk = erk_densities(SHAPES, 0.9)
  first = sp_masks(history[0][3])
  for _, _, new, state in history:
    for name, m in sp_masks(state).items():
      np.testing.assert_array_equal(m, first[name])
      assert m.sum() == round(erk[name] * m.size)
      assert np.all(_kernels(new)[name][~m] == 0)
      assert np.all(_kernels(new)[name][m] != 0)


def _np_drop_grow(w, mask, grow_score, fraction):
  """The RigL / SET reference update (as tests/sparsity/test_dst.py)."""
  active = int(mask.sum())
  k = int(np.floor(np.float32(active) * np.float32(fraction)))
  kept = np_topk(np.where(mask, np.abs(w), -1.0), active - k)
  return kept | np_topk(np.where(kept, -1.0, grow_score), k)


def test_rigl_update_step_drops_grows_and_resets_adam_moments(rng_seed):
  sp = _sp(algorithm="rigl", sparsity=0.8, update_every=2, num_steps=8)   # T_end = 6
  tx = sp.wrap_optax(optax.adam(LR))
  params = _params(rng_seed)
  state = tx.init(params)
  params = apply_masks(params, sp.masks(state))
  update = jax.jit(tx.update)
  for t in range(3):
    grads = _grads(rng_seed + t, params)
    updates, new_state = update(grads, state, params)
    new = optax.apply_updates(params, updates)
    old_m, new_m = sp_masks(state), sp_masks(new_state)
    adam = new_state.inner_state[0]
    for name in SHAPES:
      layer = name.split("/")[0]
      assert np.all(_kernels(new)[name][~new_m[name]] == 0)
      assert new_m[name].sum() == old_m[name].sum() == round(0.2 * new_m[name].size)
      if t < 2:   # step 0 (never) and step 1 (not a multiple of 2) keep the mask
        np.testing.assert_array_equal(new_m[name], old_m[name])
        continue
      fraction = cosine_drop_fraction(2, end=6, initial=0.3)
      want = _np_drop_grow(_weights_after_inner(sp, state, params, grads, name),
                           old_m[name], np.abs(_kernels(grads)[name]), fraction)
      np.testing.assert_array_equal(new_m[name], want)
      grown = new_m[name] & ~old_m[name]
      assert grown.sum() > 0
      assert np.all(_kernels(new)[name][grown] == 0)        # grown weights start at 0
      assert np.all(np.asarray(adam.mu[layer]["kernel"])[grown] == 0)
      assert np.all(np.asarray(adam.nu[layer]["kernel"])[grown] == 0)
      assert np.any(np.asarray(adam.nu[layer]["kernel"])[new_m[name] & old_m[name]] != 0)
    flips = sum(int((new_m[n] != old_m[n]).sum()) for n in SHAPES)
    assert int(new_state.changes) == (flips if t == 2 else 0)
    params, state = new, new_state
  assert int(state.changes) > 0


def _weights_after_inner(sp, state, params, grads, name):
  """w + u of the inner Adam step on the masked gradients (what RigL drops from)."""
  masked = apply_masks(grads, sp.masks(state))
  u, _ = optax.adam(LR).update(masked, state.inner_state, params)
  return _kernels(params)[name] + _kernels(u)[name]


@pytest.mark.slow   # several compiles (~10 s on a 2-core CPU)
def test_set_keeps_counts_and_grows_at_zero(rng_seed):
  sp = _sp(algorithm="set", sparsity=0.7, update_every=1, drop_fraction=0.3)
  history = _run(sp, _params(rng_seed), 3, rng_seed)
  counts = None
  for p, _, new, state in history[1:]:
    masks = sp_masks(state)
    counts = counts or {n: m.sum() for n, m in masks.items()}
    for n, m in masks.items():
      assert m.sum() == counts[n] == round(0.3 * m.size)
      assert np.all(_kernels(new)[n][~m] == 0)
  assert int(history[-1][3].changes) > 0


def test_l1_proximal_step_gives_exact_zeros(rng_seed):
  sp = _sp(algorithm="l1", l1_strength=2.0)
  (p0, g0, p1, s1), = _run(sp, _params(rng_seed), 1, rng_seed)
  for name, w in _kernels(p0).items():
    z = w - np.float32(LR) * _kernels(g0)[name]
    want = np.sign(z) * np.maximum(np.abs(z) - np.float32(LR * 2.0), 0)
    np.testing.assert_allclose(_kernels(p1)[name], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(sp_masks(s1)[name], want != 0)
    assert np.all(_kernels(p1)[name][want == 0] == 0) and 0 < (want == 0).mean() < 1
  np.testing.assert_allclose(p1["embedding"], p0["embedding"] - LR * g0["embedding"])


# Every algorithm but STE: masks that change at steps 1 and 3 (gradual pruning from
# step 0 to 4, SET/RigL every 2 steps, L1 every step; static never).
NON_STE = {"magnitude": dict(begin_step=0, end_step=4, update_every=1),
           "global_magnitude": dict(begin_step=0, end_step=4, update_every=1),
           "random": dict(begin_step=0, end_step=4, update_every=1),
           "snip": dict(begin_step=0, end_step=4, update_every=1),
           "static": {}, "set": dict(update_every=2), "rigl": dict(update_every=2),
           "l1": dict(l1_strength=0.5)}
FAST_NON_STE = ("rigl", "magnitude", "l1")


@pytest.mark.parametrize("algorithm", [
    pytest.param(a, marks=() if a in FAST_NON_STE else pytest.mark.slow) for a in NON_STE])
def test_non_ste_params_are_exact_zeros_at_pruned_entries_so_forward_is_unmasked(
    algorithm, rng_seed):
  """After every step (mask updates included) each pruned entry is exactly 0, even
  under an inner optimizer whose updates are nonzero at zero gradients (AdamW + noise),
  so the forward runs on the params themselves: pre_forward adds no operation."""
  sp = _sp(algorithm=algorithm, sparsity=0.6, **NON_STE[algorithm])
  inner = optax.chain(optax.adamw(LR, weight_decay=0.5), optax.add_noise(0.1, 0.0, 0))
  history = _run(sp, _params(rng_seed), 5, rng_seed, inner=inner)
  changed = 0
  for _, _, new, state in history:
    assert sp.pre_forward(new, state) is new
    assert not jax.make_jaxpr(sp.pre_forward)(new, state).eqns
    changed += int(state.changes)
    for name, m in sp_masks(state).items():
      w = _kernels(new)[name]
      assert np.all(w[~m] == 0), f"{algorithm}: {name} nonzero at a pruned entry"
      assert np.mean(w[m] != 0) > 0.5   # (weights grown at this step are still 0)
  assert all(0 < m.mean() < 1 for m in sp_masks(history[-1][3]).values())
  assert algorithm == "static" or changed > 0   # the masks did change


@pytest.mark.parametrize("kind,fields", [
    ("nm", dict(n=2, m=4, sparsity=0.5)),
    ("block", dict(block=(4, 4), sparsity=0.5)),
    ("channel", dict(channel_axis=-1, sparsity=0.5))])
def test_structured_granularities(rng_seed, kind, fields):
  sp = _sp(algorithm="magnitude", granularity=kind, **fields)
  (p0, g0, _, s1), = _run(sp, _params(rng_seed), 1, rng_seed)
  for name, m in sp_masks(s1).items():
    dense = np.abs(_kernels(p0)[name] - np.float32(LR) * _kernels(g0)[name])
    rows, cols = m.shape
    if kind == "nm":
      groups = m.reshape(rows // 4, 4, cols)
      assert np.all(groups.sum(axis=1) == 2)
      score = dense.reshape(rows // 4, 4, cols)
      for i in range(rows // 4):
        for j in range(cols):
          np.testing.assert_array_equal(groups[i, :, j], np_topk(score[i, :, j], 2))
    elif kind == "block":
      tiles = dense.reshape(rows // 4, 4, cols // 4, 4).mean(axis=(1, 3))
      want = np_topk(tiles, round(0.5 * tiles.size))
      np.testing.assert_array_equal(m, np.kron(want, np.ones((4, 4), bool)))
    else:
      want = np_topk(dense.mean(axis=0), round(0.5 * cols))
      np.testing.assert_array_equal(m, np.broadcast_to(want, m.shape))


def test_state_structure_and_helpers(rng_seed):
  sp = _sp(algorithm="magnitude", sparsity=0.5, exclude=[r"dense_1"])
  tx = sp.wrap_optax(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)))
  state = tx.init(_params(rng_seed))
  assert isinstance(state, SparsifierState) and int(state.step) == 0
  assert list(sp.masks(state)) == ["dense_0/kernel"]
  assert sp.masks((state,)) is sp.masks(state)     # found nested in a chain
  with pytest.raises(ValueError, match="needs params"):
    tx.update(_grads(0, _params(rng_seed)), state)
  ticket = {"dense_0/kernel": np.arange(16 * 12).reshape(16, 12) % 3 == 0}
  (replaced,) = sp.with_masks((state,), ticket)
  np.testing.assert_array_equal(np.asarray(sp.masks(replaced)["dense_0/kernel"]),
                                ticket["dense_0/kernel"])
  assert replaced.inner_state is state.inner_state
  with pytest.raises(ValueError, match="names and shapes"):
    sp.with_masks(state, {"dense_1/kernel": np.ones((12, 8), bool)})


@pytest.mark.parametrize("fields,field", [
    (dict(algorithm="prune"), "config.sparsity.algorithm"),
    (dict(algorithm="rigl", sparsity=0.5, distribution="er"),
     "config.sparsity.distribution"),
    (dict(algorithm="rigl", sparsity=1.0), "config.sparsity.sparsity"),
    (dict(algorithm="rigl", sparsity=-0.1), "config.sparsity.sparsity"),
    (dict(algorithm="magnitude", granularity="nm", n=5, m=4, sparsity=0.5),
     "config.sparsity.n"),
    (dict(algorithm="rigl", granularity="block", sparsity=0.5),
     "config.sparsity.granularity"),
    (dict(algorithm="magnitude", granularity="nm", n=2, m=4, sparsity=0.9),
     "config.sparsity.sparsity"),
    (dict(algorithm="global_magnitude", sparsity=0.5, dense=["dense_0"]),
     "config.sparsity.dense"),
])
def test_bad_config_names_the_field(fields, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    _sp(**fields)


@pytest.mark.parametrize("fields,field", [
    (dict(include=[r"no_such_param"]), r"config\.sparsity\.include\[0\]"),
    (dict(exclude=[r"dense_0", r"nothing"]), r"config\.sparsity\.exclude\[1\]"),
    (dict(granularity="block", block=(5, 4)), r"config\.sparsity\.block"),
    (dict(granularity="nm", n=1, m=5, sparsity=0.8), r"config\.sparsity\.m"),
])
def test_filters_and_shapes_checked_against_the_params(fields, field, rng_seed):
  fields = {"algorithm": "magnitude", "sparsity": 0.5, **fields}
  sp = _sp(**fields)
  with pytest.raises(ConfigError, match=field):
    sp.wrap_optax(optax.sgd(LR)).init(_params(rng_seed))


def test_include_overrides_the_default_exclusions(rng_seed):
  sp = _sp(algorithm="magnitude", sparsity=0.5, include=[r"^embedding$"])
  state = sp.wrap_optax(optax.sgd(LR)).init(_params(rng_seed))
  assert sorted(sp.masks(state)) == sorted([*SHAPES, "embedding"])
  assert math.prod(sp.masks(state)["embedding"].shape) == 160


@pytest.mark.parametrize("config_name,sparsified,dense", [
    ("moe", ["block_0/ffn/w_gate", "block_0/ffn/w_up", "block_0/ffn/w_down",
             "block_0/attention/q_proj/kernel", "block_0/attention/o_proj/kernel"],
     ["embedding", "block_0/ffn/router", "block_0/attn_norm/scale", "final_norm/scale"]),
    ("ultramem", ["memory_0/values", "memory_0/query", "memory_0/out",
                  "block_0/ffn/up_proj/kernel"],
     ["memory_0/keys", "memory_0/cores", "memory_0/key_norm", "embedding"]),
])
def test_default_filter_on_model_params(config_name, sparsified, dense):
  """MoE experts and UltraMem value tables are masked; embeddings, an untied LM head,
  routers, norms, product keys and Tucker cores are not (real parameter trees)."""
  model = parse_config(runpy.run_path(f"{REPO}/experiments/configs/{config_name}.py")
                       ["get_config"]()).model
  sp = _sp(algorithm="magnitude", sparsity=0.5)
  shapes = sp.select(abstract_params(model))
  assert set(sparsified) <= shapes.keys()
  assert not set(dense) & shapes.keys()
  assert all(len(s) >= 2 for s in shapes.values())
  untied = abstract_params(dataclasses.replace(model, tie_embeddings=False))
  assert "lm_head" in dict(named_leaves(untied)) and "lm_head" not in sp.select(untied)
