"""Mixture-of-Experts math (docs/moe.md): routers, balancing losses and dispatch.

Shapes: T tokens, D model dim, E experts, k experts per token, F expert hidden dim.

  route(logits [T,E], k)              -> weights f32 [T,k], experts int32 [T,k], scores [T,E]
  switch_aux_loss(scores, experts, E) =  E · Σ_i f_i · P_i
  router_z_loss(logits)               =  mean_t logsumexp(z_t)²
  expert_load(experts, E)             =  f [E] (fraction of (token, slot) pairs per expert)
  update_bias(b, load, γ)             =  b + γ · sign(mean(load) − load)
  moe_ffn(x [T,D], weights, experts, w_gate [E,D,F] | None, w_up [E,D,F], w_down [E,F,D])
                                      -> y [T,D], dropped_fraction f32 scalar
  moe_decode(...)                     -> y [T,D] (reads only the k·T selected weight slices)

Each expert is y_e(x) = W_down,e (act(W_gate,e x) ⊙ W_up,e x) (gated; SwiGLU with
act = silu) or W_down,e act(W_up,e x) when w_gate is None, and the layer output is
y(x) = Σ_{j<k} weights_j · y_{experts_j}(x). The dispatch algorithms (`dispatch=`
"loop" | "dropless" | "capacity", and `moe_decode`) compute the same y (forward and
gradients) when no token is dropped.

Invalid expert ids (negative, e.g. -1 padding, or ≥ E) follow one rule in every
dispatch algorithm and in expert parallelism: the (token, slot) pair contributes exactly
zero to y and gets/gives zero gradient (its weight, the token and the expert weights
receive nothing from it), as if the pair were removed; it takes no capacity slot and
does not count as dropped. With `check_indices=True` an invalid id is reported by a
`jax.experimental.checkify.checkify` wrapper instead. T = 0 tokens or k = 0 slots give
an empty (or zero) y.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import checkify

SCORINGS = ("softmax", "sigmoid")
DISPATCHES = ("loop", "dropless", "capacity", "decode")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu, "relu2": lambda h: jnp.square(nn.relu(h)), "relu": nn.relu,
    "gelu": nn.gelu,
}

Activation = str | Callable[[jax.Array], jax.Array]


def _activation(activation: Activation) -> Callable[[jax.Array], jax.Array]:
  if callable(activation):
    return activation
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} must be a callable or one of "
                     f"{sorted(ACTIVATIONS)}")
  return ACTIVATIONS[activation]


# ----------------------------------------------------------------------------- routing

def route(logits: jax.Array, k: int, *, scoring: str = "softmax",
          bias: jax.Array | None = None, renormalize: bool = True
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k router: (weights f32 [T,k], experts int32 [T,k], scores f32 [T,E]).

  logits z [T,E] (any leading dims allowed, flattened semantics per row).
    softmax (Switch/GShard/Mixtral): s = softmax(z).
    sigmoid (DeepSeek-V3):           s = sigmoid(z).
  experts = top-k indices of (s + b) (b = `bias` [E], default 0; b only affects the
  selection and receives no gradient); weights = s at the selected experts, divided by
  their sum when `renormalize` (for softmax without bias this equals a softmax over the
  top-k logits). Ties pick the lowest expert index (`jax.lax.top_k`).
  """
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r} must be one of {SCORINGS}")
  _check_float(logits, "logits")
  num_experts = logits.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} must be in [1, {num_experts}] for {num_experts} experts")
  z = logits.astype(jnp.float32)
  scores = jax.nn.softmax(z, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(z)
  if bias is None:
    weights, experts = jax.lax.top_k(scores, k)
  else:
    if bias.shape != (num_experts,):
      raise ValueError(f"bias shape {bias.shape} must be ({num_experts},)")
    selection = jax.lax.stop_gradient(scores) + jax.lax.stop_gradient(
        bias.astype(jnp.float32))
    _, experts = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32), scores


def expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
  """f [E] f32: fraction of the (token, slot) assignments in experts [T,k] per expert
  (sums to 1 over valid ids; uniform load = 1/E; all zeros when T·k = 0). Invalid ids
  (outside [0, E)) count for no expert."""
  if experts.size == 0:
    return jnp.zeros((num_experts,), jnp.float32)
  counts = jnp.sum(jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32),
                   axis=0)
  return counts / experts.size


def switch_aux_loss(scores: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
  """Switch/GShard load-balancing loss E · Σ_i f_i · P_i (= 1 at uniform routing).

  f_i = fraction of the T·k (token, slot) assignments going to expert i (no gradient),
  P_i = mean over tokens of the router probability scores [T,E] of expert i.
  Hugging Face's `load_balancing_loss_func` counts f_i over tokens instead of slots
  (Σ_i f_i = k), so it equals k × this value. 0 for T = 0 tokens.
  """
  if experts.size == 0:
    return jnp.zeros((), jnp.float32)
  f = jax.lax.stop_gradient(expert_load(experts, num_experts))
  p = jnp.mean(scores.reshape(-1, num_experts).astype(jnp.float32), axis=0)
  return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(z)², logits [..., E] (0 for
  no tokens)."""
  if logits.size == 0:
    return jnp.zeros((), jnp.float32)
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(lse))


def update_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing (DeepSeek-V3): b_i ← b_i + γ · sign(mean(load) − load_i).

  Underloaded experts get a larger bias (selected more often), overloaded a smaller one.
  Differences within 1e-6 · mean(load) (float rounding of an exactly average load)
  count as 0.
  """
  load = load.astype(jnp.float32)
  mean = jnp.mean(load)
  diff = mean - load
  sign = jnp.where(jnp.abs(diff) <= 1e-6 * jnp.abs(mean), 0.0, jnp.sign(diff))
  return bias + rate * sign.astype(bias.dtype)


# ---------------------------------------------------------------------------- dispatch

def _check_float(x, name: str) -> None:
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {jnp.asarray(x).dtype}")


def _check_shapes(x, weights, experts, w_gate, w_up, w_down):
  _check_float(x, "x")
  if x.ndim != 2:
    raise ValueError(f"x must be [T, D], got shape {x.shape}")
  t, d = x.shape
  if weights.shape != experts.shape or weights.ndim != 2 or weights.shape[0] != t:
    raise ValueError(f"weights {weights.shape} and experts {experts.shape} must both "
                     f"be [T={t}, k]")
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    raise TypeError(f"experts must be an integer array of expert ids, got dtype "
                    f"{experts.dtype}")
  e, d_up, f = w_up.shape
  if d_up != d or w_down.shape != (e, f, d) or (
      w_gate is not None and w_gate.shape != w_up.shape):
    raise ValueError(f"expert weights must be w_gate/w_up [E,D,F] and w_down [E,F,D] "
                     f"with D={d}; got w_gate "
                     f"{None if w_gate is None else w_gate.shape}, w_up {w_up.shape}, "
                     f"w_down {w_down.shape}")


def valid_experts(experts: jax.Array, num_experts: int) -> jax.Array:
  """bool, experts' shape: True where the id is in [0, num_experts)."""
  return (experts >= 0) & (experts < num_experts)


def check_experts(experts: jax.Array, num_experts: int, fn: str) -> None:
  """`checkify.check` that every id of `experts` is in [0, num_experts): reported (with
  the first bad id) by a `jax.experimental.checkify.checkify` wrapper."""
  if experts.size == 0:
    return
  ok = valid_experts(experts, num_experts).reshape(-1)
  checkify.check(jnp.all(ok), f"{fn}: experts must be expert ids in [0, {num_experts}), "
                 "got {bad}", bad=experts.reshape(-1)[jnp.argmin(ok)])


def _loop(x, weights, experts, w_gate, w_up, w_down, act):
  """Reference: per expert, gather its tokens (static size T, padded), apply, scatter.
  Invalid ids match no expert."""
  t = x.shape[0]
  y = jnp.zeros(x.shape, jnp.float32)
  for e in range(w_up.shape[0]):
    hit = experts == e                                      # [T, k]
    gate_w = jnp.sum(jnp.where(hit, weights, 0.0), axis=-1)  # [T]
    chosen = jnp.any(hit, axis=-1)
    (idx,) = jnp.nonzero(chosen, size=t, fill_value=0)
    valid = jnp.arange(t) < jnp.sum(chosen)
    xe = x[idx]
    h = act(xe @ w_gate[e]) * (xe @ w_up[e]) if w_gate is not None else act(xe @ w_up[e])
    ye = (h @ w_down[e]).astype(jnp.float32)
    y = y.at[idx].add(ye * jnp.where(valid, gate_w[idx], 0.0)[:, None])
  return y


def _dropless(x, weights, experts, valid, w_gate, w_up, w_down, act):
  """Sort the T·k (token, slot) pairs by expert, grouped matmuls, unsort, combine.

  Invalid pairs get the sort key E: they sort last, past every group (`ragged_dot`
  gives those rows 0), and are masked out of the combine."""
  t, k = experts.shape
  e = w_up.shape[0]
  flat = jnp.where(valid, experts, e).reshape(-1)
  order = jnp.argsort(flat, stable=True)                   # [T·k]
  xs = x[order // k]                                       # [T·k, D] sorted by expert
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)   # [E] (key E is not counted)
  up = jax.lax.ragged_dot(xs, w_up, sizes)
  h = act(up) if w_gate is None else act(jax.lax.ragged_dot(xs, w_gate, sizes)) * up
  out = jax.lax.ragged_dot(h, w_down, sizes)               # [T·k, D]
  ys = jnp.zeros_like(out).at[order].set(out).reshape(t, k, -1)
  ys = jnp.where(valid[..., None], ys.astype(jnp.float32), 0.0)
  return jnp.einsum("tk,tkd->td", weights, ys)


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """GShard expert capacity C = ceil(k · T / E · capacity_factor)."""
  return max(1, math.ceil(k * num_tokens / num_experts * capacity_factor))


def capacity_dispatch(weights: jax.Array, experts: jax.Array, num_experts: int,
                      cap: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GShard dispatch/combine tensors for C = `cap` slots per expert.

  Positions are a cumsum over the one-hot assignments in slot-major order (every
  token's 1st choice, then every 2nd choice, ...); slots at position ≥ C are dropped.
  Invalid ids (outside [0, E)) have an all-zero one-hot: they take no slot, dispatch
  nothing and are not dropped. Returns dispatch [T,E,C] (`dtype`, 0/1), combine f32
  [T,E,C] (the routing weight of the token at its slot) and dropped bool [T,k].
  """
  t, k = experts.shape
  e, c = num_experts, cap
  onehot = jax.nn.one_hot(experts.T, e, dtype=jnp.int32)  # [k, T, E] slot-major
  position = jnp.cumsum(onehot.reshape(k * t, e), axis=0).reshape(k, t, e) - 1
  position = jnp.sum(position * onehot, axis=-1).T          # [T, k]
  keep = position < c                                      # [T, k]
  slot = jax.nn.one_hot(jnp.where(keep, position, c), c, dtype=dtype)  # [T,k,C]
  dispatch = jnp.einsum("tke,tkc->tec", jax.nn.one_hot(experts, e, dtype=dtype), slot)
  combine = jnp.einsum("tke,tkc,tk->tec", jax.nn.one_hot(experts, e, dtype=jnp.float32),
                       slot.astype(jnp.float32), weights.astype(jnp.float32))
  return dispatch, combine, valid_experts(experts, e) & ~keep


def expert_ffn(xe: jax.Array, w_gate: jax.Array | None, w_up: jax.Array,
               w_down: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Batched experts on dispatched tokens: xe [E,C,D] -> [E,C,D]."""
  gate = None if w_gate is None else jnp.einsum("ecd,edf->ecf", xe, w_gate)
  up = jnp.einsum("ecd,edf->ecf", xe, w_up)
  h = act(up) if w_gate is None else act(gate) * up
  return jnp.einsum("ecf,efd->ecd", h, w_down)


def _capacity(x, weights, experts, w_gate, w_up, w_down, act, capacity_factor):
  """GShard dispatch (`capacity_dispatch`); slots at position ≥ C are dropped and
  contribute 0."""
  t, k = experts.shape
  e = w_up.shape[0]
  c = capacity(t, k, e, capacity_factor)
  dispatch, combine, dropped = capacity_dispatch(weights, experts, e, c, x.dtype)
  xe = jnp.einsum("tec,td->ecd", dispatch, x)               # [E, C, D]
  out = expert_ffn(xe, w_gate, w_up, w_down, act)
  y = jnp.einsum("tec,ecd->td", combine, out.astype(jnp.float32))
  return y, jnp.sum(dropped).astype(jnp.float32) / dropped.size


def check_dispatch_args(dispatch: str, capacity_factor: float) -> None:
  if dispatch not in DISPATCHES:
    raise ValueError(f"dispatch={dispatch!r} must be one of {DISPATCHES}")
  if dispatch == "capacity" and not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be > 0")


def moe_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array,
            w_gate: jax.Array | None, w_up: jax.Array, w_down: jax.Array, *,
            activation: Activation = "silu", dispatch: str = "dropless",
            capacity_factor: float = 1.25, check_indices: bool = False
            ) -> tuple[jax.Array, jax.Array]:
  """Routed experts: y [T,D] = Σ_j weights[t,j] · FFN_{experts[t,j]}(x_t), and the
  fraction of (token, slot) pairs dropped (f32 scalar; 0 except for
  dispatch="capacity").

  x [T,D]; weights f32 [T,k]; experts int [T,k]; w_gate, w_up [E,D,F] (w_gate None:
  non-gated experts act(x W_up) W_down); w_down [E,F,D]. `activation` is a callable or
  "silu" | "relu2" | "relu" | "gelu". dispatch (the algorithm; all give the same y):
    loop      per expert: gather its tokens, apply, scatter-add (reference; slow).
    dropless  sort (token, slot) by expert, `jax.lax.ragged_dot` grouped matmuls.
    capacity  GShard: C = ceil(k·T/E · capacity_factor) slots per expert, one-hot
              dispatch/combine einsums; overflowing slots are dropped (contribute 0).
    decode    `moe_decode`: gathers the selected experts' weights per token.
  An id outside [0, E) makes its pair contribute exactly 0 (and get zero gradient);
  `check_indices=True` reports such ids through `checkify.checkify` instead. T = 0 or
  k = 0 give zeros [T,D]. Output dtype is x.dtype; the combine is done in float32.
  """
  _check_shapes(x, weights, experts, w_gate, w_up, w_down)
  check_dispatch_args(dispatch, capacity_factor)
  act = _activation(activation)
  zero = jnp.zeros((), jnp.float32)
  if dispatch == "decode":
    return moe_decode(x, weights, experts, w_gate, w_up, w_down, activation=activation,
                      check_indices=check_indices), zero
  e = w_up.shape[0]
  if check_indices:
    check_experts(experts, e, "moe_ffn")
  if experts.size == 0:
    return jnp.zeros_like(x), zero
  valid = valid_experts(experts, e)
  weights = jnp.where(valid, weights.astype(jnp.float32), 0.0)
  if dispatch == "loop":
    y, dropped = _loop(x, weights, experts, w_gate, w_up, w_down, act), zero
  elif dispatch == "dropless":
    y, dropped = _dropless(x, weights, experts, valid, w_gate, w_up, w_down, act), zero
  else:
    y, dropped = _capacity(x, weights, experts, w_gate, w_up, w_down, act,
                           capacity_factor)
  return y.astype(x.dtype), dropped


def moe_decode(x: jax.Array, weights: jax.Array, experts: jax.Array,
               w_gate: jax.Array | None, w_up: jax.Array, w_down: jax.Array, *,
               activation: Activation = "silu", check_indices: bool = False
               ) -> jax.Array:
  """Small-batch (decode) path: y [T,D] reading only the T·k selected weight slices.

  Gathers w[experts] → [T,k,D,F] / [T,k,F,D] and does per-(token, slot) matmuls:
  h_tj = act(x_t W_gate[e_tj]) ⊙ x_t W_up[e_tj], y_t = Σ_j weights_tj · h_tj W_down[e_tj].
  Memory traffic is T·k·3·D·F weights instead of E·3·D·F, so it wins when T·k < E.
  Invalid ids (outside [0, E)) contribute exactly 0, as in `moe_ffn`.
  """
  _check_shapes(x, weights, experts, w_gate, w_up, w_down)
  act = _activation(activation)
  e = w_up.shape[0]
  if check_indices:
    check_experts(experts, e, "moe_decode")
  valid = valid_experts(experts, e)
  safe = jnp.where(valid, experts, 0)       # gathers a real row; masked out below
  up = jnp.einsum("td,tkdf->tkf", x, w_up[safe])
  if w_gate is None:
    h = act(up)
  else:
    h = act(jnp.einsum("td,tkdf->tkf", x, w_gate[safe])) * up
  out = jnp.einsum("tkf,tkfd->tkd", h, w_down[safe]).astype(jnp.float32)
  out = jnp.where(valid[..., None], out, 0.0)
  y = jnp.einsum("tk,tkd->td", weights.astype(jnp.float32), out)
  return y.astype(x.dtype)
