"""The notebooks: a numbered sequence, stored without outputs, each with goals, an equation, a figure
and a closing test cell — and each executed top to bottom (nbclient, a real Jupyter kernel)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURE_CALLS = ("show(", "heatmaps(", "plt.")


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_notebooks_are_numbered_from_00_without_gaps():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 12, [p.name for p in NOTEBOOKS]


def test_the_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.name}" not in readme]
    assert not missing, f"README.md has no line for {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    dirty = [i for i, c in enumerate(cells(path)) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing (Jupyter: Edit → Clear Outputs)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_goals_equations_a_figure_and_a_closing_test(path):
    all_cells = cells(path)
    markdown = [source(c) for c in all_cells if c["cell_type"] == "markdown"]
    code = [source(c) for c in all_cells if c["cell_type"] == "code"]
    assert "Learning goals" in markdown[0], f"{path.name}: the first cell should state the learning goals"
    assert any("$$" in m for m in markdown), f"{path.name}: no display equation (LaTeX $$…$$)"
    assert any(call in c for c in code for call in FIGURE_CALLS), f"{path.name}: no figure"
    assert re.search(r"run_tests\(", code[-1]), f"{path.name}: the last code cell should run the module's tests"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
