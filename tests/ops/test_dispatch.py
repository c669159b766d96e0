"""`impl` resolution: one rule for every op, the platform from the mesh in context, and
the model config's `kernel_impl` reaching every layer's kernel option."""

import warnings

import jax
import jax.numpy as jnp
import pytest

from sparsejax.layers import registry
from sparsejax.models import DecoderLM, parse_model_config
from sparsejax.ops import dispatch


@pytest.fixture
def on_platform(monkeypatch):
  def set_platform(name):
    monkeypatch.setattr(dispatch, "platform", lambda: name)
  return set_platform


@pytest.mark.parametrize("platform,want", [("cpu", "xla"), ("tpu", "pallas"),
                                           ("gpu", "pallas")])
def test_auto_picks_kernel_on_accelerators(on_platform, platform, want):
  on_platform(platform)
  assert dispatch.resolve_impl("auto", op="op") == want
  assert dispatch.resolve_impl("xla", op="op") == "xla"
  assert dispatch.resolve_impl("interpret", op="op") == "interpret"


def test_auto_falls_back_with_one_warning_when_unmet(on_platform):
  on_platform("tpu")
  with pytest.warns(UserWarning, match="fallback_op: .*T=3 not a multiple of 8"):
    assert dispatch.resolve_impl("auto", op="fallback_op",
                                 unmet="T=3 not a multiple of 8") == "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("error")            # the same reason again: no second warning
    assert dispatch.resolve_impl("auto", op="fallback_op",
                                 unmet="T=3 not a multiple of 8") == "xla"


def test_explicit_kernel_raises_on_unmet_or_cpu(on_platform):
  on_platform("gpu")
  with pytest.raises(ValueError, match="my_op: impl='pallas' cannot run.*D=5"):
    dispatch.resolve_impl("pallas", op="my_op", unmet="D=5")
  on_platform("cpu")
  with pytest.raises(ValueError, match="my_op: impl='pallas' needs a TPU or GPU"):
    dispatch.resolve_impl("pallas", op="my_op")
  with pytest.raises(ValueError, match=r"impl='cuda' must be one of"):
    dispatch.resolve_impl("cuda", op="my_op")


def test_platform_comes_from_the_mesh_in_context():
  assert dispatch.platform() == jax.default_backend()
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    assert dispatch.platform() == mesh.abstract_mesh.abstract_device.platform


def test_kernel_impl_reaches_layer_options():
  """Options left at "auto" take the model's kernel_impl; explicit choices are kept."""
  opt = registry.parse_options("attention", "nsa", {"window_impl": "auto"},
                               "config.model.attention_options")
  assert registry.with_kernel_impl(opt, "interpret").window_impl == "interpret"
  opt = registry.parse_options("linear", "qsparse", {"impl": "xla"},
                               "config.model.linear_options")
  assert registry.with_kernel_impl(opt, "interpret").impl == "xla"


@pytest.mark.slow
def test_model_kernel_impl_runs_the_kernel(monkeypatch):
  """model.kernel_impl="interpret" sends the Q-Sparse projections to the Top-K kernel
  (seen by wrapping the kernel entry); the default model on CPU does not."""
  import pallas_kernels.topk as topk_kernels
  calls = []
  original = topk_kernels.topk_sparsify_kernel
  monkeypatch.setattr(topk_kernels, "topk_sparsify_kernel",
                      lambda *a, **k: calls.append(k) or original(*a, **k))
  model = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, linear="qsparse",
               linear_options=dict(topk_ratio=0.5))
  cfg = parse_model_config(model)
  tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 256)
  variables = DecoderLM(cfg).init(jax.random.key(1), tokens)
  want = DecoderLM(cfg).apply(variables, tokens)
  assert not calls
  got = DecoderLM(parse_model_config({**model, "kernel_impl": "interpret"})).apply(
      variables, tokens)
  assert calls and all(c["interpret"] for c in calls)
  assert jnp.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_target_platform_context():
  with dispatch.target_platform("gpu"):
    assert dispatch.platform() == "gpu"
    assert dispatch.kernel_platform() == "gpu"
    assert dispatch.resolve_impl("auto", op="op") == "pallas"
  assert dispatch.platform() == jax.default_backend()
  with pytest.raises(ValueError, match="must be 'tpu' or 'gpu'"):
    with dispatch.target_platform("cuda"):
      pass
