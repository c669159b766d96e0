"""FFN entries ("swiglu", "relu2_glu", "relu2") vs NumPy references; params and axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.layers import registry
from sparsejax.models import parse_model_config
from sparsejax.sharding import unbox

D, D_FF = 16, 24


def np_relu(x):
  return np.maximum(x, 0.0)


def np_silu(x):
  return x / (1.0 + np.exp(-x))


REFERENCES = {
    "swiglu": lambda x, p: (np_silu(x @ p["gate_proj"]) * (x @ p["up_proj"])) @ p["down_proj"],
    "relu2_glu": lambda x, p: (np_relu(x @ p["gate_proj"]) ** 2 * (x @ p["up_proj"]))
    @ p["down_proj"],
    "relu2": lambda x, p: np_relu(x @ p["up_proj"]) ** 2 @ p["down_proj"],
}
EXPECTED_PARAMS = {
    "swiglu": ("down_proj", "gate_proj", "up_proj"),
    "relu2_glu": ("down_proj", "gate_proj", "up_proj"),
    "relu2": ("down_proj", "up_proj"),
}
AXES = {"gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
        "down_proj": ("mlp", "embed")}


def build(name):
  cfg = parse_model_config(dict(d_model=D, d_ff=D_FF, num_heads=2, num_kv_heads=2,
                                num_layers=2, ffn=name))
  return registry.build("ffn", name, cfg, {}, 0)


@pytest.mark.parametrize("name", ["swiglu", "relu2_glu", "relu2"])
def test_ffn_matches_numpy(rng_seed, name):
  rng = np.random.default_rng(rng_seed)
  x = jnp.asarray(rng.standard_normal((2, 5, D)).astype(np.float32))
  ffn = build(name)
  boxed = jax.eval_shape(ffn.init, jax.random.key(0), x)["params"]
  assert tuple(sorted(boxed)) == EXPECTED_PARAMS[name]
  for proj, p in boxed.items():          # same names/axes/shapes as SwiGLU's
    assert isinstance(p["kernel"], nn.LogicallyPartitioned)
    assert p["kernel"].names == AXES[proj]
    assert p["kernel"].value.shape == ((D, D_FF) if AXES[proj][0] == "embed" else (D_FF, D))
  params = jax.tree.map(lambda s: jnp.asarray(
      (0.3 * rng.standard_normal(s.shape)).astype(np.float32)), unbox(boxed))
  y = jax.jit(ffn.apply)({"params": params}, x)
  kernels = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
  ref = REFERENCES[name](np.asarray(x, np.float64), kernels)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert y.shape == x.shape and y.dtype == jnp.float32


def test_relu2_ffns_are_registered():
  assert {"swiglu", "relu2_glu", "relu2"} <= set(registry.names("ffn"))
