"""The train state pytree and the model-variable conventions the trainer relies on.

Model variables are split by collection:
  "params"                      trained by the optimizer;
  "aux_loss"                    scalars sown by layers, summed into the loss;
  "metrics"                     scalars sown by layers, logged (mean over sows);
  "cache", "intermediates"      decoding cache / debugging, never trained or saved;
  anything else                 non-parameter state (router bias, Tucker u/v, masks):
                                carried in `TrainState.model_state`, updated by the
                                forward pass when mutable, checkpointed, never touched by
                                the optimizer.
"""

from __future__ import annotations

from typing import Any

import flax.struct
from flax import traverse_util
import jax
import jax.numpy as jnp

TRANSIENT_COLLECTIONS = ("params", "aux_loss", "metrics", "cache", "intermediates")


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  model_state: Any         # {collection: pytree} of non-parameter state
  grad_comm: Any = None    # per-device gradient-compression state (residuals / DGC
                           # momentum), [N, ...] over "data"; None when off


def split_variables(variables: dict) -> tuple[Any, dict]:
  """(params, model_state) of a model's variables."""
  state = {k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}
  return variables["params"], state


def sum_aux_losses(collection: Any) -> jax.Array:
  """Sum of every value sown into the "aux_loss" collection (0 when none)."""
  leaves = jax.tree.leaves(collection)
  return sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.zeros((), jnp.float32))


def sown_metrics(collection: Any) -> dict[str, jax.Array]:
  """{"path/to/name": mean over the sown values} of the "metrics" collection."""
  return {name: jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in values]))
          if isinstance(values, tuple) else jnp.asarray(values, jnp.float32)
          for name, values in traverse_util.flatten_dict(collection, sep="/").items()}
