"""Hypothesis profiles for the property-based tests of `sparsejax.ops`.

  sparsejax 20 examples per property (a test may ask for fewer), no deadline (the first
            example of every new shape pays an XLA compile), no example database (a
            failure prints its `@reproduce_failure` blob to replay it).
  thorough  200 examples per property, for a long local or nightly run:
            `pytest tests/property --hypothesis-profile=thorough`.

The `sparsejax` profile is loaded unless `--hypothesis-profile` names another. Tests that
set `max_examples` themselves keep their count under every profile.
"""

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("sparsejax", max_examples=20, **_COMMON)
settings.register_profile("thorough", max_examples=200, **_COMMON)


def pytest_configure(config):
  """Loads the `sparsejax` profile unless `--hypothesis-profile` chose one."""
  if config.getoption("hypothesis_profile", None) is None:
    settings.load_profile("sparsejax")
