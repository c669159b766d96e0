"""Sequential post-training pruning of a whole `DecoderLM`: block by block, as the
Wanda (Sun et al. 2024) and SparseGPT (Frantar & Alistarh 2023) reference drivers.

    result = prune_model(model_cfg, params, model_state, calib [S, T] int32,
                         PruneSettings(method="sparsegpt", sparsity=0.5), mesh=mesh)

For block i = 0, 1, ...: the calibration activations X_i [S, T, D] (the embeddings for
i = 0) go through block i once, with every linear's input captured
(`flax.linen.intercept_methods`) and reduced on the fly to its Hessian
H = (2/N) Σ x xᵀ (`hessian.accumulate_hessian`, batches of `batch_size` sequences);
the block's linears are pruned (magnitude, Wanda with ‖X_j‖₂² = N·H_jj/2, or SparseGPT
with H); then X_{i+1} = block_i(X_i) is recomputed with the *pruned* block, so later
blocks are calibrated on what the pruned model really feeds them. Only one block's
weights, Hessians and the [S, T, D] activations are live at a time. Linears fed the
same tensor (q/k/v, gate/up) share one Hessian. Skip-layer memories (PKM/UltraMem) run
in the loop as in `DecoderLM`.

Sharding: under `mesh`, the calibration tokens of every batch are split over the batch
axes (data, fsdp, expert) inside `jax.shard_map`, each device accumulates its tokens'
Hessian and `hessian.psum_hessian` combines them; the weights are never gathered for
the forward passes and pruned kernels are put back with their original sharding.

MoE FFNs ("moe"): expert e's w_gate/w_up Hessian is over the tokens routed to e (its
top-k under the model's router and bias), w_down's over those tokens' hidden
activations act(x W_gate,e) ⊙ x W_up,e — every routed token, as dropless dispatch
computes (a capacity-dropped token still counts). An expert no calibration token is
routed to is pruned by magnitude and listed in `PruneResult.unrouted`. Per calibration
batch of N tokens the expert inputs are materialized as [N, E, D] and [N, E, F] with a
routing mask (E× the routed work; lower --calib_batch_size for many experts). The router,
norms, embeddings and memory tables stay dense, unless `prune_embeddings`
(embedding and untied lm_head) or `prune_memory_values` (memory `values` tables) ask
for layer-wise magnitude pruning of those.

Per linear the report has the achieved sparsity and the relative reconstruction error
‖XW − XŴ‖²/‖XW‖² = tr(ΔᵀHΔ)/tr(WᵀHW) (Δ = W − Ŵ) on the calibration inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax import sharding
from sparsejax.layers import registry
from sparsejax.layers.dense import Dense
from sparsejax.layers.moe import ACTIVATIONS, MoEFFN
from sparsejax.models.transformer import Block
from sparsejax.ops import moe as moe_ops
from sparsejax.sparsity.hessian import accumulate_hessian, psum_hessian
from sparsejax.sparsity.posttrain import magnitude_mask, sparsegpt_prune, wanda_mask
from sparsejax.validation import ConfigError, check, check_choice

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """What to prune and how (flag names of experiments/prune.py in the errors)."""
  method: str = "sparsegpt"
  sparsity: float = 0.5             # fraction pruned, [0, 1); with nm: 1 - n/m
  nm: tuple[int, int] | None = None  # (n, m): keep n of every m inputs per output
  block_size: int = 128             # SparseGPT columns per block
  damp: float = 0.01                # SparseGPT relative damping
  batch_size: int = 8               # calibration sequences per forward
  magnitude_scope: str = "layer"    # unstructured magnitude: "layer" | "output"
  prune_embeddings: bool = False
  prune_memory_values: bool = False

  def validate(self) -> None:
    check_choice("--method", self.method, METHODS)
    check(isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1,
          "--sparsity", self.sparsity, "in [0, 1)")
    if self.nm is not None:
      n, m = self.nm
      check(1 <= n <= m, "--nm", f"{n}:{m}", "n:m with 1 <= n <= m")
      check(math.isclose(self.sparsity, 1 - n / m), "--sparsity", self.sparsity,
            f"1 - n/m = {1 - n / m:g} with --nm={n}:{m}")
    check(self.block_size >= 1, "--block_size", self.block_size, ">= 1")
    check(self.damp > 0, "--damp", self.damp, "> 0")
    check(self.batch_size >= 1, "--calib_batch_size", self.batch_size, ">= 1")
    check_choice("--magnitude_scope", self.magnitude_scope, ("layer", "output"))


@dataclasses.dataclass
class PruneResult:
  params: Any                  # the pruned params (same tree, dtypes and shardings)
  layers: list[dict]           # per pruned matrix: name, shape, method, tokens,
                               # sparsity, rel_error, seconds
  unrouted: list[str]          # experts no calibration token was routed to
  seconds: float


def _check_nm_fits(block: dict, layout, nm: tuple[int, int] | None, name: str) -> None:
  """ConfigError naming --nm when m does not divide some linear's input size (checked
  before the block is pruned; the blocks share one structure, so block 0 catches it)."""
  if nm is None:
    return
  for kind, paths, cd in layout:
    for path in paths:
      kernel = _get(block, path + (("kernel",) if kind == "dense" else ()))
      size = math.prod(kernel.shape[:cd]) if kind == "dense" else kernel.shape[1]
      check(size % nm[1] == 0, "--nm", f"{nm[0]}:{nm[1]}",
            f"n:m with m dividing every linear's input size ({name}/"
            f"{'/'.join(path)} has {size} inputs)")


# ---------------------------------------------------------------- statistics per block

def _batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)


def _capture(cfg, layer: int, variables, x, positions):
  """Runs block `layer` on x; returns (out, ffn_in, inputs) with inputs a list of
  (kind, paths, contract_dims, x2d [N, in] or [N, E, in], where [N, E] or None)."""
  groups: dict[int, list] = {}
  moe = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    if type(module) is Dense:   # pylint: disable=unidiomatic-typecheck
      entry = groups.setdefault(id(args[0]), [args[0], module.contract_dims, []])
      entry[2].append(module.path)
    elif isinstance(module, MoEFFN):
      moe.append((module, args[0]))
    return out

  with nn.intercept_methods(interceptor):
    out, ffn_in = Block(cfg, layer).apply(variables, x, positions)
  inputs = []
  for xin, cd, paths in groups.values():
    in_size = math.prod(xin.shape[xin.ndim - cd:])
    inputs.append(("dense", tuple(paths), cd, xin.reshape(-1, in_size), None))
  for module, xin in moe:
    inputs.extend(_expert_inputs(module, xin))
  return out, ffn_in, inputs


def _expert_inputs(module: MoEFFN, x):
  """The routed experts' inputs: (gate/up [N, E, D], down [N, E, F]) with where [N, E]
  True for the tokens routed to each expert."""
  opt = module.options
  p = module.variables["params"]
  bias = module.variables.get("moe_state", {}).get("bias")
  xt = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  logits = jnp.dot(xt, p["router"].astype(jnp.float32))
  _, experts, _ = moe_ops.route(logits, opt.top_k, scoring=opt.scoring, bias=bias,
                                renormalize=opt.renormalize)
  routed = jnp.any(jax.nn.one_hot(experts, opt.num_experts, dtype=jnp.bool_), axis=1)
  act = ACTIVATIONS[opt.activation]
  hidden = act(jnp.einsum("nd,edf->nef", xt, p["w_gate"].astype(jnp.float32))) * \
      jnp.einsum("nd,edf->nef", xt, p["w_up"].astype(jnp.float32))
  path = module.path
  xe = jnp.broadcast_to(xt[:, None], (xt.shape[0], opt.num_experts, xt.shape[1]))
  return [("experts", (path + ("w_gate",), path + ("w_up",)), 1, xe, routed),
          ("experts", (path + ("w_down",),), 1, hidden, routed)]


def _hessians(inputs, mesh, dtype):
  """[(H [in, in] or [E, in, in], count scalar or [E])] of one batch, the tokens split
  over the mesh's batch axes and combined with psum_hessian."""
  axes = _batch_axes(mesh)
  n_dev = math.prod(mesh.shape[a] for a in axes)
  xs, ws = [], []
  for kind, _, _, x, where in inputs:
    n = x.shape[0]
    pad = -n % n_dev
    valid = jnp.arange(n + pad) < n
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    if where is None:
      where = valid
    else:
      where = jnp.pad(where, ((0, pad), (0, 0))) & valid[:, None]
    xs.append(x)
    ws.append(where)

  def local(xs, ws):
    out = []
    for (kind, *_), x, w in zip(inputs, xs, ws):
      def one(x, w):
        h = jnp.zeros((x.shape[-1],) * 2, dtype)
        return psum_hessian(*accumulate_hessian(h, x, jnp.int32(0), where=w), axes)
      out.append(one(x, w) if kind == "dense" else
                 jax.vmap(one, in_axes=(1, 1))(x, w))
    return out

  spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=P())(xs, ws)


@jax.jit
def _merge(a, b):
  """Running-average merge of two (H, count) lists."""
  def one(x, y):
    (h1, n1), (h2, n2) = x, y
    n = n1 + n2
    w1 = (n1 / jnp.maximum(n, 1)).astype(h1.dtype)
    w2 = (n2 / jnp.maximum(n, 1)).astype(h1.dtype)
    expand = lambda w: w.reshape(w.shape + (1, 1))
    return expand(w1) * h1 + expand(w2) * h2, n
  return [one(x, y) for x, y in zip(a, b)]


# ---------------------------------------------------------------- pruning one matrix

def _stat_dtype():
  return jnp.float64 if jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64 \
      else jnp.float32


def rel_error(w: jax.Array, w_new: jax.Array, h: jax.Array) -> float:
  """‖XW − XŴ‖²/‖XW‖² from H ∝ XᵀX: tr(ΔᵀHΔ)/tr(WᵀHW); W, Ŵ [in, out]."""
  w = w.astype(h.dtype)
  delta = w - w_new.astype(h.dtype)
  den = float(jnp.sum(w * (h @ w)))
  return float(jnp.sum(delta * (h @ delta))) / den if den > 0 else 0.0


def prune_matrix(w: jax.Array, h: jax.Array, count: int, settings: PruneSettings,
                 name: str) -> tuple[jax.Array, str]:
  """(pruned w [in, out], method used); a Hessian that stays singular after the damping
  retries raises ConfigError naming the layer."""
  s, nm = settings.sparsity, settings.nm
  method = settings.method if count > 0 else "magnitude"
  if method == "magnitude":
    mask = magnitude_mask(w, s, nm=nm, scope=settings.magnitude_scope)
  elif method == "wanda":
    mask = wanda_mask(w, jnp.sqrt(count * jnp.diag(h) / 2).astype(jnp.float32), s, nm=nm)
  else:
    try:
      new, _ = sparsegpt_prune(w, h, s, nm=nm, block_size=settings.block_size,
                               damp=settings.damp)
    except ValueError as e:
      raise ConfigError(f"{name}: {e}") from None
    return new, method
  return jnp.where(mask, w, 0).astype(w.dtype), method


def _prune_leaf(kernel, cd: int, h, count, settings, name, layers):
  """Prunes one kernel ([*in, *out], or [E, in, out] with h [E, in, in]) on the first
  device of its mesh and puts the result back with the kernel's sharding; appends report
  rows to `layers`."""
  experts = h.ndim == 3
  sharding_of = kernel.sharding
  device = kernel.sharding.mesh.devices.flat[0] if hasattr(kernel.sharding, "mesh") \
      else list(kernel.devices())[0]
  kernel, h = jax.device_put((kernel, h), device)   # one matrix at a time on one device
  mats = [kernel[e] for e in range(kernel.shape[0])] if experts else [kernel]
  hs = [h[e] for e in range(h.shape[0])] if experts else [h]
  counts = [int(c) for c in (count if experts else [count])]
  out = []
  for e, (w, he, n) in enumerate(zip(mats, hs, counts)):
    t0 = time.perf_counter()
    shape = w.shape
    in_size = math.prod(shape[:cd])
    w2 = jnp.asarray(w).reshape(in_size, -1)
    label = f"{name}[{e}]" if experts else name
    new, used = prune_matrix(w2, he, n, settings, label)
    out.append(new.reshape(shape))
    layers.append(dict(name=label, shape=list(w2.shape), method=used, tokens=n,
                       sparsity=float(jnp.mean(new == 0)),
                       rel_error=rel_error(w2, new, he) if n else None,
                       seconds=time.perf_counter() - t0))
  new = jnp.stack(out) if experts else out[0]
  return jax.device_put(new.astype(kernel.dtype), sharding_of)


def _magnitude_leaf(x, settings: PruneSettings, name: str, layers: list) -> jax.Array:
  """Layer-wise magnitude pruning of an embedding / memory table (2-D view, last axis
  = features)."""
  w2 = jax.device_put(x, list(x.devices())[0]).reshape(-1, x.shape[-1])
  mask = magnitude_mask(w2, settings.sparsity, scope="layer")
  new = jnp.where(mask, w2, 0).reshape(x.shape).astype(x.dtype)
  layers.append(dict(name=name, shape=list(w2.shape), method="magnitude", tokens=0,
                     sparsity=float(jnp.mean(new == 0)), rel_error=None, seconds=0.0))
  return jax.device_put(new, x.sharding)


# ---------------------------------------------------------------- the driver

def _set(tree: dict, path: tuple, value) -> dict:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _sub_variables(params, model_state, name: str) -> dict:
  variables = {"params": params[name]}
  for collection, tree in model_state.items():
    if name in tree:
      variables[collection] = tree[name]
  return variables


def prune_model(model_cfg, params: Any, model_state: dict, calib: np.ndarray,
                settings: PruneSettings, *, mesh: jax.sharding.Mesh | None = None,
                progress=None) -> PruneResult:
  """Prunes every block's linears sequentially (module docstring).

  Args:
    model_cfg: the `ModelConfig` (its `linear` must be "dense").
    params, model_state: the model's variables (params are not modified; pruned leaves
      are new arrays with the old shardings).
    calib: int32 [S, T] calibration token windows.
    settings: `PruneSettings` (validated here).
    mesh: the device mesh (default: all devices on "data").
    progress: optional callable(str) told about each block.
  """
  settings.validate()
  check(model_cfg.linear == "dense", "config.model.linear", model_cfg.linear,
        '"dense" (pruning Q-Sparse / BitNet linears is not supported)')
  calib = np.asarray(calib, np.int32)
  check(calib.ndim == 2 and calib.size > 0, "calibration tokens", calib.shape,
        "a non-empty int [samples, seq_len] array")
  mesh = mesh if mesh is not None else sharding.make_mesh()
  t_start = time.perf_counter()
  dtype = _stat_dtype()
  layers, unrouted = [], []
  new_params = dict(params)
  with _activate(mesh):
    xs = _embed(model_cfg, params, calib, settings.batch_size, mesh)
  pending: dict[int, list] = {}
  for layer in range(model_cfg.num_layers):
    name = f"block_{layer}"
    if progress:
      progress(f"{name}: calibrating on {calib.size:,} tokens")
    variables = _sub_variables(new_params, model_state, name)
    with _activate(mesh):
      layout = _layout(model_cfg, layer, variables, xs[0])
      stats_fn = _stats_fn(model_cfg, layer, mesh, jnp.dtype(dtype).name)
      stats = None
      for x in xs:
        batch = stats_fn(variables, x)
        stats = batch if stats is None else _merge(stats, batch)
    block = new_params[name]
    _check_nm_fits(block, layout, settings.nm, name)
    for (kind, paths, cd), (h, count) in zip(layout, stats):
      for path in paths:
        kernel_path = path + (("kernel",) if kind == "dense" else ())
        block = _set(block, kernel_path, _prune_leaf(
            _get(block, kernel_path), cd, h, count, settings, "/".join((name,) + path),
            layers))
      if kind == "experts" and paths[0][-1] == "w_gate":
        prefix = "/".join((name,) + paths[0][:-1])
        unrouted.extend(f"{prefix}[{e}]" for e in np.flatnonzero(np.asarray(count) == 0))
    del stats
    new_params[name] = block
    variables = _sub_variables(new_params, model_state, name)
    with _activate(mesh):
      forward = _forward_fn(model_cfg, layer)
      outs = [forward(variables, x) for x in xs]
      xs = _memories(model_cfg, layer, new_params, model_state, [o[1] for o in outs],
                     [o[0] for o in outs], pending)
  new_params = _prune_tables(model_cfg, new_params, settings, layers)
  return PruneResult(new_params, layers, unrouted, time.perf_counter() - t_start)


@contextlib.contextmanager
def _activate(mesh):
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    yield


def _positions(x):
  return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])


def _layout(cfg, layer, variables, x):
  """[(kind, paths, contract_dims)] of the block's captured inputs (abstract trace)."""
  box = []
  def trace(v, x):
    _, _, inputs = _capture(cfg, layer, v, x, _positions(x))
    box.extend((kind, paths, cd) for kind, paths, cd, _, _ in inputs)
    return 0
  jax.eval_shape(trace, variables, x)
  return box


@functools.lru_cache(maxsize=64)
def _stats_fn(cfg, layer: int, mesh, dtype: str):
  """Jitted (block variables, x [B, T, D]) -> [(H, count)] of block `layer`'s linears
  (cached, so repeated runs on one model compile once)."""
  def stats(variables, x):
    _, _, inputs = _capture(cfg, layer, variables, x, _positions(x))
    return _hessians(inputs, mesh, jnp.dtype(dtype))
  return jax.jit(stats)


@functools.lru_cache(maxsize=64)
def _forward_fn(cfg, layer: int):
  """Jitted (block variables, x) -> (block output, normalized FFN input)."""
  return jax.jit(lambda variables, x: Block(cfg, layer).apply(variables, x,
                                                               _positions(x)))


def _embed(cfg, params, calib, batch_size, mesh) -> list[jax.Array]:
  """The embeddings of the calibration windows, in batches, split over the batch axes
  when the batch divides over them."""
  axes = _batch_axes(mesh)
  n_dev = math.prod(mesh.shape[a] for a in axes)
  table = params["embedding"]
  xs = []
  for b in range(0, len(calib), batch_size):
    tokens = calib[b:b + batch_size]
    spec = P(axes) if len(tokens) % n_dev == 0 else P()
    tokens = jax.device_put(tokens, NamedSharding(mesh, spec))
    xs.append(jnp.take(table, tokens, axis=0).astype(cfg.dtype))
  return xs


def _memories(cfg, layer, params, model_state, ffn_ins, xs, pending):
  """DecoderLM's skip-layer memories: read block `layer`'s FFN input, add after dst."""
  for i, (src, dst) in enumerate(cfg.memory_placements):
    if src == layer:
      module = registry.build("memory", cfg.memory, cfg, cfg.memory_options, i)
      variables = _sub_variables(params, model_state, f"memory_{i}")
      apply = jax.jit(lambda v, x, module=module: module.apply(v, x))
      pending.setdefault(dst, []).append([apply(variables, f) for f in ffn_ins])
  for outs in pending.pop(layer, []):
    xs = [x + o for x, o in zip(xs, outs)]
  return xs


def _prune_tables(cfg, params, settings: PruneSettings, layers: list) -> dict:
  """Embedding / lm_head and memory value tables, by layer-wise magnitude when asked."""
  if settings.sparsity == 0:
    return params
  if settings.prune_embeddings:
    for key in ("embedding", "lm_head"):
      if key in params:
        params = {**params, key: _magnitude_leaf(params[key], settings, key, layers)}
  if settings.prune_memory_values:
    for i in range(len(cfg.memory_placements)):
      name = f"memory_{i}"
      params = _set(params, (name, "values"), _magnitude_leaf(
          params[name]["values"], settings, f"{name}/values", layers))
  return params


def summary(result: PruneResult) -> dict:
  """Totals over the pruned matrices: weights, zeros, overall sparsity, mean error."""
  total = sum(math.prod(row["shape"]) for row in result.layers)
  zeros = sum(row["sparsity"] * math.prod(row["shape"]) for row in result.layers)
  errors = [row["rel_error"] for row in result.layers if row["rel_error"] is not None]
  return {"matrices": len(result.layers), "weights": total, "zeros": int(round(zeros)),
          "sparsity": zeros / total if total else 0.0,
          "mean_rel_error": float(np.mean(errors)) if errors else None,
          "unrouted_experts": list(result.unrouted), "seconds": result.seconds}
