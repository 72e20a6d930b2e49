"""The tutorials run top to bottom on the default model (small settings, executed by nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.default_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    # A smaller tutorial SAE than a reader would train; cached after the first notebook builds it.
    monkeypatch.setenv("TUTORIAL_TOKENS", "60000")
    monkeypatch.chdir(tmp_path)
    book = nbformat.read(path, as_version=4)
    # allow_errors: nbclient records a failing cell's error in its outputs instead of raising, so
    # that the assertion below is what fails, naming the cell and the error.
    NotebookClient(book, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [f"cell {i}: {out.get('ename')}: {out.get('evalue')}" for i, cell in enumerate(book.cells)
              if cell.cell_type == "code" for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert errors == []
    assert any(cell.get("outputs") for cell in book.cells if cell.cell_type == "code")


def test_there_are_three_tutorials():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03"]
