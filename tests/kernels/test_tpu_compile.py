"""Real TPU compilation of every Pallas TPU kernel (libtpu AOT, tests/tpu_aot.py).

Each kernel is compiled through its public op with impl="pallas" inside `jax.shard_map`
over a 4-chip v5e / v6e slice (the ops pick the Mosaic kernels from the mesh in
context), f32 and bf16, as one gradient program (`jax.grad` of Σ out²: the forward
kernel and every backward kernel in one compile). The XLA:TPU / Mosaic compilers check what interpret mode and
`.lower(lowering_platforms=("tpu",))` cannot: tile alignment, matmul operand types,
SMEM / VMEM allocation. Small shapes in bf16 on both chips and in f32 on v5e (f32
layouts do not depend on the generation; see `CHIP_DTYPES`); the realistic shapes
(256k-row memory table, 32k-token attention and NSA, a 4096 × 16384 block-sparse weight
on 16k tokens) in bf16 on v5e are `slow`.

The op matrix uses `check_vma=False`, so that a Mosaic error is not hidden behind the
shard_map type check; `test_kernel_under_checked_shard_map` compiles each op under the
default `check_vma=True` that the layers use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.ops import masks
from sparsejax.ops.block_sparse_matmul import block_sparse_matmul
from sparsejax.ops.memory import memory_lookup
from sparsejax.ops.nsa import selected_attention
from sparsejax.ops.sparse_attention import block_sparse_attention
from sparsejax.ops.topk import topk_sparsify
import tpu_aot
from tpu_aot import HBM_BYTES, TOPOLOGIES, TpuCompileError, compile_for_tpu, tpu_mesh

A = jax.ShapeDtypeStruct
ROWS = P("data")                                 # tokens over the 4 chips
BTHD = P("data", None, "tensor", None)           # [B, T, H, D]: batch × heads


@dataclasses.dataclass(frozen=True)
class Case:
  fn: Callable                  # the op on one shard's arrays
  args: tuple                   # global abstract inputs
  specs: tuple                  # their PartitionSpecs (= shard_map in_specs)
  out_spec: P
  axes: dict                    # mesh axis sizes (tpu_mesh `axes`)


def topk_case(dtype, big: bool) -> Case:
  rows, d = (16384, 8192) if big else (1024, 512)          # big: 16k tokens × FFN width
  return Case(lambda x: topk_sparsify(x, d // 8, impl="pallas"), (A((rows, d), dtype),),
              (ROWS,), ROWS, {"data": 4})


def memory_case(dtype, big: bool) -> Case:
  n, tokens, heads = (262144, 8192, 4) if big else (4096, 256, 2)   # table n × 256, K 32
  shape = (tokens, heads, 32)
  return Case(lambda v, i, w: memory_lookup(v, i, w, impl="pallas"),
              (A((n, 256), dtype), A(shape, jnp.int32), A(shape, dtype)),
              (P(), ROWS, ROWS), ROWS, {"data": 4})


def attention_case(dtype, big: bool, mask) -> Case:
  t = 32768 if big else 1024                               # GQA: 8 query, 2 kv heads
  q, kv = A((2, t, 8, 128), dtype), A((2, t, 2, 128), dtype)
  return Case(lambda q, k, v: block_sparse_attention(q, k, v, mask, impl="pallas"),
              (q, kv, kv), (BTHD,) * 3, BTHD, {"data": 2, "tensor": 2})


def nsa_case(dtype, big: bool) -> Case:
  t, n = (32768, 16) if big else (1024, 8)                 # l' = 64 (paper), n blocks
  q, kv = A((2, t, 8, 128), dtype), A((2, t, 2, 128), dtype)
  sel = (A((2, t, 2, n), jnp.int32), A((2, t, 2, n), jnp.bool_))
  return Case(lambda q, k, v, i, ok: selected_attention(q, k, v, i, ok, 64, impl="pallas"),
              (q, kv, kv, *sel), (BTHD,) * 5, BTHD, {"data": 2, "tensor": 2})


def block_sparse_matmul_case(dtype, big: bool) -> Case:
  """x [rows, K] · W [K, N] stored as 128 × 128 blocks, 25% per column block (random
  rows, seeded): dx and dW (the stored blocks) in the backward."""
  k, n, rows = (4096, 16384, 16384) if big else (512, 1024, 1024)
  nbr, nbc = k // 128, n // 128
  rng = np.random.default_rng(0)
  index = np.array([(r, c) for c in range(nbc)
                    for r in np.sort(rng.choice(nbr, nbr // 4, replace=False))], np.int32)
  return Case(lambda x, w: block_sparse_matmul(x, w, index, out_features=n, impl="pallas"),
              (A((rows, k), dtype), A((len(index), 128, 128), dtype)), (ROWS, P()), ROWS,
              {"data": 4})


OPS = {
    "topk": topk_case,
    "block_sparse_matmul": block_sparse_matmul_case,
    "memory_lookup": memory_case,
    "attention_causal": lambda dtype, big: attention_case(dtype, big, masks.CausalMask()),
    "attention_local": lambda dtype, big: attention_case(
        dtype, big, masks.LocalMask(1024 if big else 256)),
    "nsa_selection": nsa_case,
}


def program(case: Case, mesh, backward: bool, check_vma: bool = False):
  """(fn, abstract args) to compile: the sharded op, or the grads of Σ out² in its
  floating inputs."""
  sharded = jax.shard_map(case.fn, mesh=mesh, in_specs=case.specs,
                          out_specs=case.out_spec, check_vma=check_vma)
  args = tuple(A(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
               for a, s in zip(case.args, case.specs))
  if not backward:
    return sharded, args
  floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
  loss = lambda *a: jnp.sum(jnp.square(sharded(*a).astype(jnp.float32)))
  return jax.grad(loss, argnums=floats), args


def compile_case(case: Case, topology: str, backward: bool, check_vma: bool = False):
  mesh = tpu_mesh(topology, case.axes)
  fn, args = program(case, mesh, backward, check_vma)
  compiled = compile_for_tpu(fn, *args, mesh=mesh)
  assert "tpu_custom_call" in compiled.hlo, "no Mosaic kernel in the compiled program"
  mem = compiled.memory
  used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  assert used <= HBM_BYTES[mesh.devices.flat[0].device_kind], f"{used} B per chip"
  return compiled


# (topology, dtype) of the small-shape matrix. bf16 on both chips: v5e has no bf16
# VPU (Mosaic unpacks bf16 to f32 around elementwise ops) while v6e keeps them packed,
# and v6e's 256-wide MXU tiles the matmuls differently. f32 (unpacked 8 × 128 tiles,
# the same layouts on both generations) on v5e is compiled by
# `test_kernel_under_checked_shard_map` below (the same program, type-checked too).
CHIP_DTYPES = [(TOPOLOGIES[0], jnp.bfloat16), (TOPOLOGIES[1], jnp.bfloat16)]


@pytest.mark.slow
@pytest.mark.parametrize("topology,dtype", CHIP_DTYPES,
                         ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name)
@pytest.mark.parametrize("op", list(OPS))
def test_kernel_compiles(topology, op, dtype):
  """The gradient program holds the forward kernel and every backward kernel."""
  compile_case(OPS[op](dtype, big=False), topology, backward=True)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(OPS))
def test_kernel_compiles_realistic_shapes(op):
  """bf16, the dtype of runs at these sizes (f32 tiling is compiled at the small shapes)."""
  compile_case(OPS[op](jnp.bfloat16, big=True), "v5e:2x2", backward=True)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(OPS))
def test_kernel_under_checked_shard_map(op):
  """The layers' shard_maps keep check_vma=True: a pallas_call's out_shape must then
  state how it varies over the mesh axes. f32 on v5e: also the matrix's f32 compile."""
  compile_case(OPS[op](jnp.float32, big=False), "v5e:2x2", backward=True,
               check_vma=True)


# ------------------------------------------------------------------ the harness itself

def _double(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2


def _whole_array_kernel(x):
  """One grid step over the whole array: VMEM must hold input and output blocks."""
  spec = pl.BlockSpec(x.shape, lambda: (0, 0))
  return pl.pallas_call(_double, out_shape=A(x.shape, x.dtype), in_specs=[spec],
                        out_specs=spec)(x)


def test_harness_compiles_a_kernel_and_reports_its_memory():
  mesh = tpu_mesh("v5e:2x2")
  fn = jax.shard_map(_whole_array_kernel, mesh=mesh, in_specs=ROWS, out_specs=ROWS,
                     check_vma=False)
  compiled = compile_for_tpu(fn, A((4 * 512, 256), jnp.float32), mesh=mesh)
  assert compiled.hlo.count('custom_call_target="tpu_custom_call"') == 1
  assert compiled.memory.argument_size_in_bytes == 512 * 256 * 4       # per chip
  assert compiled.memory.output_size_in_bytes == 512 * 256 * 4


def test_harness_shards_with_the_given_shardings_and_reports_cost():
  mesh = tpu_mesh("v6e:2x2")
  rows, replicated = NamedSharding(mesh, ROWS), NamedSharding(mesh, P())
  compiled = compile_for_tpu(lambda x, w: x @ w, A((4 * 512, 256), jnp.float32),
                             A((256, 128), jnp.float32), mesh=mesh,
                             in_shardings=(rows, replicated), out_shardings=rows)
  assert compiled.cost["flops"] == 2 * 512 * 256 * 128                 # per chip
  assert compiled.memory.output_size_in_bytes == 512 * 128 * 4


@pytest.mark.slow
def test_harness_raises_the_compiler_message():
  """A block that cannot fit VMEM (256 MiB in + out > v5e's 128 MiB) must fail to compile."""
  mesh = tpu_mesh("v5e:2x2")
  fn = jax.shard_map(_whole_array_kernel, mesh=mesh, in_specs=P(), out_specs=P(),
                     check_vma=False)
  with pytest.raises(TpuCompileError, match=r"compile of .* for TPU v5 lite x4 failed: "
                     r"(?s:.*)RESOURCE_EXHAUSTED(?s:.*)vmem"):
    compile_for_tpu(fn, A((8192, 8192), jnp.float32), mesh=mesh)


def test_without_libtpu_the_tests_skip_saying_how_to_install_it(monkeypatch):
  monkeypatch.setattr(tpu_aot, "_library_path", lambda: None)
  with pytest.raises(pytest.skip.Exception, match=r"libtpu is not installed .*"
                     r"pip install 'libtpu==[0-9.]+\*'"):
    tpu_aot.tpu_devices("v5e:4x4")                  # not cached by an earlier test
