"""Linear projections with logical axis names: the "dense" entry of the linear registry.

Attention and FFN build every projection through `registry.build("linear", ...)`, so a
Q-Sparse or BitNet linear replaces all of them from the config alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry


class Dense(nn.Module):
  """y = x · W contracting the last `contract_dims` axes of x.

  x: [..., *in_dims]; W: [*in_dims, *features] with logical names `kernel_axes`
  (len = contract_dims + len(features)); y: [..., *features] in `dtype`.
  Init: normal(0, init_std), no bias.
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  contract_dims: int = 1
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dims = x.shape[x.ndim - self.contract_dims:]
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                        self.kernel_axes)
    kernel = self.param("kernel", init, (*in_dims, *self.features), self.param_dtype)
    return contract(x.astype(self.dtype), kernel.astype(self.dtype), self.contract_dims)


def contract(x: jax.Array, kernel: jax.Array, contract_dims: int) -> jax.Array:
  """Contracts the last `contract_dims` axes of x with the first ones of kernel."""
  x_axes = tuple(range(x.ndim - contract_dims, x.ndim))
  return jax.lax.dot_general(x, kernel, ((x_axes, tuple(range(contract_dims))), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)


@registry.register("linear", "dense")
def build_dense(cfg, options, layer):
  del cfg, options, layer
  return Dense
