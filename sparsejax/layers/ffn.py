"""FFNs, x [B, T, D] -> [B, T, D] with hidden size d_ff: the "swiglu", "relu2_glu" and
"relu2" FFN entries.

  swiglu     y = W_down (silu(W_gate x) ⊙ W_up x)        (Shazeer 2020)
  relu2_glu  y = W_down (relu(W_gate x)² ⊙ W_up x)       (Q-Sparse pretraining)
  relu2      y = W_down relu(W_up x)²                    (Primer)
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry
from sparsejax.layers.attention import linear_factory, output_init_std


def relu_squared(x: jax.Array) -> jax.Array:
  return jnp.square(nn.relu(x))


class GatedFFN(nn.Module):
  """y = W_down (act(W_gate x) ⊙ W_up x): SwiGLU (act = silu) or ReLU²-GLU.

  Params gate_proj, up_proj [D, d_ff] (axes embed, mlp) and down_proj [d_ff, D]; the
  squared ReLU makes the down_proj input naturally sparse (Q-Sparse pretraining).
  """
  cfg: object
  layer: int = 0
  activation: Callable[[jax.Array], jax.Array] = nn.silu

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    linear = linear_factory(cfg, self.layer)
    d_ff = cfg.resolved_d_ff
    gate = linear((d_ff,), ("embed", "mlp"), init_std=cfg.init_std, name="gate_proj")(x)
    up = linear((d_ff,), ("embed", "mlp"), init_std=cfg.init_std, name="up_proj")(x)
    return linear((cfg.d_model,), ("mlp", "embed"), init_std=output_init_std(cfg),
                  name="down_proj")(self.activation(gate) * up)


@registry.register("ffn", "swiglu")
def build_swiglu(cfg, options, layer):
  del options
  return GatedFFN(cfg, layer, nn.silu, name="ffn")


class ReluSquaredMLP(nn.Module):
  """Squared-ReLU MLP (So et al. 2021, Primer): y = W_down relu(W_up x)².

  Params up_proj [D, d_ff] and down_proj [d_ff, D] (2/3 of a GLU's params at the same
  d_ff: raise `d_ff` by 1.5× to match a GLU's size).
  """
  cfg: object
  layer: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    linear = linear_factory(cfg, self.layer)
    up = linear((cfg.resolved_d_ff,), ("embed", "mlp"), init_std=cfg.init_std,
                name="up_proj")(x)
    return linear((cfg.d_model,), ("mlp", "embed"), init_std=output_init_std(cfg),
                  name="down_proj")(relu_squared(up))


@registry.register("ffn", "relu2_glu")
def build_relu2_glu(cfg, options, layer):
  del options
  return GatedFFN(cfg, layer, relu_squared, name="ffn")


@registry.register("ffn", "relu2")
def build_relu2(cfg, options, layer):
  del options
  return ReluSquaredMLP(cfg, layer, name="ffn")
