"""One-shot post-training pruning of a linear layer: magnitude, Wanda and SparseGPT.

A layer computes y = x W with a Flax kernel W of shape [in, out]; calibration inputs give
the per-input activation norm ‖X_i‖₂ (Wanda) or the Hessian H = (2/N) Σ x xᵀ [in, in]
(SparseGPT), both accumulated by `sparsejax.sparsity.hessian`. Masks are bool [in, out],
True where a weight is kept.

Granularity (shared by all three methods):
  * unstructured (`nm=None`): magnitude and Wanda prune floor(sparsity·in) weights of
    every output unit (column of W), the comparison group of Wanda (Sun et al. 2024,
    Sec. 3); SparseGPT prunes floor(sparsity·c·out) weights of every block of c input
    columns (below);
  * N:M (`nm=(n, m)`): of every m consecutive inputs of an output unit, the n with the
    largest scores are kept (density n/m; `sparsity` must be 1 − n/m, e.g. 0.5 for 2:4
    and 4:8 — the references' `prune_n` is the number pruned, equal to n for these).
Ties: among equal scores the lower input index is pruned first (a stable ascending sort,
as the references). Exactly k = floor(sparsity·size) weights are pruned per group, as in
Wanda's reference code; SparseGPT's (and the layer-wise magnitude baseline in Wanda's)
prunes every score ≤ the (k+1)-th smallest, i.e. k + 1 plus ties. Sparsity 0 prunes
nothing.

SparseGPT (Frantar & Alistarh 2023, Alg. 1), with W transposed to [out, in] internally:
  1. dead inputs (H_ii = 0) get H_ii = 1 and their weights zeroed;
  2. H ← H + λI, λ = damp·mean(diag H); U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU);
  3. for each block of `block_size` input columns [i1, i2):
     unstructured: score w²/U_jj² over the block × outputs (W as updated so far); prune
     its floor(sparsity·c·out) smallest (c = the block's column count);
     for each column j of the block: N:M only — at j ≡ 0 (mod m) keep the n largest
     scores w²/U_jj² of columns j..j+m−1 of each output; then q = w_j with pruned
     entries 0, err = (w_j − q)/U_jj, W[:, j:i2] −= err ⊗ U[j, j:i2] (OBS update);
     finally W[:, i2:] −= Err · U[i1:i2, i2:] (lazy batch update).
Computed in float32 (float64 when x64 is enabled on CPU); the result is cast to the
kernel's dtype with pruned entries exactly 0.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

DAMP_RETRIES = 3      # extra Cholesky attempts, each with 10x the damping


def _check_kernel(kernel, fn: str) -> jax.Array:
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"{fn}: kernel must be a floating [in, out] array, got "
                     f"{kernel.dtype}{list(kernel.shape)}")
  return kernel


def _check_sparsity(sparsity) -> float:
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating,
                                                             np.integer)):
    raise ValueError(f"sparsity={sparsity!r} must be a Python float in [0, 1)")
  if not 0 <= sparsity < 1:
    raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
  return float(sparsity)


def _check_nm(nm, sparsity: float, in_features: int) -> tuple[int, int] | None:
  if nm is None:
    return None
  try:
    n, m = (operator.index(v) for v in nm)
  except (TypeError, ValueError):
    raise ValueError(f"nm={nm!r} must be None or a pair of ints (n, m)") from None
  if not 1 <= n <= m:
    raise ValueError(f"nm={nm!r}: n must be in [1, m]")
  if in_features % m:
    raise ValueError(f"nm={nm!r}: m={m} must divide the input size {in_features}")
  if not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
    raise ValueError(f"sparsity={sparsity} contradicts nm={nm!r}, whose sparsity is "
                     f"1 - n/m = {1 - n / m:g}")
  return n, m


def _keep_mask(score: jax.Array, k, axis: int) -> jax.Array:
  """False at the k smallest scores along `axis` (ties: lower index first); k may be a
  traced int."""
  order = jnp.argsort(score, axis=axis, stable=True)
  rank = jnp.argsort(order, axis=axis, stable=True)
  return rank >= k


def _nm_keep(score: jax.Array, n: int, m: int) -> jax.Array:
  """score [in, out] → keep the n largest of every m consecutive inputs per output."""
  d, out = score.shape
  groups = score.reshape(d // m, m, out)
  return _keep_mask(groups, m - n, axis=1).reshape(d, out)


def _score_mask(score: jax.Array, sparsity: float, nm) -> jax.Array:
  if nm is not None:
    return _nm_keep(score, *nm)
  return _keep_mask(score, int(sparsity * score.shape[0]), axis=0)


def magnitude_mask(kernel: jax.Array, sparsity: float, *, nm: tuple[int, int] | None = None,
                   scope: str = "output") -> jax.Array:
  """Magnitude pruning mask: keep the largest |W|.

  Args:
    kernel: [in, out] floating weights.
    sparsity: fraction pruned, in [0, 1) (with `nm`, must be 1 − n/m).
    nm: None (unstructured) or (n, m): keep n of every m consecutive inputs per output.
    scope: unstructured comparison group — "output" (default): floor(sparsity·in) per
      output unit, the same granularity as Wanda (so `wanda_mask` with act_norm = 1 is
      this mask); "layer": floor(sparsity·in·out) over the whole kernel, the magnitude
      baseline of the Wanda and SparseGPT reference code. Ignored with `nm`.

  Returns:
    bool [in, out], True where kept.
  """
  kernel = _check_kernel(kernel, "magnitude_mask")
  sparsity = _check_sparsity(sparsity)
  nm = _check_nm(nm, sparsity, kernel.shape[0])
  score = jnp.abs(kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32)))
  if scope == "layer" and nm is None:
    return _keep_mask(score.reshape(-1), int(sparsity * score.size), axis=0
                      ).reshape(score.shape)
  if scope not in ("output", "layer"):
    raise ValueError(f"scope={scope!r} must be 'output' or 'layer'")
  return _score_mask(score, sparsity, nm)


def wanda_mask(kernel: jax.Array, act_norm: jax.Array, sparsity: float, *,
               nm: tuple[int, int] | None = None) -> jax.Array:
  """Wanda mask (Sun et al. 2024, Eq. 1): keep the largest S_ij = |W_ij|·‖X_i‖₂.

  Args:
    kernel: [in, out] floating weights.
    act_norm: [in] ‖X_i‖₂ over all calibration tokens (`jnp.sqrt` of
      `accumulate_act_sqnorm`'s result).
    sparsity: fraction pruned per output unit, in [0, 1) (with `nm`, must be 1 − n/m).
    nm: None: prune floor(sparsity·in) per output unit; (n, m): keep n of every m
      consecutive inputs per output unit.

  Returns:
    bool [in, out], True where kept. No weight update.
  """
  kernel = _check_kernel(kernel, "wanda_mask")
  act_norm = jnp.asarray(act_norm)
  if act_norm.shape != kernel.shape[:1]:
    raise ValueError(f"wanda_mask: act_norm of shape {act_norm.shape} must have shape "
                     f"[in] = {kernel.shape[:1]}")
  sparsity = _check_sparsity(sparsity)
  nm = _check_nm(nm, sparsity, kernel.shape[0])
  dt = jnp.promote_types(kernel.dtype, jnp.float32)
  score = jnp.abs(kernel.astype(dt)) * act_norm.astype(dt)[:, None]
  return _score_mask(score, sparsity, nm)


def _compute_dtype():
  """float64 when x64 is enabled and the default backend is the CPU, else float32."""
  if jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64 and \
      jax.default_backend() == "cpu":
    return jnp.float64
  return jnp.float32


@jax.jit
def _inverse_cholesky(h, damp):
  """U upper triangular with UᵀU = (H + damp·mean(diag H)·I)⁻¹ (NaN if not PD)."""
  d = h.shape[0]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(d, dtype=h.dtype)
  lower = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(d, dtype=h.dtype))
  return jnp.triu(jnp.linalg.cholesky(hinv, upper=True))


def _hessian_factor(h, damp: float):
  """Dead inputs' diagonal set to 1, then U; retries with 10x damping (warning) when H is
  not positive definite, then a ValueError."""
  dead = jnp.diag(h) == 0
  h = jnp.where(jnp.diag(dead), jnp.ones_like(h), h)
  for attempt in range(DAMP_RETRIES + 1):
    d = damp * 10 ** attempt
    u = _inverse_cholesky(h, jnp.asarray(d, h.dtype))
    if bool(jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diag(u) > 0)):
      if attempt:
        warnings.warn(f"sparsegpt_prune: hessian is not positive definite with damp={damp}; "
                      f"used damp={d:g}", RuntimeWarning, stacklevel=3)
      return u, dead
  raise ValueError(f"sparsegpt_prune: hessian is not positive definite even with damping "
                   f"damp={d:g} (λ = damp·mean(diag H)); it must be a symmetric "
                   f"positive semi-definite Hessian of calibration inputs")


@functools.partial(jax.jit, static_argnames=("nm", "block_size", "in_features"))
def _sparsegpt_blocks(w, u, ks, *, nm, block_size, in_features):
  """The block loop of SparseGPT on w [out, in_p] and U [in_p, in_p]: in_p is a multiple
  of block_size, and the columns from `in_features` on are padding (zero weights, U = I
  there, unstructured score +inf). ks [blocks]: the number of weights pruned per block
  (unstructured). Returns (w, prune [out, in_p])."""
  out, in_p = w.shape
  bs = block_size
  n, m = nm if nm is not None else (0, 1)

  def column(i, carry):
    w1, prune, err, u1, d = carry
    if nm is not None:
      group = lax.dynamic_slice_in_dim(w1, i, m, axis=1) ** 2 / \
          lax.dynamic_slice_in_dim(d, i, m) ** 2
      group_prune = ~_keep_mask(group, m - n, axis=1)
      prune = jnp.where(i % m == 0, lax.dynamic_update_slice_in_dim(prune, group_prune, i,
                                                                    axis=1), prune)
    wi = w1[:, i]
    q = jnp.where(prune[:, i], jnp.zeros_like(wi), wi)
    e = (wi - q) / d[i]
    w1 = (w1 - e[:, None] * u1[i][None, :]).at[:, i].set(q)
    return w1, prune, err.at[:, i].set(e), u1, d

  def block(w, xs):
    b, k = xs
    i1 = b * bs
    u_rows = lax.dynamic_slice_in_dim(u, i1, bs, axis=0)
    u1 = lax.dynamic_slice_in_dim(u_rows, i1, bs, axis=1)
    d = jnp.diag(u1)
    w1 = lax.dynamic_slice_in_dim(w, i1, bs, axis=1)
    if nm is None:
      score = w1 ** 2 / d[None, :] ** 2
      padded = (i1 + jnp.arange(bs)) >= in_features
      score = jnp.where(padded[None, :], jnp.inf, score)
      prune = ~_keep_mask(score.reshape(-1), k, axis=0).reshape(out, bs)
    else:
      prune = jnp.zeros((out, bs), jnp.bool_)
    w1, prune, err, _, _ = lax.fori_loop(0, bs, column,
                                         (w1, prune, jnp.zeros_like(w1), u1, d))
    w = w - jnp.matmul(err, u_rows, precision=lax.Precision.HIGHEST)
    return lax.dynamic_update_slice_in_dim(w, w1, i1, axis=1), prune

  w, prunes = lax.scan(block, w, (jnp.arange(ks.shape[0]), ks))
  return w, prunes.transpose(1, 0, 2).reshape(out, in_p)


def sparsegpt_prune(kernel: jax.Array, hessian: jax.Array, sparsity: float, *,
                    nm: tuple[int, int] | None = None, block_size: int = 128,
                    damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT (Frantar & Alistarh 2023, Alg. 1): prune and reconstruct one layer.

  Runs eagerly (the damping retry inspects the Cholesky factor on the host); the block
  loop inside is jitted. Memory: W and H⁻¹'s factor in the compute dtype, [out, in] and
  [in, in] (in rounded up to a multiple of block_size).

  Args:
    kernel: [in, out] floating weights.
    hessian: [in, in] H = (2/N) Σ x xᵀ of the layer's calibration inputs
      (`accumulate_hessian`; any positive multiple gives the same result).
    sparsity: unstructured: fraction pruned in every block of block_size input columns
      × out, in [0, 1); with `nm` it must be 1 − n/m.
    nm: None or (n, m): keep n of every m consecutive inputs per output unit (m must
      divide in and block_size, once block_size is capped at in).
    block_size: input columns per block (mask selection and lazy update), ≥ 1.
    damp: relative damping λ = damp·mean(diag H), > 0; multiplied by 10 up to 3 times
      (with a RuntimeWarning) while H + λI is not numerically positive definite.

  Returns:
    (new_kernel, mask): the updated weights [in, out] in kernel's dtype, exactly 0 where
    mask is False (and on dead inputs, H_ii = 0); mask bool [in, out], True where kept.

  Raises:
    ValueError: bad arguments (named), or H not positive definite after the retries.
  """
  kernel = _check_kernel(kernel, "sparsegpt_prune")
  in_features, out_features = kernel.shape
  hessian = jnp.asarray(hessian)
  if hessian.shape != (in_features, in_features):
    raise ValueError(f"sparsegpt_prune: hessian of shape {hessian.shape} must be [in, in] "
                     f"= {(in_features, in_features)} for a kernel of shape {kernel.shape}")
  if isinstance(hessian, jax.core.Tracer) or isinstance(kernel, jax.core.Tracer):
    raise TypeError("sparsegpt_prune runs eagerly (its damping retry inspects the "
                    "Cholesky factor): call it outside jax.jit / vmap")
  sparsity = _check_sparsity(sparsity)
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or \
      block_size < 1:
    raise ValueError(f"block_size={block_size!r} must be an int >= 1")
  if not (isinstance(damp, (int, float)) and damp > 0 and math.isfinite(damp)):
    raise ValueError(f"damp={damp!r} must be a finite float > 0")
  nm = _check_nm(nm, sparsity, in_features)
  bs = min(int(block_size), in_features)
  if nm is not None and bs % nm[1]:
    raise ValueError(f"block_size={block_size} must be a multiple of m={nm[1]} for nm={nm}")
  dt = _compute_dtype()
  h = hessian.astype(dt)
  if not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError("sparsegpt_prune: hessian contains NaN or inf")
  u, dead = _hessian_factor(h, float(damp))
  w = jnp.where(dead[None, :], 0, kernel.T.astype(dt))
  blocks = -(-in_features // bs)
  pad = blocks * bs - in_features
  w = jnp.pad(w, ((0, 0), (0, pad)))
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
      (jnp.arange(blocks * bs) >= in_features).astype(dt))
  ks = jnp.array([int(min(bs, in_features - b * bs) * out_features * sparsity)
                  for b in range(blocks)], jnp.int32)
  w, prune = _sparsegpt_blocks(w, u, ks, nm=nm, block_size=bs, in_features=in_features)
  mask = ~prune[:, :in_features].T
  new_kernel = jnp.where(mask, w[:, :in_features].T, 0).astype(kernel.dtype)
  return new_kernel, mask
