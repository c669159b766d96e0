"""Mixture-of-Experts FFN: the "moe" entry of the FFN registry (docs/moe.md).

    config.model.ffn = "moe"
    config.model.ffn_options = dict(num_experts=8, top_k=2, d_expert=0, num_shared=0,
        scoring="softmax", renormalize=True, activation="swiglu", dispatch="auto",
        capacity_factor=1.25, aux_loss_weight=0.01, z_loss_weight=1e-3,
        bias_update_rate=0.0, log_expert_load=True, expert_parallel=False)

y = Σ_shared FFN_s(x) + Σ_{i ∈ top-k} w_i · FFN_i(x), the routed experts computed by
`sparsejax.ops.moe`. Variables (per block, under ".../ffn"):
  params    router [D, E] (axes ("embed", None): the router is replicated over the
            expert axis; every device routes its own tokens to all E experts),
            w_gate, w_up [E, D, F] (axes ("expert", "embed", "mlp")),
            w_down [E, F, D] (axes ("expert", "mlp", "embed")),
            shared/{gate_proj,up_proj,down_proj} when num_shared > 0 (a GatedFFN of
            hidden size num_shared · F, built with the configured linear: the
            num_shared shared experts concatenated along the hidden dim).
  moe_state bias [E] f32, zeros: the aux-loss-free selection bias (DeepSeek-V3), only
            when routing uses it (`MoEOptions.uses_bias`: scoring="sigmoid" or
            bias_update_rate > 0; softmax routing without updates, e.g. Mixtral, has
            no "moe_state" and applies with `{"params": params}` alone). When
            bias_update_rate γ > 0 and the collection is mutable (the trainer's train
            step, not eval or init), each forward sets b ← b + γ·sign(mean load − load)
            from this step's load, so the next step routes with it. It is kept in
            `TrainState.model_state` and checkpointed; the optimizer never sees it.
Sown scalars:
  aux_loss  "switch_loss" = α · E·Σ f_i P_i, "z_loss" = β · mean logsumexp(z)² (only
            when the weight is > 0). With sigmoid scoring P uses the scores normalized
            per token (s / Σ s, DeepSeek-V3's sequence-wise balance loss style).
  metrics   "load_max_over_mean" (max_i load_i / mean load; 1 = balanced),
            "dropped_fraction" (capacity dispatch), and "load_<i>" per expert (fraction
            of (token, slot) assignments; `log_expert_load=False` turns these off).

`dispatch` names the algorithm that routes tokens to experts (`sparsejax.ops.moe`:
"loop" | "dropless" | "capacity" | "decode", or "auto"); it is not a kernel `impl`.

Expert parallelism (`expert_parallel=True`, requires dispatch="capacity"): when the mesh
set by `jax.set_mesh` (the trainer's) has an "expert" axis of size > 1, the routed
experts run in `sparsejax.ops.moe_ep.moe_ffn_expert_parallel` (shard_map + all_to_all
over "expert"; tokens split over `sparsejax.sharding.BATCH_AXES`; capacity per device
from its local tokens: C = ceil(k·N_local/E · capacity_factor)). Without such a mesh
(or when N tokens don't divide over the batch axes, or E over "expert") the local
capacity dispatch runs (capacity from all N tokens of the call).

The routed experts use plain einsum weights: a Q-Sparse/BitNet `linear` applies to the
attention and shared-expert projections only.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import sharding
from sparsejax.layers import registry
from sparsejax.layers.attention import output_init_std
from sparsejax.layers.ffn import GatedFFN, relu_squared
from sparsejax.ops import moe as moe_ops
from sparsejax.ops import moe_ep
from sparsejax.validation import check, check_choice

ACTIVATIONS = {"swiglu": nn.silu, "relu2_glu": relu_squared}
DISPATCHES = ("auto", *moe_ops.DISPATCHES)


@dataclasses.dataclass(frozen=True)
class MoEOptions:
  """Options of the "moe" FFN (`config.model.ffn_options`)."""
  num_experts: int = 8         # E routed experts
  top_k: int = 2               # k experts per token
  d_expert: int = 0            # F, hidden size of each expert; 0: the model's resolved
                               # d_ff // (top_k + num_shared), so the activated FFN
                               # params per token ≈ the dense FFN's
  num_shared: int = 0          # always-active shared experts (DeepSeekMoE), size F each
  scoring: str = "softmax"     # "softmax" | "sigmoid" (DeepSeek-V3)
  renormalize: bool = True     # weights of the k selected experts sum to 1
  activation: str = "swiglu"   # "swiglu" | "relu2_glu" (for Q-Sparse)
  dispatch: str = "auto"       # "auto" | "dropless" | "loop" | "capacity" | "decode";
                               # auto: "decode" when T·k < E tokens (small-batch
                               # decoding reads fewer weights), else "dropless"
  capacity_factor: float = 1.25  # dispatch="capacity": C = ceil(k·T/E · capacity_factor)
  aux_loss_weight: float = 0.01  # α of the Switch load-balancing loss
  z_loss_weight: float = 1e-3    # β of the router z-loss
  bias_update_rate: float = 0.0  # γ > 0: aux-loss-free balancing bias updates
  log_expert_load: bool = True   # sow per-expert load_<i> metrics
  expert_parallel: bool = False  # shard_map/all_to_all experts over mesh axis "expert"
                                 # (when its size > 1); requires dispatch="capacity"

  def validate(self, prefix: str = "config.model.ffn_options") -> None:
    check(self.num_experts >= 1, f"{prefix}.num_experts", self.num_experts, ">= 1")
    check(1 <= self.top_k <= self.num_experts, f"{prefix}.top_k", self.top_k,
          f"in [1, num_experts={self.num_experts}]")
    check(self.d_expert >= 0, f"{prefix}.d_expert", self.d_expert, ">= 0 (0 = auto)")
    check(self.num_shared >= 0, f"{prefix}.num_shared", self.num_shared, ">= 0")
    check_choice(f"{prefix}.scoring", self.scoring, moe_ops.SCORINGS)
    check_choice(f"{prefix}.activation", self.activation, tuple(ACTIVATIONS))
    check_choice(f"{prefix}.dispatch", self.dispatch, DISPATCHES)
    check(self.capacity_factor > 0, f"{prefix}.capacity_factor", self.capacity_factor,
          "> 0")
    for name in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), ">= 0")
    check(isinstance(self.expert_parallel, bool), f"{prefix}.expert_parallel",
          self.expert_parallel, "a bool")
    check(not self.expert_parallel or self.dispatch == "capacity",
          f"{prefix}.expert_parallel", self.expert_parallel,
          f'False unless dispatch="capacity" (dispatch={self.dispatch!r})')

  @property
  def uses_bias(self) -> bool:
    """Whether routing has a selection bias, i.e. the "moe_state" collection: with
    sigmoid scoring (DeepSeek-V3's, which a checkpoint may hold) or bias updates."""
    return self.scoring == "sigmoid" or self.bias_update_rate > 0

  def resolved_d_expert(self, d_ff: int) -> int:
    return self.d_expert or max(1, d_ff // (self.top_k + self.num_shared))


def resolve_dispatch(dispatch: str, num_tokens: int, top_k: int, num_experts: int
                     ) -> str:
  """"auto" → "decode" when T·k < E (gathering T·k expert slices reads less than all E
  experts' weights), else "dropless"; other values pass through."""
  if dispatch != "auto":
    return dispatch
  return "decode" if num_tokens * top_k < num_experts else "dropless"


def expert_parallel_mesh(num_tokens: int | None = None,
                         num_experts: int | None = None
                         ) -> jax.sharding.AbstractMesh | None:
  """The current abstract mesh (`jax.set_mesh`) if it has an "expert" axis of size
  > 1 (and, when given, `num_tokens` divides over the batch axes and `num_experts` over
  "expert"), else None: expert parallelism then falls back to the local dispatch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] <= 1:
    return None
  n_batch = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES
                      if a in mesh.axis_names)
  if num_tokens is not None and num_tokens % n_batch:
    return None
  if num_experts is not None and num_experts % mesh.shape["expert"]:
    return None
  return mesh


class MoEFFN(nn.Module):
  """x [B, T, D] -> [B, T, D]: top-k routed gated experts (+ shared experts)."""
  cfg: object
  layer: int = 0
  options: MoEOptions = MoEOptions()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, opt = self.cfg, self.options
    e, d = opt.num_experts, cfg.d_model
    f = opt.resolved_d_expert(cfg.resolved_d_ff)
    xt = x.reshape(-1, d)                                      # [N, D]

    def param(name, shape, axes, std):
      init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
      return self.param(name, init, shape, cfg.param_dtype)

    router = param("router", (d, e), ("embed", None), cfg.init_std)
    w_gate = param("w_gate", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std)
    w_up = param("w_up", (e, d, f), ("expert", "embed", "mlp"), cfg.init_std)
    w_down = param("w_down", (e, f, d), ("expert", "mlp", "embed"), output_init_std(cfg))
    bias = (self.variable("moe_state", "bias", lambda: jnp.zeros((e,), jnp.float32))
            if opt.uses_bias else None)

    logits = jnp.dot(xt.astype(jnp.float32), router.astype(jnp.float32))  # [N, E]
    weights, experts, scores = moe_ops.route(
        logits, opt.top_k, scoring=opt.scoring,
        bias=bias.value if bias is not None else None, renormalize=opt.renormalize)
    dispatch = resolve_dispatch(opt.dispatch, xt.shape[0], opt.top_k, e)
    dtype = cfg.dtype
    args = (xt.astype(dtype), weights, experts, w_gate.astype(dtype),
            w_up.astype(dtype), w_down.astype(dtype))
    mesh = expert_parallel_mesh(xt.shape[0], e) if opt.expert_parallel else None
    if mesh is not None:
      y, dropped = moe_ep.moe_ffn_expert_parallel(
          *args, mesh=mesh, activation=ACTIVATIONS[opt.activation],
          capacity_factor=opt.capacity_factor, axis="expert",
          batch_axes=sharding.BATCH_AXES)
    else:
      y, dropped = moe_ops.moe_ffn(
          *args, activation=ACTIVATIONS[opt.activation], dispatch=dispatch,
          capacity_factor=opt.capacity_factor)
    y = y.reshape(x.shape)

    load = moe_ops.expert_load(experts, e)
    if (opt.bias_update_rate > 0 and self.is_mutable_collection("moe_state")
        and not self.is_initializing()):
      bias.value = moe_ops.update_bias(bias.value, jax.lax.stop_gradient(load),
                                       opt.bias_update_rate)
    self._sow(logits, scores, experts, load, dropped)

    if opt.num_shared:
      shared_cfg = dataclasses.replace(cfg, d_ff=opt.num_shared * f)
      y = y + GatedFFN(shared_cfg, self.layer, ACTIVATIONS[opt.activation],
                       name="shared")(x)
    return y

  def _sow(self, logits, scores, experts, load, dropped):
    opt = self.options
    e = opt.num_experts
    if opt.aux_loss_weight > 0:
      probs = scores if opt.scoring == "softmax" else (
          scores / jnp.sum(scores, axis=-1, keepdims=True))
      self.sow("aux_loss", "switch_loss",
               opt.aux_loss_weight * moe_ops.switch_aux_loss(probs, experts, e))
    if opt.z_loss_weight > 0:
      self.sow("aux_loss", "z_loss", opt.z_loss_weight * moe_ops.router_z_loss(logits))
    self.sow("metrics", "load_max_over_mean", jnp.max(load) * e)  # mean load = 1/E
    self.sow("metrics", "dropped_fraction", dropped)
    if opt.log_expert_load:
      for i in range(e):
        self.sow("metrics", f"load_{i}", load[i])


@registry.register("ffn", "moe", options=MoEOptions)
def build_moe(cfg, options, layer):
  return MoEFFN(cfg, layer, options, name="ffn")
