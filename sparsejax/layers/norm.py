"""RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x²) + eps) · g."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """Normalizes the last axis of x [..., D] in float32; learned gain g [D] (axis "norm")."""
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                               ("norm",)),
                         (x.shape[-1],), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)
