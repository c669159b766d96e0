"""Recording benchmark results: the environment line and appending to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import subprocess

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO, "benchmarks", "RESULTS.md")


def git_commit() -> tuple[str, bool | None]:
  """(short HEAD commit, whether tracked files have uncommitted changes)."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    return commit, bool(status.strip())
  except (OSError, subprocess.CalledProcessError):
    return "unknown", None


def load_average() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def environment() -> dict:
  """Date, device, JAX version, commit and load average of this measurement."""
  commit, dirty = git_commit()
  device = jax.devices()[0]
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
          "jax": jax.__version__, "commit": commit + ("+dirty" if dirty else ""),
          "loadavg": load_average()}


def append_section(title: str, body: str, *, command: str) -> str:
  """Appends `## title` with the environment, command and body to RESULTS.md."""
  env = environment()
  text = (f"\n## {title}\n\n{env['date']} · {env['device']} · JAX {env['jax']} · "
          f"commit {env['commit']} · load avg {env['loadavg']}\n\n"
          f"```sh\n{command}\n```\n\n{body}\n")
  os.makedirs(os.path.dirname(RESULTS_MD), exist_ok=True)
  if not os.path.exists(RESULTS_MD):
    text = "# sparsejax benchmark results\n" + text
  with open(RESULTS_MD, "a") as f:
    f.write(text)
  return RESULTS_MD
