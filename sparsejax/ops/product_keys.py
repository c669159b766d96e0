"""Product-key retrieval: PKM, UltraMem's TDQKR, and implicit value expansion (IVE).

Shapes use T for tokens (any leading dims flattened by the caller), H heads, n sub-keys
per side, kdim the half-query dim, r the Tucker rank, C the Tucker cores, m = knn.

PKM (Lample et al. 2019):
    s₁ = q₁·K₁ᵀ, s₂ = q₂·K₂ᵀ; top-k of each; the k² candidates score s₁[i]+s₂[j];
    top-k of those; weights = softmax over the k; slot = i·n + j.
TDQKR (UltraMem, Huang et al. 2025, §3):
    S_row[h,i,a] = q_row·K_row[h,i,a,:], S_col likewise            ([T,H,n,r])
    G_c[i,j]     = S_row[i,:] · C_c · S_col[j,:]ᵀ,  G = Σ_c G_c
    candidates   = top-m of S_row·u × top-m of S_col·v, with (u, v) the leading singular
                   vectors of Σ_c C_c (detached; `tucker_rank_one`)
    exact G on the m×m grid → top-m; returns the per-core G_c of the kept slots (raw:
    no softmax, no nonlinearity) and the flat virtual slot i·n + j.
IVE + MCS (UltraMem §4): virtual slot p → p' = perm[p], block e = ⌊p'/N⌋, row
    ρ = p' mod N; chunk c of V[ρ] is scaled by G_c and summed into block e's output —
    expressed as a grouped `memory_lookup` over the table viewed as [N·C, v/C].
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp


def pkm_retrieve(q_row: jax.Array, q_col: jax.Array, keys_row: jax.Array,
                 keys_col: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """PKM top-k over the product of two sub-key sets.

  Args:
    q_row, q_col: [T, H, kdim] half-queries.
    keys_row, keys_col: [H, n, kdim] sub-keys.
    k: slots per head (≤ n).

  Returns:
    (weights [T, H, k] f32 softmax over the kept scores, slots [T, H, k] int32 in
    [0, n²), slot = i·n + j), best first.
  """
  n = keys_row.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}] (the number of sub-keys per side)")
  s_row = jnp.einsum("thd,hnd->thn", q_row, keys_row, preferred_element_type=jnp.float32)
  s_col = jnp.einsum("thd,hnd->thn", q_col, keys_col, preferred_element_type=jnp.float32)
  v_row, i_row = lax.top_k(s_row, k)                          # [T, H, k]
  v_col, i_col = lax.top_k(s_col, k)
  grid = (v_row[..., :, None] + v_col[..., None, :]).reshape(*v_row.shape[:-1], k * k)
  slots = (i_row[..., :, None] * n + i_col[..., None, :]).reshape(grid.shape)
  best, pos = lax.top_k(grid, k)
  return jax.nn.softmax(best, axis=-1), jnp.take_along_axis(slots, pos, axis=-1)


def tucker_rank_one(cores: jax.Array, u_prev: jax.Array | None = None,
                    v_prev: jax.Array | None = None):
  """Rank-1 surrogate of the summed Tucker core, sign-aligned with the previous one.

  Args:
    cores: [H, C, r, r] Tucker cores (gradients are stopped here).
    u_prev, v_prev: [H, r] previous surrogate (None: no alignment).

  Returns:
    (u [H, r], v [H, r]) f32: the leading left/right singular vectors of Σ_c C_c. The
    joint sign (u, v) vs (−u, −v) is the one closer in L1 to (u_prev, v_prev), ties +.
  """
  summed = lax.stop_gradient(cores.astype(jnp.float32)).sum(axis=1)   # [H, r, r]
  left, _, right_t = jnp.linalg.svd(summed)
  u, v = left[..., :, 0], right_t[..., 0, :]
  if u_prev is None:
    return u, v
  same = jnp.abs(u - u_prev).sum(-1) + jnp.abs(v - v_prev).sum(-1)
  flipped = jnp.abs(-u - u_prev).sum(-1) + jnp.abs(-v - v_prev).sum(-1)
  sign = jnp.where(flipped < same, -1.0, 1.0)[:, None]
  return u * sign, v * sign


def tucker_singular_value_loss(cores: jax.Array, tau: float = 0.15) -> jax.Array:
  """mean over heads and k ≥ 2 of relu(σ_k(Σ_c C_c) − τ)² (scalar f32; 0 when r = 1)."""
  sigma = jnp.linalg.svd(cores.astype(jnp.float32).sum(axis=1), compute_uv=False)
  if sigma.shape[-1] < 2:
    return jnp.zeros((), jnp.float32)
  return jnp.mean(jnp.square(jax.nn.relu(sigma[..., 1:] - tau)))


def tdqkr_retrieve(q_row: jax.Array, q_col: jax.Array, keys_row: jax.Array,
                   keys_col: jax.Array, cores: jax.Array, u: jax.Array, v: jax.Array,
                   m: int) -> tuple[jax.Array, jax.Array]:
  """Tucker-decomposed query-key retrieval.

  Args:
    q_row, q_col: [T, kdim] half-queries (shared by all heads).
    keys_row, keys_col: [H, n, r, kdim] keys (rank slices; kdim last, so the key
      LayerNorm over kdim reads contiguous memory).
    cores: [H, C, r, r] Tucker cores.
    u, v: [H, r] rank-1 surrogate for candidate selection (treated as constants).
    m: slots per head (≤ n).

  Returns:
    (scores [T, H, m, C] f32 per-core G_c of the kept slots, slots [T, H, m] int32
    virtual indices i·n + j in [0, n²)), ordered by Σ_c G_c, best first.
  """
  n = keys_row.shape[1]
  if not 1 <= m <= n:
    raise ValueError(f"knn={m} must be in [1, {n}] (the number of keys per side)")
  s_row = jnp.einsum("td,hnrd->thnr", q_row, keys_row, preferred_element_type=jnp.float32)
  s_col = jnp.einsum("td,hnrd->thnr", q_col, keys_col, preferred_element_type=jnp.float32)
  u, v = lax.stop_gradient(u), lax.stop_gradient(v)
  _, i_row = lax.top_k(jnp.einsum("thnr,hr->thn", lax.stop_gradient(s_row), u), m)
  _, i_col = lax.top_k(jnp.einsum("thnr,hr->thn", lax.stop_gradient(s_col), v), m)
  sel_row = jnp.take_along_axis(s_row, i_row[..., None], axis=2)   # [T, H, m, r]
  sel_col = jnp.take_along_axis(s_col, i_col[..., None], axis=2)
  per_core = jnp.einsum("thia,hcab,thjb->thijc", sel_row, cores.astype(jnp.float32),
                        sel_col)                                    # [T, H, m, m, C]
  per_core = per_core.reshape(*per_core.shape[:2], m * m, per_core.shape[-1])
  slots = (i_row[..., :, None] * n + i_col[..., None, :]).reshape(*i_row.shape[:2], m * m)
  _, pos = lax.top_k(lax.stop_gradient(per_core.sum(-1)), m)      # [T, H, m]
  scores = jnp.take_along_axis(per_core, pos[..., None], axis=2)
  return scores, jnp.take_along_axis(slots, pos, axis=-1)


def implicit_value_expansion(slots: jax.Array, scores: jax.Array,
                             permutation: jax.Array | None, num_rows: int
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Maps virtual slots and per-core scores to a grouped `memory_lookup`.

  Args:
    slots: [T, S] int virtual slots in [0, E·num_rows) for E virtual blocks.
    scores: [T, S, C] per-core weights (C value chunks; C = 1 without MCS).
    permutation: [E·num_rows] int32 fixed shuffle of virtual slots (None: identity).
    num_rows: N, physical rows of the value table.

  Returns:
    (indices, weights, groups), each [T, S·C], for `memory_lookup` on the table viewed
    as [N·C, v/C] with `num_groups=E·C`: lookup (s, c) reads row ρ·C + c with weight
    G_c into group e·C + c, so the [T, E·C, v/C] output reshapes to [T, E, v] = o_e.
  """
  c = scores.shape[-1]
  virtual = slots if permutation is None else jnp.take(permutation, slots, axis=0)
  block, row = virtual // num_rows, virtual % num_rows
  chunk = jnp.arange(c, dtype=jnp.int32)
  indices = (row[..., None] * c + chunk).reshape(slots.shape[0], -1)
  groups = (block[..., None] * c + chunk).reshape(indices.shape)
  return indices.astype(jnp.int32), scores.reshape(indices.shape), groups.astype(jnp.int32)
