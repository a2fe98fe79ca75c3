"""The Jupyter tutorials run end to end, in their fast setting (MONAI_PATCHQUEUE_FAST=1)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_the_four_tutorials_are_there():
    assert [notebook.stem for notebook in NOTEBOOKS] == [
        "01_samplers", "02_training_with_the_queue", "03_grid_inference", "04_bundle",
    ]  # fmt: skip


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_runs_end_to_end_and_its_checks_hold(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MONAI_PATCHQUEUE_FAST", "1")
    monkeypatch.setenv("MONAI_PATCHQUEUE_TUTORIAL_OUTPUT", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    # a failing cell (the notebooks assert what they show) raises CellExecutionError with the cell's traceback
    client = NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    figures = sum("image/png" in output.get("data", {}) for cell in code_cells for output in cell.outputs)
    assert figures >= 1, "every tutorial shows at least one figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_tutorial_is_committed_with_its_full_run_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells), "run the notebook in full before committing it"
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors
