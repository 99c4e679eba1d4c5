"""The four notebooks run top to bottom, in their small configuration, in a fresh kernel; and the
committed notebooks are exactly what `notebooks/build.py` writes (code only, no outputs)."""

from __future__ import annotations

import importlib.util

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_retrieval.ipynb", "02_rerank.ipynb", "03_copy.ipynb", "04_serving.ipynb")


def _builder():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_are_built_and_stripped():
    builder = _builder()
    assert tuple(builder.NOTEBOOKS) == NAMES
    for name in NAMES:
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(committed)
        assert committed == builder.build(name), f"{name} is stale: run notebooks/build.py"
        for cell in committed.cells:
            assert not cell.get("outputs") and cell.get("execution_count") is None, name


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_the_small_configuration(name, movielens_dir, monkeypatch):
    monkeypatch.setenv("CASCADE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("CASCADE_DATA", str(movielens_dir))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    text = "\n".join(str(output.get("text", "")) for cell in notebook.cells
                     for output in cell.get("outputs", []))
    assert "small configuration" in text
    # every figure the notebook shows is drawn (a backend that drew nothing would still run)
    shows = sum(cell.source.count("plt.show()") for cell in notebook.cells if cell.cell_type == "code")
    figures = sum("image/png" in output.get("data", {}) for cell in notebook.cells
                  for output in cell.get("outputs", []))
    assert figures == shows, (figures, shows)
    if name == "04_serving.ipynb":
        assert "REST and gRPC agree: True" in text and "exit code 0" in text
