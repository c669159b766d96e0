"""Activations of a `DecoderLM` at a named site, captured or replaced during `apply`.

Sites of a model with L blocks and memory placements P (`site_names`):
  "resid_{i}"     the residual stream after block i (after any memory output added
                  there): the input of block i+1, or of the final norm for i = L−1;
  "ffn_in_{i}"    the FFN input of block i (the output of its `ffn_norm`);
  "memory_in_{j}" the input of the j-th memory layer (UltraMem / PKM; j < len(P)).

Works for any `DecoderLM`: a sparsejax run (`sparsejax.train.trainer.restore_run`) or a
Hugging Face checkpoint (`sparsejax.interop.hf.load_hf`). Nothing in the model changes:
modules are intercepted with `flax.linen.intercept_methods`. Activations are streamed
batch by batch (`activation_stream`); only one batch is ever held.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sparsejax.models import DecoderLM
from sparsejax.models.config import ModelConfig
from sparsejax.validation import check

Replace = Callable[[jax.Array], jax.Array]


def site_names(cfg: ModelConfig) -> tuple[str, ...]:
  """Every valid site of a model config, in forward order per kind."""
  return (tuple(f"resid_{i}" for i in range(cfg.num_layers))
          + tuple(f"ffn_in_{i}" for i in range(cfg.num_layers))
          + tuple(f"memory_in_{j}" for j in range(len(cfg.memory_placements))))


def check_site(cfg: ModelConfig, site: str, field: str = "site") -> None:
  """ConfigError naming `field` and listing the valid sites unless `site` is one."""
  valid = site_names(cfg)
  check(site in valid, field, site, f"one of the model's sites: {', '.join(valid)}")


@dataclasses.dataclass(frozen=True)
class _Hook:
  """Which module call holds the site: the module's path in the model and whether the
  site is the call's first argument ("input") or its output (`index` of a tuple)."""
  path: tuple[str, ...]
  where: str
  index: int | None = None

  def matches(self, module: nn.Module) -> bool:
    return tuple(module.path) == self.path


def _hooks(cfg: ModelConfig, site: str) -> tuple[_Hook, _Hook]:
  """(capture hook, replace hook) of `site`. The FFN input is captured from the
  block's output and replaced at the block's `ffn_norm`."""
  check_site(cfg, site)
  kind, i = re.fullmatch(r"(resid|ffn_in|memory_in)_(\d+)", site).groups()
  i = int(i)
  if kind == "resid":
    nxt = (_Hook((f"block_{i + 1}",), "input") if i + 1 < cfg.num_layers
           else _Hook(("final_norm",), "input"))
    return nxt, nxt
  if kind == "ffn_in":
    return (_Hook((f"block_{i}",), "output", 1),
            _Hook((f"block_{i}", "ffn_norm"), "output"))
  hook = _Hook((f"memory_{i}",), "input")
  return hook, hook


def _interceptor(capture: _Hook, replace_at: _Hook, replace: Replace | None,
                 captured: dict[str, jax.Array]):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if replace is not None and replace_at.matches(module) and replace_at.where == "input":
      args = (replace(args[0]), *args[1:])
    if capture.matches(module) and capture.where == "input":
      captured["x"] = args[0]
    out = next_fun(*args, **kwargs)
    if capture.matches(module) and capture.where == "output":
      captured["x"] = out if capture.index is None else out[capture.index]
    if replace is not None and replace_at.matches(module) and replace_at.where == "output":
      out = replace(out)
    return out
  return intercept


def run_at_site(model: DecoderLM, variables: Any, tokens: jax.Array, site: str,
                replace: Replace | None = None) -> tuple[jax.Array, jax.Array]:
  """(logits float32 [B, T, V], activation at `site` [B, T, D]) of `model.apply`
  (with `remat` off: inference only).

  With `replace`, the activation at `site` is replaced by `replace(activation)` in the
  forward pass (the returned activation is the clean one, before replacement).
  """
  capture, replace_at = _hooks(model.cfg, site)
  captured: dict[str, jax.Array] = {}
  plain = DecoderLM(dataclasses.replace(model.cfg, remat=False))  # same params; no
  # jax.checkpoint trace that a captured value could escape from
  with nn.intercept_methods(_interceptor(capture, replace_at, replace, captured)):
    logits = plain.apply(variables, tokens)
  return logits, captured["x"]


def capture_fn(model: DecoderLM, site: str) -> Callable[[Any, jax.Array], jax.Array]:
  """A jitted `(variables, tokens [B, T]) -> activations float32 [B·T, D]` at `site`."""
  _hooks(model.cfg, site)   # validates the site now

  @jax.jit
  def run(variables, tokens):
    _, x = run_at_site(model, variables, tokens, site)
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)

  return run


def activation_stream(model: DecoderLM, variables: Any, batches: Iterable[dict],
                      site: str) -> Iterator[jax.Array]:
  """Activations [B·T, D] at `site` of each token batch {"inputs": int32 [B, T]} of
  `batches` (e.g. a `sparsejax.train.data.make_dataset` iterator), one at a time."""
  run = capture_fn(model, site)
  for batch in batches:
    yield run(variables, jnp.asarray(batch["inputs"]))


def spliced_losses(model: DecoderLM, variables: Any, batch: dict, site: str,
                   reconstruct: Replace) -> dict[str, jax.Array]:
  """Next-token CE (nats) of a token batch {"inputs", "targets"} with the activation at
  `site` left as is ("ce_clean"), replaced by `reconstruct(activation)` ("ce_sae") and
  by zeros ("ce_zero"); `reconstruct` maps [B, T, D] -> [B, T, D] (e.g. an SAE's x̂)."""
  clean = model.apply(variables, batch["inputs"])
  logits_sae, _ = run_at_site(model, variables, batch["inputs"], site, reconstruct)
  logits_zero, _ = run_at_site(model, variables, batch["inputs"], site, jnp.zeros_like)
  cross_entropy = lambda logits: optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["targets"]).mean()
  return {"ce_clean": cross_entropy(clean),
          "ce_sae": cross_entropy(logits_sae),
          "ce_zero": cross_entropy(logits_zero)}


__all__ = ["site_names", "check_site", "run_at_site", "capture_fn",
           "activation_stream", "spliced_losses"]
