"""Collectives and large buffers of a compiled (per-chip) HLO module, from its text.

The SPMD partitioner turns shardings into collectives; reading them off the compiled
HLO tells what a step sends over the inter-chip interconnect (ICI) before any pod runs
it. Every instruction whose opcode is a collective is counted once where it appears in
the text (an instruction inside a `while` body counts once, not per iteration; the
model unrolls its blocks, so a train step has no such loop), async pairs by their
`-start` half.

Bytes of one collective are those of its per-chip result (a tuple's arrays summed; for
`all-gather-start` / `collective-permute-start`, whose result tuple holds the operand
too, the largest array). The bytes each chip sends, with n chips in the replica group
and S the result bytes (bandwidth-optimal ring algorithms):

  all-gather          S·(n−1)/n        reduce-scatter   S·(n−1)   (input is n·S)
  all-reduce          2·S·(n−1)/n      all-to-all       S·(n−1)/n
  collective-permute  S
"""

from __future__ import annotations

import dataclasses
import math
import re

OPS = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute",
       "ragged-all-to-all")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
_SEND_FACTOR = {"all-gather": lambda n: (n - 1) / n,
                "all-reduce": lambda n: 2 * (n - 1) / n,
                "all-to-all": lambda n: (n - 1) / n,
                "ragged-all-to-all": lambda n: (n - 1) / n,
                "reduce-scatter": lambda n: n - 1,
                "collective-permute": lambda n: 1.0}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(             # name, result shape, opcode
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\(", re.M)
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def array_bytes(shape_text: str) -> list[int]:
  """Bytes of each array in an HLO shape text, e.g. "(bf16[8,128]{1,0}, s32[])" ->
  [2048, 4]; element types outside DTYPE_BYTES (f8 variants: 1) count 1 byte."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    elements = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    sizes.append(int(elements * DTYPE_BYTES.get(dtype, 1)))
  return sizes


def group_size(line: str, num_devices: int) -> int:
  """Chips in one replica group of a collective's HLO line (all when unstated)."""
  mesh = _MESH_GROUPS.search(line)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh.group(2)))
  listed = _LIST_GROUPS.search(line)
  if listed:
    return len([d for d in listed.group(1).split(",") if d])
  iota = _IOTA_GROUPS.search(line)
  if iota:
    return int(iota.group(2))
  return num_devices


@dataclasses.dataclass
class CollectiveStats:
  """Per-chip totals of one collective kind."""
  count: int = 0
  bytes: int = 0          # result bytes
  sent_bytes: float = 0.0  # bytes each chip sends (module docstring)

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def collectives(hlo: str, num_devices: int) -> dict[str, CollectiveStats]:
  """{op: CollectiveStats} for every kind in OPS (zeros for absent ones)."""
  stats = {op: CollectiveStats() for op in OPS}
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    opcode = match.group(3)
    op = opcode.removesuffix("-start")
    if op not in stats or opcode.endswith("-done"):
      continue
    sizes = array_bytes(match.group(2))
    if opcode.endswith("-start") and op in ("all-gather", "collective-permute"):
      size = max(sizes, default=0)
    else:
      size = sum(sizes)
    n = max(group_size(line, num_devices), 1)
    stats[op].count += 1
    stats[op].bytes += size
    stats[op].sent_bytes += size * _SEND_FACTOR[op](n)
  return stats


def largest_buffers(hlo: str, top: int = 5) -> list[tuple[int, str]]:
  """The `top` largest instruction results (bytes, "name shape (op_name)") of the
  compiled module, largest first, one per distinct source op."""
  found: dict[str, tuple[int, str]] = {}
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None or match.group(3) in ("parameter", "tuple", "get-tuple-element",
                                           "bitcast"):
      continue
    size = sum(array_bytes(match.group(2)))
    source = _OP_NAME.search(line)
    key = source.group(1) if source else match.group(1)
    if size > found.get(key, (0, ""))[0]:
      shape = re.sub(r"\{[^}]*\}", "", match.group(2))
      found[key] = (size, f"{match.group(1)} {shape} ({key})")
  return sorted(found.values(), reverse=True)[:top]
