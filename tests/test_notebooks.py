"""Every `colab/*.ipynb` executes headlessly, top to bottom, without a cell error.

New notebooks are picked up by the glob. The kernel is ipykernel's "python3", which
jupyter_client launches with this interpreter (`sys.executable`); a first, in-memory only
cell checks that (a stray user-level "python3" kernelspec could point elsewhere). The repo
root is put on the kernel's PYTHONPATH too, so the notebooks import this checkout even
without an editable install. Notebooks must be stored without outputs.

One kernel per test process runs the notebooks one after another (starting a kernel and
importing JAX costs ~4 s a notebook): the first cell also empties the namespace
(`%reset -f`) and moves to the notebook's own scratch directory, so a notebook that
leans on a name another one defined fails as it would in a fresh Colab runtime.
"""

import glob
import os
import sys

import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


def _name(path: str) -> str:
  return os.path.relpath(path, REPO)


def test_notebooks_exist():
  assert NOTEBOOKS, "no colab/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_is_valid_and_clean(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{_name(path)} cell {i} has stored outputs; clear them before committing")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
  """A started "python3" kernel (this interpreter, the repo on PYTHONPATH); restarted
  if a notebook killed it."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
  manager = AsyncKernelManager(kernel_name="python3")
  cwd = str(tmp_path_factory.mktemp("kernel"))

  def alive():
    if not run_sync(manager.is_alive)():
      run_sync(manager.start_kernel)(cwd=cwd, env=env)
    return manager

  yield alive
  if manager.has_kernel:
    run_sync(manager.shutdown_kernel)(now=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_executes(path, tmp_path, kernel):
  nb = nbformat.read(path, as_version=4)
  fresh = nbformat.v4.new_code_cell(
      f"%reset -f\nimport os, sys\nos.chdir({str(tmp_path)!r})\n"
      f"expected = {sys.prefix!r}\n"
      "assert sys.prefix == expected, f'kernel runs {sys.executable}, not {expected}'")
  nb.cells.insert(0, fresh)
  client = NotebookClient(nb, km=kernel(), timeout=600, kernel_name="python3")
  client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
