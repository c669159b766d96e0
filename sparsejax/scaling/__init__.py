"""Scaling on paper: compile for TPU slices (v5e, v5p, v6e pods) on a CPU host with
libtpu, and read memory per chip, FLOPs, collectives and a roofline step time off the
compiled program. `sparsejax.scaling.plan.plan(config, topology)` does it for a training
config (it imports the trainer, so it is not imported here). See docs/scaling.md."""

from sparsejax.scaling.hlo import CollectiveStats, collectives, largest_buffers
from sparsejax.scaling.roofline import CHIPS, Chip, Roofline, chip, estimate, mfu
from sparsejax.scaling.tpu import (LIBTPU_DIR, LibtpuMissingError, TpuCompileError,
                                   TpuCompiled, compile_for_tpu, library_path,
                                   libtpu_requirement, missing_message, tpu_devices,
                                   tpu_mesh)
