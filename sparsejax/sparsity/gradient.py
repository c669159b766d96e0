"""Gradient sparsification for data-parallel training: top-k with error feedback and
Deep Gradient Compression (DGC).

Each data-parallel device compresses its own gradient before the exchange, sending per
tensor only the k largest-|·| entries as (values, flat indices):

  Top-k with error feedback (Stich et al. 2018, Karimireddy et al. 2019):
      p = e + g;   send C(p) = top-k(|p|);   e ← p − C(p)
  DGC (Lin et al. 2018), for momentum SGD:
      g ← g · min(1, (c·√N) / ‖g‖)                  local gradient clipping
      u ← m·u + g;   v ← v + u;   send C(v)          momentum correction
      v ← v ⊙ ¬sent;   u ← u ⊙ ¬sent                 (u: momentum factor masking)

The receivers scatter-add the N devices' (values, indices) and divide by N: the mean of
the sent sparse gradients replaces the dense all-reduce's mean gradient.

Wire format (`value_dtype`, `index_dtype`): values float32 or bfloat16, indices int32
(flat in the whole tensor) or uint16. With uint16 the top-k is chunked: the flat tensor
is cut into chunks of 2^16 entries (the last one padded) and each chunk sends its own k
largest entries with chunk-local 16-bit indices, so a sent entry costs 2 + 2 = 4 bytes
instead of 4 + 4. Rounding the values to bfloat16 loses nothing under error feedback:
the sender keeps p − float32(bfloat16(p)) of each sent entry in its residual (DGC: in
the velocity v), so the rounding error is sent later, like the unsent entries.

Only matrices (ndim ≥ 2) are sparsified, as in DGC's reference code: vectors and scalars
(norm gains, biases) are a small share of the bytes and are exchanged dense (for DGC
their momentum u ← m·u + g is sent, unmasked). With a ratio of 1 every tensor is dense.
The ratio warms up over the first steps through `warmup_ratios` (DGC's 75% → 93.75% →
98.4% → 99.6% sparsity, i.e. densities 0.25, 0.0625, 0.0156, 0.004) and then stays at
`ratio` (e.g. 0.001 = 99.9% sparsity). Shapes are static, so each warm-up stage has
its own k per tensor (`stage_ks`).

Everything here works on one device's local arrays; `exchange` names the mesh axis of
the collectives and must run inside `jax.shard_map` over it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from sparsejax.validation import check, check_choice

METHODS = ("none", "topk_ef", "dgc")
# DGC's warm-up densities: 75%, 93.75%, 98.4375%, 99.6% sparsity.
DGC_WARMUP_RATIOS = (0.25, 0.0625, 0.015625, 0.004)
VALUE_DTYPES = ("float32", "bfloat16")
INDEX_DTYPES = ("int32", "uint16")
CHUNK_UINT16 = 1 << 16     # entries per top-k chunk with uint16 indices


@dataclasses.dataclass(frozen=True)
class GradCompressionConfig:
  """`config.train.grad_compression`.

  method:        "none" (dense all-reduce), "topk_ef" (top-k + error feedback) or "dgc".
  ratio:         fraction of each matrix's entries a device sends, in (0, 1]
                 (0.001 = DGC's 99.9% sparsity).
  warmup_steps:  steps over which the ratio warms up (0 = none); split evenly over
                 `warmup_ratios`, each raised to at least `ratio`.
  warmup_ratios: the warm-up stages' ratios, each in (0, 1].
  momentum:      DGC's momentum-correction factor m, in [0, 1).
  value_dtype:   dtype of the sent values, "float32" or "bfloat16" (the rounding error
                 stays in the sender's residual / velocity).
  index_dtype:   dtype of the sent indices: "int32" (flat in the whole tensor) or
                 "uint16" (top-k per chunk of 2^16 flat entries, chunk-local indices).
  """
  method: str = "none"
  ratio: float = 0.001
  warmup_steps: int = 0
  warmup_ratios: tuple[float, ...] = DGC_WARMUP_RATIOS
  momentum: float = 0.9
  value_dtype: str = "float32"
  index_dtype: str = "int32"

  def validate(self, prefix: str = "config.train.grad_compression") -> None:
    check_choice(f"{prefix}.method", self.method, METHODS)
    check(0 < self.ratio <= 1, f"{prefix}.ratio", self.ratio, "in (0, 1]")
    check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps,
          ">= 0 (0 = no warm-up)")
    check(self.warmup_steps == 0 or len(self.warmup_ratios) >= 1,
          f"{prefix}.warmup_ratios", self.warmup_ratios,
          "non-empty when warmup_steps > 0")
    for i, r in enumerate(self.warmup_ratios):
      check(0 < r <= 1, f"{prefix}.warmup_ratios[{i}]", r, "in (0, 1]")
    check(0 <= self.momentum < 1, f"{prefix}.momentum", self.momentum, "in [0, 1)")
    check_choice(f"{prefix}.value_dtype", self.value_dtype, VALUE_DTYPES)
    check_choice(f"{prefix}.index_dtype", self.index_dtype, INDEX_DTYPES)

  @property
  def enabled(self) -> bool:
    return self.method != "none"

  def chunk(self, size: int) -> int:
    """Entries per top-k chunk of a tensor of `size` entries (the whole tensor with
    int32 indices, at most 2^16 with uint16)."""
    return size if self.index_dtype == "int32" else min(size, CHUNK_UINT16)

  def stage_ratios(self) -> tuple[float, ...]:
    """The ratio of each stage: the warm-up stages (none without warm-up), then `ratio`."""
    warm = self.warmup_ratios if self.warmup_steps else ()
    return tuple(max(r, self.ratio) for r in warm) + (self.ratio,)


def stage_index(cfg: GradCompressionConfig, step: jax.Array) -> jax.Array:
  """int32 stage of optimizer step `step` (0-based): warm-up stage ⌊step·S/W⌋ for step
  < W = warmup_steps (S warm-up stages), then the final stage S."""
  stages = len(cfg.stage_ratios()) - 1
  if stages == 0:
    return jnp.zeros((), jnp.int32)
  step = jnp.asarray(step, jnp.int32)
  warm = (step * stages) // cfg.warmup_steps
  return jnp.where(step < cfg.warmup_steps, warm, stages).astype(jnp.int32)


def num_kept(ratio: float, size: int) -> int:
  """k = ⌈ratio·size⌉, at least 1 and at most size."""
  return min(size, max(1, math.ceil(ratio * size - 1e-9)))


def stage_ks(cfg: GradCompressionConfig, params: Any) -> list[Any]:
  """Per stage, a pytree like `params` of k per chunk (`cfg.chunk`) of each tensor
  (None: the tensor is sent dense)."""
  def ks(ratio):
    def one(p):
      chunk = cfg.chunk(math.prod(p.shape))
      k = num_kept(ratio, chunk)
      return k if len(p.shape) >= 2 and k < chunk else None
    return jax.tree.map(one, params)
  return [ks(r) for r in cfg.stage_ratios()]


def topk_compress(x: jax.Array, k: int, chunk: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(values [C, k] of x's dtype, int32 flat row-major indices [C, k]) of the k largest
  |x| in each of the C = ⌈size/chunk⌉ chunks of `chunk` flat entries (default: one
  chunk, the whole tensor). The last chunk is padded with entries that rank below
  every real one; a padding entry is picked only when k exceeds the chunk's real
  entries, with value 0 and an index ≥ size.

  Exact top-k per chunk with the library's tie rule (`sparsejax.ops.topk`: `lax.top_k`
  on |x|, ties keep the lower index; NaN ranks above +inf)."""
  flat = x.reshape(-1)
  chunk = chunk or flat.size
  num = -(-flat.size // chunk)
  pad = num * chunk - flat.size
  keys = jnp.pad(jnp.abs(flat), (0, pad), constant_values=-1).reshape(num, chunk)
  _, local = lax.top_k(keys, k)
  indices = local.astype(jnp.int32) + chunk_offsets(num, chunk)
  values = jnp.pad(flat, (0, pad))[indices]
  return values, indices


def chunk_offsets(num: int, chunk: int) -> jax.Array:
  """int32 [num, 1]: the flat index of each chunk's first entry."""
  return (jnp.arange(num, dtype=jnp.int32) * chunk)[:, None]


def to_wire(cfg: GradCompressionConfig, values: jax.Array, indices: jax.Array,
            chunk: int) -> tuple[jax.Array, jax.Array]:
  """The arrays a device sends for `topk_compress`'s [C, k] output: values in
  `cfg.value_dtype`, indices in `cfg.index_dtype` (with uint16: chunk-local)."""
  if cfg.index_dtype == "uint16":
    indices = (indices - chunk_offsets(indices.shape[-2], chunk)).astype(jnp.uint16)
  return values.astype(cfg.value_dtype), indices


def from_wire(values: jax.Array, indices: jax.Array, chunk: int, dtype: Any
              ) -> tuple[jax.Array, jax.Array]:
  """Inverse of `to_wire` on [..., C, k] arrays (e.g. [N, C, k] gathered from N
  devices): (values in `dtype`, int32 flat indices)."""
  if indices.dtype == jnp.uint16:
    indices = indices.astype(jnp.int32) + chunk_offsets(indices.shape[-2], chunk)
  return values.astype(dtype), indices


def scatter_add(values: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Dense array of `shape`: Σ of values at their flat indices (any leading dims of
  values/indices, e.g. [N, C, k] gathered from N devices, are summed too). Indices
  ≥ size (a chunk's padding) are dropped."""
  dense = jnp.zeros((math.prod(shape),), values.dtype)
  return dense.at[indices.reshape(-1)].add(values.reshape(-1), mode="drop").reshape(shape)


def subtract_at(x: jax.Array, indices: jax.Array, sent: jax.Array) -> jax.Array:
  """x with sent[j] subtracted at flat index indices[j] (indices ≥ size dropped): what
  the sender keeps of the entries it sent. With sent = float32(bfloat16(x)) this is the
  rounding error, which float32 holds exactly."""
  flat = x.reshape(-1)
  idx = indices.reshape(-1)
  left = flat.at[idx].get(mode="fill", fill_value=0) - sent.reshape(-1).astype(x.dtype)
  return flat.at[idx].set(left, mode="drop").reshape(x.shape)


def zero_at(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x with the entries at the flat `indices` set to 0 (indices ≥ size dropped)."""
  return x.reshape(-1).at[indices.reshape(-1)].set(0, mode="drop").reshape(x.shape)


def encode(cfg: GradCompressionConfig, x: jax.Array, k: int
           ) -> tuple[tuple[jax.Array, jax.Array], jax.Array, jax.Array]:
  """((wire values, wire indices), int32 flat indices, x minus what was sent) for the
  top-k per chunk of x (`cfg.chunk`) in `cfg`'s wire format."""
  chunk = cfg.chunk(x.size)
  values, indices = topk_compress(x, k, chunk)
  wire = to_wire(cfg, values, indices, chunk)
  if cfg.value_dtype == "float32":
    return wire, indices, zero_at(x, indices)
  sent, _ = from_wire(*wire, chunk, x.dtype)
  return wire, indices, subtract_at(x, indices, sent)


def error_feedback(cfg: GradCompressionConfig, residual: jax.Array, grad: jax.Array,
                   k: int) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """((wire values, wire indices), new residual): p = e + g, send C(p) = top-k(p) in
  the wire format, e ← p − C(p) (C(p) as received, rounding included)."""
  wire, _, residual = encode(cfg, residual + grad, k)
  return wire, residual


def dgc_accumulate(u: jax.Array, v: jax.Array, grad: jax.Array, momentum: float
                   ) -> tuple[jax.Array, jax.Array]:
  """Momentum correction: u ← m·u + g; v ← v + u."""
  u = momentum * u + grad
  return u, v + u


def clip_local(grads: Any, max_norm: float, num_devices: int) -> Any:
  """DGC's local gradient clipping: scales a device's gradient pytree to global norm at
  most max_norm·√N (0: no clipping).

  `grads` is the gradient of the mean loss over the device's own batch shard, and the
  exchange averages the N devices' gradients. Lin et al. (2018) clip each node's share
  G_k = local / N of a summed gradient at c·N^(−1/2) (N independent, identically
  distributed shares sum to about √N times one share's norm); for the local mean
  gradient that threshold is N · c · N^(−1/2) = c·√N, which clips the devices about as
  often as clipping the averaged gradient at c would."""
  if max_norm <= 0:
    return grads
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                      for g in jax.tree.leaves(grads)))
  scale = jnp.minimum(1.0, (max_norm * math.sqrt(num_devices)) / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


def init_state(cfg: GradCompressionConfig, params: Any) -> dict:
  """One device's compression state (zeros like the params): {"residual"} for
  topk_ef, {"momentum", "velocity"} for dgc, {} for none."""
  zeros = lambda: jax.tree.map(jnp.zeros_like, params)
  if cfg.method == "topk_ef":
    return {"residual": zeros()}
  if cfg.method == "dgc":
    return {"momentum": zeros(), "velocity": zeros()}
  return {}


def payload(values: jax.Array, indices: jax.Array | None = None) -> int:
  """Bytes of the arrays one device contributes to the exchange."""
  return values.size * values.dtype.itemsize + (
      0 if indices is None else indices.size * indices.dtype.itemsize)


def compress_and_exchange(cfg: GradCompressionConfig, state: dict, grads: Any, ks: Any,
                          axis_name: str | tuple[str, ...], num_devices: int
                          ) -> tuple[Any, dict, int]:
  """One device's step of the method: (mean over devices of the sent gradients, new
  state, bytes this device sent). Runs inside `jax.shard_map` over `axis_name`.

  Sparsified tensors: the wire (values, indices) are `all_gather`ed over the axis,
  decoded to the gradient's dtype and scatter-added; dense tensors are `psum`med. Both
  are then divided by N."""
  leaves, treedef = jax.tree.flatten(grads)
  k_leaves = treedef.flatten_up_to(ks)
  if cfg.method == "topk_ef":
    slots = {"residual": treedef.flatten_up_to(state["residual"])}
  else:
    slots = {name: treedef.flatten_up_to(state[name]) for name in ("momentum", "velocity")}
  new = {name: list(vals) for name, vals in slots.items()}
  means, sent_bytes = [], 0
  for i, (g, k) in enumerate(zip(leaves, k_leaves)):
    if cfg.method == "topk_ef":
      if k is None:
        dense, wire = g, None
      else:
        wire, new["residual"][i] = error_feedback(cfg, slots["residual"][i], g, k)
    else:
      u, v = slots["momentum"][i], slots["velocity"][i]
      if k is None:
        new["momentum"][i] = dense = cfg.momentum * u + g
        wire = None
      else:
        u, v = dgc_accumulate(u, v, g, cfg.momentum)
        wire, indices, new["velocity"][i] = encode(cfg, v, k)
        new["momentum"][i] = zero_at(u, indices)
    if wire is None:
      sent_bytes += payload(dense)
      means.append(lax.psum(dense, axis_name) / num_devices)
    else:
      sent_bytes += payload(*wire)
      gathered = [lax.all_gather(a, axis_name) for a in wire]
      values, indices = from_wire(*gathered, cfg.chunk(g.size), g.dtype)
      means.append(scatter_add(values, indices, g.shape) / num_devices)
  new_state = {name: treedef.unflatten(vals) for name, vals in new.items()}
  return treedef.unflatten(means), new_state, sent_bytes
