"""Test setup: 8 fake CPU devices (before any JAX op) and small shared fixtures.

Tests compile hundreds of tiny XLA programs and run each a few times, so XLA:CPU's
LLVM optimization is turned off (`--xla_backend_optimization_level=0`: it halves the
suite's time) and so are its fusion emitters (another ~20%). Subprocesses (the CLI
end-to-end tests, notebook kernels) inherit the flags, and the persistent compilation
cache in `.jax_cache/` (shared by all of them).
"""

import contextlib
import importlib.metadata
import importlib.util
import os

# XLA:CPU's fusion emitters compile the suite's small programs ~40% slower than the
# classic emitters (the suite: ~20% faster without them). Flags XLA does not know abort
# the process, so this one is set only for the jaxlib it was measured with.
_CPU_FUSION_EMITTERS_OFF = (
    "--xla_cpu_use_fusion_emitters=false"
    if importlib.metadata.version("jaxlib").startswith("0.10.") else "")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
    _CPU_FUSION_EMITTERS_OFF]))
# One persistent compilation cache for the pytest workers and every subprocess they
# start (CLI tests, notebook kernels): the many tests that build the same tiny models
# compile each program once per run instead of once per process. No size limit: LRU
# eviction races between the processes (`make clean` empties it).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# With libtpu importable (the `tpu-aot` extra) plain JAX would probe for a TPU and print
# libtpu's init errors on this CPU suite; TPU programs are compiled ahead of time by
# tests/tpu_aot.py instead. On a TPU host, run with JAX_PLATFORMS=tpu,cpu.
if importlib.util.find_spec("libtpu") is not None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import hypothesis  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config_dict(**sections):
  """The tiny training config as a plain dict, with per-section overrides."""
  config = {
      "model": dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2),
      "data": dict(seq_len=32, batch_size=8),
      "optim": dict(warmup_steps=2, learning_rate=3e-3),
      "train": dict(num_steps=6, log_every=2, eval_every=3, eval_batches=2,
                    checkpoint_every=3, sample_tokens=0),
      "mesh": dict(data=-1),
  }
  for name, overrides in sections.items():
    config.setdefault(name, {}).update(overrides)
  return config


# Hypothesis profiles of the property tests (tests/property):
#   sparsejax  20 examples per property (a test may ask for fewer), no deadline (the first
#              example of every new shape pays an XLA compile), no example database (a
#              failure prints its `@reproduce_failure` blob to replay it);
#   thorough   200 examples, for a long local or nightly run:
#              `pytest tests/property --hypothesis-profile=thorough`.
# Tests that set `max_examples` themselves keep their count under every profile.
_HYPOTHESIS = dict(deadline=None, database=None, derandomize=False, print_blob=True,
                   suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                          hypothesis.HealthCheck.data_too_large])
hypothesis.settings.register_profile("sparsejax", max_examples=20, **_HYPOTHESIS)
hypothesis.settings.register_profile("thorough", max_examples=200, **_HYPOTHESIS)


def pytest_configure(config):
  """Loads the `sparsejax` hypothesis profile unless `--hypothesis-profile` chose one."""
  if config.getoption("hypothesis_profile", None) is None:
    hypothesis.settings.load_profile("sparsejax")


def pytest_collection_modifyitems(config, items):
  """Runs the `slow` tests (seconds to a minute each) before the rest (mostly under a
  second), keeping the order within each group. `make test` (`--dist worksteal`) gives
  each worker a contiguous half of this order and lets an idle worker take the tail of
  the other's queue, so the run ends on short tests instead of one worker finishing a
  long one while the other idles."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def rng_seed(request):
  """A fresh seed per test (derived from the test id), so inputs differ across tests."""
  import zlib
  return zlib.crc32(request.node.nodeid.encode())


@contextlib.contextmanager
def experiment_module(name):
  """Imports experiments/<name>.py for in-process tests and removes the absl flags it
  defined afterwards (the scripts share flag names such as --repeats and --out).
  Flags of libraries it imported for the first time (absl.logging's --verbosity,
  grain's) stay: later imports of those libraries will not define them again."""
  import sys
  from absl import flags
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    yield module
  finally:
    # A script's own flags are attributed to its loader, and config override flags
    # (created while parsing) to absl.flags itself: only other modules' flags stay.
    library = {f.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
               if module in sys.modules
               and not module.startswith(("importlib", "absl.flags"))
               for f in defined}
    for flag in set(flags.FLAGS) - before - library:
      delattr(flags.FLAGS, flag)


def run_main(module, argv):
  """Parses `argv` into absl flags, runs `module.main`, then resets the flags."""
  from absl import flags
  flags.FLAGS(argv)
  try:
    module.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
