"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
arXiv 2406.04093): the math as pure functions on a params dict.

With input scale c (a constant fixed from a data sample so that E‖c·x‖² = d; 1 when
`normalize_input=False`) and x_s = c·x:

    a   = (x_s − b_pre) @ W_enc + b_lat                                  [N, n]
    z   = ReLU(TopK_k(a))            (the k largest of each row, ReLU on the kept values)
    x̂_s = z @ W_dec + b_pre,   x̂ = x̂_s / c                                  [N, d]

Params (float32): W_enc [d, n], b_lat [n], W_dec [n, d] (row j = latent j's decoder
direction, kept unit-norm), b_pre [d]. The top-k selection is the library's
`sparsejax.ops.topk_sparsify` (the Pallas kernel on TPU/GPU); its straight-through
gradient is not used: the gradient reaches only the kept, positive pre-activations, as
in the paper.

AuxK (the paper's auxiliary loss): latents that have not fired for `dead_tokens` tokens are dead. The
top-`k_aux` of the dead latents' pre-activations reconstruct the main model's error
e = x_s − x̂_s (held constant):  ê = z_aux @ W_dec — without b_pre, which e already
accounts for — and L = s·mean(x_s − x̂_s)² + aux_coeff · mean(e − ê)² / mean(e²),
with s = 1 / mean(x_s − mean(x_s))² over the init sample (means over tokens and
dimensions; so the first term is the normalized MSE, NMSE). The AuxK term is 0 when no latent is dead.

Sharding: `param_specs` puts the latent axis of W_enc, b_lat and W_dec on the mesh's
"tensor" axis; with such a mesh in context the top-k runs shard by shard without
gathering the latents (`sparsejax.sae.sharded_topk`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparsejax.ops.topk import topk_sparsify
from sparsejax.sae import sharded_topk
from sparsejax.validation import check


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """Hyperparameters of one TopK SAE (field names as in `config.sae.*`)."""
  num_latents: int = 1024       # n, the dictionary size
  k: int = 16                   # active latents per token, in [1, num_latents)
  k_aux: int = 64               # AuxK latents per token, in [1, num_latents]
  aux_coeff: float = 1 / 32     # AuxK loss weight; 0 disables AuxK
  dead_tokens: int = 100_000    # a latent silent for this many tokens is dead
  tied_init: bool = True        # W_enc = W_decᵀ at init (else independent draws)
  normalize_input: bool = True  # scale inputs so that E‖x‖² = d (constant from a sample)
  impl: str = "auto"            # top-k implementation (sparsejax.ops.dispatch)

  def validate(self, prefix: str = "config.sae") -> None:
    n = self.num_latents
    check(n >= 2, f"{prefix}.num_latents", n, ">= 2")
    check(1 <= self.k < n, f"{prefix}.k", self.k,
          f"in [1, {n - 1}] (below num_latents={n})")
    check(1 <= self.k_aux <= n, f"{prefix}.k_aux", self.k_aux,
          f"in [1, {n}] (num_latents={n})")
    check(self.aux_coeff >= 0, f"{prefix}.aux_coeff", self.aux_coeff, ">= 0")
    check(self.dead_tokens >= 1, f"{prefix}.dead_tokens", self.dead_tokens, ">= 1")
    check(self.impl in ("auto", "xla", "pallas", "interpret"), f"{prefix}.impl",
          self.impl, "one of auto, xla, pallas, interpret")


def param_specs(mesh_axis: str | None = "tensor") -> dict[str, P]:
  """PartitionSpecs of the params with the latent axis on `mesh_axis`."""
  return {"W_enc": P(None, mesh_axis), "b_lat": P(mesh_axis),
          "W_dec": P(mesh_axis, None), "b_pre": P()}


def geometric_median(x: jax.Array, *, iters: int = 64, eps: float = 1e-8) -> jax.Array:
  """Weiszfeld's iteration for argmin_y Σ_i ‖x_i − y‖, x [N, d] -> [d] (float32).

  y ← Σ w_i x_i / Σ w_i with w_i = 1 / max(‖x_i − y‖, eps), started at the mean.
  """
  x = jnp.asarray(x, jnp.float32)
  check(x.ndim == 2 and x.shape[0] >= 1, "x.shape", x.shape, "[N >= 1, d]")

  def step(_, y):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)
    return (w @ x) / jnp.sum(w)

  return jax.lax.fori_loop(0, iters, step, jnp.mean(x, axis=0))


def unit_norm_rows(w: jax.Array) -> jax.Array:
  """Each row of W_dec [n, d] divided by its L2 norm."""
  return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def remove_parallel_grad(w_dec: jax.Array, g: jax.Array) -> jax.Array:
  """g − (g·w_j) w_j for each unit-norm row w_j of W_dec: the component of the
  gradient that would only change a decoder row's norm is removed."""
  return g - jnp.sum(g * w_dec, axis=-1, keepdims=True) * w_dec


def input_stats(sample: jax.Array, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """(input scale c, MSE scale s) of a sample [N, d]: c = sqrt(d / mean‖x‖²) (1 when
  not normalizing) and s = 1 / mean‖c·x − mean(c·x)‖² (per element)."""
  x = jnp.asarray(sample, jnp.float32)
  scale = (jnp.sqrt(x.shape[-1] / jnp.mean(jnp.sum(x * x, axis=-1))) if normalize
           else jnp.ones((), jnp.float32))
  xs = x * scale
  mse_scale = 1.0 / jnp.maximum(jnp.mean(jnp.square(xs - xs.mean(0))), 1e-12)
  return scale, mse_scale


def init_params(key: jax.Array, cfg: SAEConfig, sample: jax.Array,
                input_scale: jax.Array) -> dict[str, jax.Array]:
  """Params for inputs like `sample` [N, d]: unit-norm random decoder rows,
  W_enc = W_decᵀ (tied init) or an independent draw, b_lat = 0, b_pre = the geometric
  median of the scaled sample."""
  d = sample.shape[-1]
  cfg.validate()
  k_dec, k_enc = jax.random.split(key)
  w_dec = unit_norm_rows(jax.random.normal(k_dec, (cfg.num_latents, d), jnp.float32))
  w_enc = (w_dec.T if cfg.tied_init else
           unit_norm_rows(jax.random.normal(k_enc, (cfg.num_latents, d), jnp.float32)).T)
  return {"W_enc": w_enc, "b_lat": jnp.zeros((cfg.num_latents,), jnp.float32),
          "W_dec": w_dec,
          "b_pre": geometric_median(jnp.asarray(sample, jnp.float32) * input_scale)}


def _topk_relu(a: jax.Array, k: int, impl: str) -> jax.Array:
  """ReLU(TopK_k(a)) per row, gradient only through the kept positive entries."""
  r = jax.nn.relu(a)
  if sharded_topk.applies(r.shape[-1], k):   # latents split over "tensor": no gather
    keep = sharded_topk.topk_mask(jax.lax.stop_gradient(r), k, impl)
  else:
    keep = topk_sparsify(jax.lax.stop_gradient(r), k, impl=impl) > 0
  return jnp.where(keep, r, 0.0)


def pre_activations(params: dict, x_s: jax.Array) -> jax.Array:
  """a = (x_s − b_pre) @ W_enc + b_lat, x_s [N, d] (already scaled) -> [N, n]."""
  return (x_s - params["b_pre"]) @ params["W_enc"] + params["b_lat"]


def encode(params: dict, x: jax.Array, cfg: SAEConfig,
           input_scale: jax.Array | float = 1.0) -> jax.Array:
  """Latents z [N, n] (at most k nonzero per row, all >= 0) of inputs x [N, d]."""
  return _topk_relu(pre_activations(params, x * input_scale), cfg.k, cfg.impl)


def decode(params: dict, z: jax.Array, input_scale: jax.Array | float = 1.0) -> jax.Array:
  """x̂ [N, d] = (z @ W_dec + b_pre) / c."""
  return (z @ params["W_dec"] + params["b_pre"]) / input_scale


def reconstruct(params: dict, x: jax.Array, cfg: SAEConfig,
                input_scale: jax.Array | float = 1.0) -> jax.Array:
  """x̂ of x [..., d] (leading axes flattened and restored), in x's dtype."""
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  z = encode(params, flat, cfg, input_scale)
  return decode(params, z, input_scale).reshape(x.shape).astype(x.dtype)


def normalized_mse(x_hat: jax.Array, x: jax.Array) -> jax.Array:
  """mean‖x − x̂‖² / mean‖x − mean(x)‖² over the rows of x [N, d] (the paper's NMSE)."""
  x = x.astype(jnp.float32)
  return (jnp.mean(jnp.square(x - x_hat)) /
          jnp.maximum(jnp.mean(jnp.square(x - x.mean(0))), 1e-12))


def loss_fn(params: dict, x: jax.Array, dead: jax.Array, cfg: SAEConfig,
            input_scale: jax.Array, mse_scale: jax.Array
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, aux) of a batch x [N, d] (float32) with `dead` bool [n].

  aux: "mse" (scaled-space MSE · mse_scale), "aux_loss" (AuxK term before its
  coefficient), "nmse" (batch NMSE), "l0" (mean nonzero latents per token),
  "fired" (bool [n]: latents nonzero on any token of the batch).
  """
  x_s = x.astype(jnp.float32) * input_scale
  a = pre_activations(params, x_s)
  z = _topk_relu(a, cfg.k, cfg.impl)
  x_hat = z @ params["W_dec"] + params["b_pre"]
  mse = jnp.mean(jnp.square(x_s - x_hat)) * mse_scale
  err = jax.lax.stop_gradient(x_s - x_hat)
  z_aux = _topk_relu(jnp.where(dead, a, 0.0), cfg.k_aux, cfg.impl)
  e_hat = z_aux @ params["W_dec"]
  aux = (jnp.mean(jnp.square(err - e_hat)) /
         jnp.maximum(jnp.mean(jnp.square(err)), 1e-30))
  aux = jnp.where(jnp.any(dead), aux, 0.0)
  loss = mse + cfg.aux_coeff * aux
  return loss, {"mse": mse, "aux_loss": aux, "nmse": normalized_mse(x_hat, x_s),
                "l0": jnp.mean(jnp.sum(z > 0, axis=-1)), "fired": jnp.any(z > 0, axis=0)}


def update_dead_counter(tokens_since_fired: jax.Array, fired: jax.Array,
                        num_tokens: int, dead_tokens: int) -> jax.Array:
  """Tokens since each latent last fired (int32 [n]), saturating at `dead_tokens`:
  0 for latents that fired in this batch of `num_tokens` tokens."""
  grown = jnp.minimum(tokens_since_fired + num_tokens, dead_tokens)
  return jnp.where(fired, 0, grown).astype(jnp.int32)


__all__ = ["SAEConfig", "param_specs", "geometric_median", "unit_norm_rows",
           "remove_parallel_grad", "input_stats", "init_params", "pre_activations",
           "encode", "decode", "reconstruct", "normalized_mse", "loss_fn",
           "update_dead_counter"]
