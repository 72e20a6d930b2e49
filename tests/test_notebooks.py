"""The tutorials run top to bottom on the default model (small settings, executed by nbclient).

Each notebook's settings live in its cell tagged `parameters`; the test inserts a cell after it that
overrides some of them (papermill's convention), so readers see the published settings and the test
runs the same code on less work."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

OVERRIDES = {"02_patching_and_attribution": {"SWEEP_POSITIONS": "[4, 10]"}}
"""Per notebook, the settings the test replaces: tutorial 2 sweeps the subject's last token and the last
position (757 patches, 12 s at one thread on a loaded machine) instead of four positions (2,330, 62 s)."""

KERNEL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""The kernel computes on one thread: small ops on 2 cores shared with pytest's own process and with
whatever else the machine runs stall at every OpenMP barrier (tutorial 3 measured 272 s with two threads
beside a harvest, 37 s with one)."""


def parameters_cell(book) -> int:
    tagged = [i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and book.cells[tagged[0]].cell_type == "code", tagged
    return tagged[0]


def with_overrides(book, overrides: dict[str, str]):
    """The notebook with a cell after its parameters cell assigning `overrides`, each of which must
    name a setting that cell defines (a renamed setting would otherwise be overridden silently)."""
    index = parameters_cell(book)
    tree = ast.parse(book.cells[index].source)
    defined = {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
               if isinstance(target, ast.Name)}
    assert set(overrides) <= defined, f"not set in the parameters cell: {set(overrides) - defined}"
    if overrides:
        cell = nbformat.v4.new_code_cell("\n".join(f"{name} = {value}" for name, value in overrides.items()),
                                         metadata={"tags": ["injected-parameters"]})
        book.cells.insert(index + 1, cell)
    return book


@pytest.mark.slow
@pytest.mark.default_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    # A smaller tutorial SAE than a reader would train; cached after the first notebook builds it.
    monkeypatch.setenv("TUTORIAL_TOKENS", "60000")
    for name, value in KERNEL_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    book = with_overrides(nbformat.read(path, as_version=4), OVERRIDES.get(path.stem, {}))
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


def test_overrides_land_after_the_parameters_cell_and_name_its_settings():
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        index = parameters_cell(book)
        overrides = OVERRIDES.get(path.stem, {})
        changed = with_overrides(book, overrides)
        if overrides:
            assert changed.cells[index + 1].source == "\n".join(f"{k} = {v}" for k, v in overrides.items())
    book = nbformat.read(NOTEBOOKS[0], as_version=4)
    with pytest.raises(AssertionError, match="NO_SUCH_SETTING"):
        with_overrides(book, {"NO_SUCH_SETTING": "1"})
