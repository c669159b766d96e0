"""The jitted, sharded SAE steps: init from a sample, one Adam step, evaluation.

State: `sparsejax.train.state.TrainState` with params {W_enc, b_lat, W_dec, b_pre},
the Adam state, and `model_state["sae"]` = {"tokens_since_fired": int32 [n],
"input_scale": f32 [], "mse_scale": f32 []}, so `sparsejax.train.checkpoint` saves and
restores it like a language-model run. The latent axis of the params, of the Adam
moments and of the dead-latent counter is split over the mesh's "tensor" axis; an
activation batch [N, d] is split over the batch axes ("data", "fsdp", "expert").

One step (Gao et al. 2024): loss and gradients (`sparsejax.sae.model.loss_fn`), the
decoder gradient's component parallel to each decoder row removed, Adam, decoder rows
renormalized to unit norm, and the dead-latent counter advanced by the batch's tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sparsejax import sharding
from sparsejax.sae import model as sae_model
from sparsejax.sae.capture import run_at_site, spliced_losses
from sparsejax.sae.config import SAEOptimConfig
from sparsejax.train.state import TrainState


def make_optimizer(cfg: SAEOptimConfig) -> optax.GradientTransformation:
  """Adam with linear warmup to a constant learning rate (and optional clipping)."""
  lr = (optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
        if cfg.warmup_steps else cfg.learning_rate)
  adam = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  return (optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adam)
          if cfg.grad_clip_norm else adam)


class SAETrainer:
  """The SAE's optimizer, mesh and jitted steps for inputs of width `d_in` (no I/O)."""

  def __init__(self, cfg: sae_model.SAEConfig, optim: SAEOptimConfig, d_in: int,
               mesh: jax.sharding.Mesh):
    cfg.validate()
    self.cfg, self.d_in, self.mesh = cfg, d_in, mesh
    self.tx = make_optimizer(optim)
    specs = sae_model.param_specs("tensor" if cfg.num_latents % mesh.shape["tensor"] == 0
                                  else None)
    self.param_shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    self.latent_sharding = NamedSharding(mesh, specs["b_lat"])
    self.batch_sharding = sharding.batch_sharding(mesh)
    self._init = jax.jit(self._init_fn)
    self._train_step = None   # jitted on first use, with the state's shardings

  @contextlib.contextmanager
  def activate(self):
    """Context: the mesh and the logical-axis rules (for the language model too)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      yield

  def _constrain(self, params: dict) -> dict:
    return {k: jax.lax.with_sharding_constraint(v, self.param_shardings[k])
            for k, v in params.items()}

  def _init_fn(self, key: jax.Array, sample: jax.Array) -> TrainState:
    scale, mse_scale = sae_model.input_stats(sample, self.cfg.normalize_input)
    params = self._constrain(sae_model.init_params(key, self.cfg, sample, scale))
    counter = jax.lax.with_sharding_constraint(
        jnp.zeros((self.cfg.num_latents,), jnp.int32), self.latent_sharding)
    stats = {"tokens_since_fired": counter, "input_scale": scale, "mse_scale": mse_scale}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), model_state={"sae": stats})

  def init_state(self, seed: int, sample: jax.Array) -> TrainState:
    """A fresh state for activations like `sample` [N, d_in] (b_pre, scales)."""
    with self.activate():
      return self._init(jax.random.key(seed), sample)

  def _step(self, state: TrainState, x: jax.Array) -> tuple[TrainState, dict]:
    cfg, stats = self.cfg, state.model_state["sae"]
    dead = stats["tokens_since_fired"] >= cfg.dead_tokens
    grad_fn = jax.value_and_grad(sae_model.loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, x, dead, cfg, stats["input_scale"],
                                 stats["mse_scale"])
    grads = {**grads, "W_dec": sae_model.remove_parallel_grad(state.params["W_dec"],
                                                              grads["W_dec"])}
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = self._constrain({**params,
                              "W_dec": sae_model.unit_norm_rows(params["W_dec"])})
    counter = sae_model.update_dead_counter(stats["tokens_since_fired"], aux["fired"],
                                            x.shape[0], cfg.dead_tokens)
    metrics = {"loss": loss, "nmse": aux["nmse"], "l0": aux["l0"],
               "aux_loss": aux["aux_loss"], "grad_norm": optax.tree.norm(grads),
               "dead_fraction": jnp.mean(counter >= cfg.dead_tokens)}
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           model_state={"sae": {**stats, "tokens_since_fired": counter}})
    return new_state, metrics

  def state_shardings(self, state: TrainState) -> Any:
    return jax.tree.map(lambda a: a.sharding, state)

  def train_step(self, state: TrainState, x: jax.Array) -> tuple[TrainState, dict]:
    """One step on activations x [N, d_in]; donates `state`."""
    with self.activate():
      if self._train_step is None:
        shardings = self.state_shardings(state)
        self._train_step = jax.jit(self._step, donate_argnums=0,
                                   in_shardings=(shardings, self.batch_sharding),
                                   out_shardings=(shardings, None))
      return self._train_step(state, jax.device_put(x, self.batch_sharding))

  def reconstruct_fn(self, state: TrainState):
    """x [..., d_in] -> the SAE's x̂ (for splicing into the model)."""
    stats = state.model_state["sae"]
    return lambda x: sae_model.reconstruct(state.params, x, self.cfg,
                                           stats["input_scale"])

  def eval_fn(self, lm, site: str):
    """A jitted `(lm_variables, token batch, state) -> metrics` of one val batch:
    NMSE and L0 of the SAE on the site's activations, and the next-token CE of the
    model clean, with the SAE reconstruction spliced in, and with the site zeroed."""
    cfg = self.cfg

    def run(variables, batch, state):
      stats = state.model_state["sae"]
      _, x = run_at_site(lm, variables, batch["inputs"], site)
      x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
      z = sae_model.encode(state.params, x, cfg, stats["input_scale"])
      x_hat = sae_model.decode(state.params, z, stats["input_scale"])
      return {"nmse": sae_model.normalized_mse(x_hat, x),
              "l0": jnp.mean(jnp.sum(z > 0, axis=-1)),
              **spliced_losses(lm, variables, batch, site, self.reconstruct_fn(state))}

    jitted = jax.jit(run)

    def evaluate(variables, batch, state):
      with self.activate():
        return jitted(variables, batch, state)
    return evaluate
