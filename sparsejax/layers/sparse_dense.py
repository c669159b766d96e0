"""Q-Sparse and BitNet b1.58 linear projections: the "qsparse", "bitnet" and
"bitnet_qsparse" entries of the linear registry (docs/qsparse_bitnet.md).

Both modules are drop-in replacements for `Dense` (same constructor, same single
"kernel" param with the same shape and logical axes — so a dense checkpoint can be
continue-trained as Q-Sparse or BitNet), selected from the config alone:

    config.model.linear = "qsparse"          # options: topk_ratio, mode, n, m, rescale, impl
    config.model.linear = "bitnet"           # options: weights
    config.model.linear = "bitnet_qsparse"   # options: topk_ratio, mode, n, m, impl,
                                             #   weights

The sparsified/quantized input of a projection is its whole per-token input vector: for
o_proj (x [B, T, H, Dh], contract_dims=2) that is the concatenated heads, flattened to
H·Dh features. Sparsifying modules sow "act_sparsity" (the fraction of exactly-zero
entries of the input fed to the matmul, natural zeros included; float32 scalar; 0 for an
empty input) into the "metrics" collection, logged per projection, e.g.
`block_0/attention/q_proj/act_sparsity`. Embeddings and lm_head are not built through
the registry and stay full precision.

The top-k runs through `sparsejax.ops.topk_sparsify` with the options' `impl`: on a
sharded model with a Pallas impl the kernel runs per shard inside `jax.shard_map` (the
token rows split over the batch mesh axes), since XLA cannot partition a Pallas call.

BitNet weights: `weights="latent"` (training) holds the full-precision "kernel" and
quantizes it on the fly; `weights="ternary"` (inference on an exported model, see
`sparsejax.train.export`) holds its int8 "codes" (same shape and logical axes as the
kernel) and float32 "scale" instead, and computes bit-identical outputs to the latent
module whose kernel quantizes to them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.layers import registry
from sparsejax.layers.dense import Dense, contract
from sparsejax.ops.dispatch import IMPLS
from sparsejax.ops.quant import EPS as TERNARY_EPS
from sparsejax.ops.quant import fake_absmax, fake_ternary
from sparsejax.ops.topk import nm_sparsify, topk_sparsify
from sparsejax.validation import check, check_choice

MODES = ("topk", "nm")
WEIGHTS = ("latent", "ternary")


def topk_count(topk_ratio: float, d: int) -> int:
  """k = min(d, max(1, floor(topk_ratio · d))): the entries kept per token of a
  d-vector (0 only for d = 0).

  The floor tolerates float error in the product (0.29 · 100 keeps 29, not 28).
  """
  return min(d, max(1, math.floor(topk_ratio * d + 1e-9)))


def _check_sparsity_args(module, d: int) -> None:
  where = f"{type(module).__name__} {module.name!r}"
  if module.mode not in MODES:
    raise ValueError(f"{where}: mode={module.mode!r} must be one of {MODES}")
  if module.mode == "topk" and not 0 < module.topk_ratio <= 1:
    raise ValueError(f"{where}: topk_ratio={module.topk_ratio!r} must be in (0, 1] "
                     "(the fraction of input entries kept)")
  if module.mode == "nm":
    if not 1 <= module.n <= module.m:
      raise ValueError(f"{where}: n={module.n} must be in [1, m={module.m}]")
    if d % module.m:
      raise ValueError(f"{where}: N:M needs m={module.m} to divide the input size {d} "
                       "(set linear_options.m to a divisor of every projection input)")


def _sparsify(module, x: jax.Array, rescale: bool) -> jax.Array:
  """Top-k (or N:M) of x [..., d] along the last axis, STE gradient; sows the sparsity."""
  d = x.shape[-1]
  _check_sparsity_args(module, d)
  if module.mode == "nm":
    y = nm_sparsify(x, module.n, module.m)
  else:
    y = topk_sparsify(x, topk_count(module.topk_ratio, d), rescale=rescale,
                      impl=module.impl)
  sparsity = jnp.mean((y == 0).astype(jnp.float32)) if y.size else jnp.float32(0)
  module.sow("metrics", "act_sparsity", sparsity)
  return y


def _kernel(module, in_dims) -> jax.Array:
  init = nn.with_logical_partitioning(nn.initializers.normal(module.init_std),
                                      module.kernel_axes)
  return module.param("kernel", init, (*in_dims, *module.features), module.param_dtype)


def _flatten_features(x: jax.Array, contract_dims: int) -> jax.Array:
  """x [..., *in_dims] -> [..., prod(in_dims)] (explicit size: no tokens is allowed)."""
  lead = x.ndim - contract_dims
  return x.reshape(*x.shape[:lead], math.prod(x.shape[lead:]))


class SparseDense(Dense):
  """Q-Sparse linear: y = TopK(x) · W (or N:M(x) · W), straight-through gradient.

  x: [..., *in_dims] with in_dims the last `contract_dims` axes; the top-k is taken per
  token over the flattened in_dims (d = prod(in_dims)), keeping k = max(1,
  floor(topk_ratio · d)) entries of largest |x| (ties: lowest index). With
  mode="nm", keeps the n largest of every m consecutive flattened entries (topk_ratio
  unused). ∂L/∂x = ∂L/∂(sparse x): the input gradient equals `Dense`'s.
  """
  topk_ratio: float = 0.7     # fraction of the d input entries kept per token
  mode: str = "topk"          # "topk" | "nm"
  n: int = 2
  m: int = 4
  rescale: bool = False       # y ← y · ‖x‖₂ / ‖y‖₂ per token (mode="topk" only)
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _kernel(self, x.shape[x.ndim - self.contract_dims:])
    x = x.astype(self.dtype)
    if self.rescale and self.mode == "nm":
      raise ValueError(f"SparseDense {self.name!r}: rescale=True needs mode='topk'")
    y = _sparsify(self, _flatten_features(x, self.contract_dims), self.rescale)
    return contract(y.reshape(x.shape), kernel.astype(self.dtype), self.contract_dims)


class BitDense(Dense):
  """BitLinear (BitNet b1.58): y = absmax8(RMSNorm(x)) · ternary(W), STE gradients.

  x_n = x / sqrt(mean(x²) + norm_eps) over the flattened in_dims (no learned gain),
  x_q = fake_absmax(x_n, 8) per token, w_q = fake_ternary(W) (one scale for the whole
  kernel), y = x_q · w_q. The latent kernel stays full precision. The norm is computed
  in float32; the gradient flows through it (only the quantizers are straight-through).

  With `qsparse=True` (BitNet + Q-Sparse): y = (Q(x) ⊙ M) · Ŵ, the top-k (or N:M) mask
  M computed on the quantized activations Q(x) (ties, which int8 codes make common,
  keep the lowest index), and "act_sparsity" is sown.

  With `weights="ternary"` (inference only: int params are not trainable) the params
  are "codes" (int8 in {−1, 0, 1}, the kernel's shape and logical axes) and "scale"
  (float32 scalar) as returned by `ternary_quantize(kernel)`, and w_q = codes · scale
  is computed exactly as `fake_ternary` computes its forward value, so the output is
  bitwise equal to the latent module's.
  """
  norm_eps: float = 1e-6
  qsparse: bool = False
  topk_ratio: float = 0.7
  mode: str = "topk"
  n: int = 2
  m: int = 4
  impl: str = "auto"
  weights: str = "latent"     # "latent" (float kernel: training) | "ternary" (inference)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dims = x.shape[x.ndim - self.contract_dims:]
    if self.weights == "latent":
      w_q = fake_ternary(_kernel(self, in_dims))
    elif self.weights == "ternary":
      w_q = self._ternary_weights(in_dims)
    else:
      raise ValueError(f"BitDense {self.name!r}: weights={self.weights!r} must be one "
                       f"of {WEIGHTS}")
    xf = _flatten_features(x, self.contract_dims).astype(jnp.float32)
    x_n = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.norm_eps)
    x_q = fake_absmax(x_n, 8)
    if self.qsparse:
      x_q = _sparsify(self, x_q, rescale=False)
    return contract(x_q.astype(self.dtype).reshape(x.shape), w_q.astype(self.dtype),
                    self.contract_dims)

  def _ternary_weights(self, in_dims) -> jax.Array:
    """codes · scale in param_dtype, the same ops (and dtypes) as `fake_ternary`."""
    shape = (*in_dims, *self.features)
    scale_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    std = self.init_std

    def init_codes(key, shape, dtype):  # a fresh ternary N(0, std²) kernel
      w = jax.random.normal(key, shape, jnp.float32)
      return jnp.clip(jnp.round(w / math.sqrt(2 / math.pi)), -1, 1).astype(dtype)

    def init_scale(key, shape, dtype):  # E|N(0, std²)| = std · sqrt(2/π)
      del key
      return jnp.full(shape, max(std * math.sqrt(2 / math.pi), TERNARY_EPS), dtype)

    codes = self.param("codes",
                       nn.with_logical_partitioning(init_codes, self.kernel_axes),
                       shape, jnp.int8)
    scale = self.param("scale", nn.with_logical_partitioning(init_scale, ()), (),
                       scale_dtype)
    return (codes.astype(scale.dtype) * scale).astype(self.param_dtype)


def _check_weights(prefix: str, weights: str) -> None:
  check_choice(f"{prefix}.weights", weights, WEIGHTS)


@dataclasses.dataclass(frozen=True)
class SparsityOptions:
  """The activation-sparsity fields shared by "qsparse" and "bitnet_qsparse"."""
  KERNEL_IMPL_FIELDS: ClassVar[tuple[str, ...]] = ("impl",)
  topk_ratio: float = 0.7     # fraction KEPT per token (0.7 = "70% top-K"); mode="topk"
  mode: str = "topk"          # "topk" | "nm" (block Q-Sparse: n of every m kept)
  n: int = 2
  m: int = 4
  impl: str = "auto"          # top-k implementation: "auto" | "xla" | "pallas" | "interpret"

  def validate(self, prefix: str) -> None:
    check(0 < self.topk_ratio <= 1, f"{prefix}.topk_ratio", self.topk_ratio,
          "in (0, 1] (the fraction of input entries kept per token)")
    check_choice(f"{prefix}.mode", self.mode, MODES)
    check(self.m >= 1, f"{prefix}.m", self.m, ">= 1")
    check(1 <= self.n <= self.m, f"{prefix}.n", self.n, f"in [1, m={self.m}]")
    check_choice(f"{prefix}.impl", self.impl, IMPLS)


@dataclasses.dataclass(frozen=True)
class QSparseOptions(SparsityOptions):
  """Options of "qsparse"."""
  rescale: bool = False       # L2 rescale of the kept entries (paper text; off in code)

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    check(not (self.rescale and self.mode == "nm"), f"{prefix}.rescale", self.rescale,
          "False when mode='nm'")


@dataclasses.dataclass(frozen=True)
class BitNetOptions:
  """Options of "bitnet"."""
  weights: str = "latent"     # "latent" (train) | "ternary" (exported inference model)

  def validate(self, prefix: str) -> None:
    _check_weights(prefix, self.weights)


@dataclasses.dataclass(frozen=True)
class BitQSparseOptions(SparsityOptions):
  """Options of "bitnet_qsparse" (the fields of "qsparse" but `rescale`; `weights`)."""
  weights: str = "latent"     # "latent" (train) | "ternary" (exported inference model)

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    _check_weights(prefix, self.weights)


@registry.register("linear", "qsparse", options=QSparseOptions)
def build_qsparse(cfg, options: QSparseOptions, layer):
  del cfg, layer
  return functools.partial(SparseDense, **dataclasses.asdict(options))


@registry.register("linear", "bitnet", options=BitNetOptions)
def build_bitnet(cfg, options: BitNetOptions, layer):
  del layer
  return functools.partial(BitDense, norm_eps=cfg.norm_eps, weights=options.weights)


@registry.register("linear", "bitnet_qsparse", options=BitQSparseOptions)
def build_bitnet_qsparse(cfg, options: BitQSparseOptions, layer):
  del layer
  return functools.partial(BitDense, norm_eps=cfg.norm_eps, qsparse=True,
                           **dataclasses.asdict(options))
