"""Benchmark timing shared by the bench_* scripts: interleaved round-robin samples, and
the forward+backward program that the kernel checks time."""

from __future__ import annotations

import math
import time

import jax


def time_methods(methods, args, repeats: int, min_sample_s: float) -> dict[str, list]:
  """Per-call times (s) of every method, interleaved round-robin across samples."""
  inner = {}
  for name, fn in methods.items():
    jax.block_until_ready(fn(*args[name]))             # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args[name]))
    once = max(time.perf_counter() - t0, 1e-7)
    inner[name] = max(1, math.ceil(min_sample_s / once))
  samples = {name: [] for name in methods}
  for _ in range(repeats):
    for name, fn in methods.items():
      n, a = inner[name], args[name]
      t0 = time.perf_counter()
      out = None
      for _ in range(n):
        out = fn(*a)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) / n)
  return samples


def fwd_bwd_program(fn, diff: tuple[int, ...]):
  """jit of (*args, ct) -> (fn(*args), *grads): the output and the vjp of `ct` w.r.t.
  the arguments at positions `diff` (the others are held fixed)."""
  def fwd_bwd(*args_ct):
    *args, ct = args_ct

    def partial(*d):
      full = list(args)
      for i, x in zip(diff, d):
        full[i] = x
      return fn(*full)

    out, vjp = jax.vjp(partial, *[args[i] for i in diff])
    return (out, *vjp(ct))
  return jax.jit(fwd_bwd)
