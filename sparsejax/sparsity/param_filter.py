"""Which parameters a sparsity algorithm masks, and how each is viewed as a matrix.

Parameters are named by their "/"-joined path in the params pytree, e.g.
`block_0/ffn/up_proj/kernel` or `block_1/ffn/w_gate` (Flax `LogicallyPartitioned`
boxes count as leaves, so a boxed and an unboxed tree give the same names).

Default selection (the choice of jaxpruner and RigL): floating tensors with ndim ≥ 2 —
every linear kernel, attention projection, MoE expert tensor `[experts, in, out]` and
UltraMem / PKM value table `[rows, dim]` — except the token embedding, the LM head,
norm gains, MoE routers and the memory layers' product keys and Tucker cores.
`exclude` regexes (searched in the path) remove more; `include` regexes select a tensor
whatever the defaults say.

Matrix view: structured masks (N:M, block, channel) act on each kernel seen as
`[batch, fan_in, fan_out]`: `[in, out]` kernels and value tables as they are, MoE
experts `[experts, in, out]` per expert, attention q/k/v `[embed, heads, head_dim]` as
`[embed, heads·head_dim]`, the output projection `[heads, head_dim, embed]` as
`[heads·head_dim, embed]`. N:M groups then run along fan_in (consecutive inputs of one
output, the 2:4 tensor-core layout).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from flax.core import meta
import jax
import jax.numpy as jnp

from sparsejax.validation import ConfigError

DEFAULT_EXCLUDE = (r"(^|/)embedding$", r"(^|/)lm_head$", r"norm", r"(^|/)router$",
                   r"(^|/)memory_\d+/(keys|cores)$")
EXPERT_TENSORS = r"(^|/)(w_gate|w_up|w_down)$"       # [experts, in, out]
TWO_INPUT_AXES = r"(^|/)o_proj/kernel$"              # [heads, head_dim, embed]


def is_box(x: Any) -> bool:
  return isinstance(x, meta.AxisMetadata)


def unboxed(x: Any) -> Any:
  return x.unbox() if is_box(x) else x


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """[(path name, leaf)] in tree order; Flax metadata boxes are leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
  return [(path_name(path), leaf) for path, leaf in flat]


def _compile(patterns: Sequence[str], field: str) -> list[re.Pattern]:
  compiled = []
  for i, pattern in enumerate(patterns):
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ConfigError(f"{field}[{i}]={pattern!r} is invalid: not a regex ({e})") from None
  return compiled


def select(params: Any, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
           prefix: str = "config.sparsity") -> dict[str, tuple[int, ...]]:
  """{name: shape} of the parameters to mask, in tree order (module docstring).

  Raises ConfigError naming `prefix.include[i]` / `prefix.exclude[i]` for a bad regex
  or one that matches no parameter, and `prefix` when nothing is selected.
  """
  inc, exc = _compile(include, f"{prefix}.include"), _compile(exclude, f"{prefix}.exclude")
  leaves = [(name, unboxed(leaf)) for name, leaf in named_leaves(params)]
  for field, patterns in (("include", inc), ("exclude", exc)):
    for i, pattern in enumerate(patterns):
      if not any(pattern.search(name) for name, _ in leaves):
        raise ConfigError(f"{prefix}.{field}[{i}]={pattern.pattern!r} is invalid: it "
                          "matches no parameter (names look like "
                          f"{leaves[0][0] if leaves else 'none'!r})")
  chosen = {}
  for name, leaf in leaves:
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    default = leaf.ndim >= 2 and not any(re.search(p, name) for p in DEFAULT_EXCLUDE)
    if floating and (any(p.search(name) for p in inc)
                     or default and not any(p.search(name) for p in exc)):
      chosen[name] = tuple(leaf.shape)
  if not chosen:
    raise ConfigError(f"{prefix}.include={tuple(include)!r} / exclude="
                      f"{tuple(exclude)!r} is invalid: no parameter is selected")
  return chosen


def matrix_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(batch, fan_in, fan_out) of the tensor's matrix view (module docstring)."""
  if len(shape) == 1:
    return 1, shape[0], 1
  if len(shape) == 3 and re.search(EXPERT_TENSORS, name):
    return shape
  inputs = 2 if len(shape) >= 3 and re.search(TWO_INPUT_AXES, name) else 1
  return 1, math.prod(shape[:inputs]), math.prod(shape[inputs:])
