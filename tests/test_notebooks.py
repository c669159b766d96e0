"""Every `colab/*.ipynb` executes headlessly, top to bottom, without a cell error.

New notebooks are picked up by the glob. The kernel is ipykernel's "python3", which
jupyter_client launches with this interpreter (`sys.executable`); a first, in-memory only
cell checks that (a stray user-level "python3" kernelspec could point elsewhere). The repo
root is put on the kernel's PYTHONPATH too, so the notebooks import this checkout even
without an editable install. Notebooks must be stored without outputs.
"""

import glob
import os
import sys

import nbformat
import pytest
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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_executes(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  check = nbformat.v4.new_code_cell(
      f"import sys\nexpected = {sys.prefix!r}\n"
      "assert sys.prefix == expected, f'kernel runs {sys.executable}, not {expected}'")
  nb.cells.insert(0, check)
  monkeypatch.setenv("PYTHONPATH",
                     os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
