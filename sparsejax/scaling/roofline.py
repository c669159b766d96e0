"""TPU chip peaks and a roofline step-time estimate from a compiled program's counts.

Per chip, a step needs at least its FLOPs at peak, its HBM bytes at HBM bandwidth and
its ICI bytes at interconnect bandwidth; with perfect overlap it takes the largest of
the three (Williams et al. 2009, "Roofline"), which is what `estimate` returns. It is
optimistic about overlap, about the ICI (the chip's whole bidirectional bandwidth, all
links at once) and about FLOPs the compiler could not count (Pallas kernels report only
what their cost estimate declares); the HBM bytes are XLA's "bytes accessed" estimate,
which counts every operand and result of every fused op and can exceed the real traffic.

MFU (model FLOPs utilization, PaLM, Chowdhery et al. 2022) = model FLOPs per step /
(chips × peak FLOP/s × step time); `model FLOPs` exclude rematerialization.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's peaks (per chip; bf16 FLOPs; bytes and bytes per second)."""
  name: str
  peak_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  ici_bandwidth: float     # bidirectional, all links of the chip
  source: str


# Keyed by jax's `device.device_kind`. Figures from the Cloud TPU system architecture
# pages (checked 2026-12): HBM capacities in GiB as the runtime reports them.
CHIPS = {
    "TPU v5 lite": Chip("v5e", 197e12, 16 << 30, 819e9, 400e9,
                        "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 459e12, 95 << 30, 2765e9, 1200e9,
                   "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 918e12, 32 << 30, 1640e9, 800e9,
                        "https://cloud.google.com/tpu/docs/v6e"),
}


def chip(device_kind: str) -> Chip:
  """The CHIPS entry of a device kind (ValueError naming the supported ones)."""
  if device_kind not in CHIPS:
    raise ValueError(f"no roofline figures for {device_kind!r}; known chips: "
                     f"{', '.join(f'{k} ({c.name})' for k, c in CHIPS.items())}")
  return CHIPS[device_kind]


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Lower-bound times (seconds) of one step on one chip."""
  compute_s: float
  hbm_s: float
  ici_s: float

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.hbm_s, self.ici_s)

  @property
  def bound(self) -> str:
    """Which of "compute", "hbm", "ici" sets the step time."""
    times = {"compute": self.compute_s, "hbm": self.hbm_s, "ici": self.ici_s}
    return max(times, key=times.get)

  def as_dict(self) -> dict[str, float | str]:
    return {**dataclasses.asdict(self), "step_s": self.step_s, "bound": self.bound}


def estimate(spec: Chip, flops: float, hbm_bytes: float, ici_bytes: float) -> Roofline:
  """The roofline of a per-chip program: `flops`, `hbm_bytes` accessed and `ici_bytes`
  sent by each chip."""
  return Roofline(flops / spec.peak_flops, hbm_bytes / spec.hbm_bandwidth,
                  ici_bytes / spec.ici_bandwidth)


def mfu(model_flops_per_step: float, num_chips: int, spec: Chip, step_s: float) -> float:
  """Model FLOPs utilization of a step taking `step_s` seconds on `num_chips` chips."""
  return model_flops_per_step / (num_chips * spec.peak_flops * step_s)
