"""The notebooks: a numbered sequence, stored with the outputs of their current code (figures included),
each with goals, an equation, a figure and a closing test cell — and each executed top to bottom
(nbclient, a real Jupyter kernel)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

from minipa.course import NOTEBOOK_STORE_COMMAND, blanked_cells, cell_source, notebook_code_hash

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURE_CALLS = ("show(", "heatmaps(", "plt.")
MAX_STORED_KIB = 200  # per notebook, outputs included


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_the_notebooks_are_numbered_from_00_without_gaps():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 12, [p.name for p in NOTEBOOKS]


def test_the_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.name}" not in readme]
    assert not missing, f"README.md has no line for {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_come_from_its_current_code(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    blanked = [i for i, c in enumerate(notebook["cells"]) if c.get("metadata", {}).get("minipa", {}).get("blanked")]
    if blanked:
        pytest.skip(f"{path.name}: a student copy's notebook (cells {blanked} blanked); its stored outputs are the reference's")
    stored = notebook["metadata"].get("minipa", {}).get("code_sha256")
    refresh = f"refresh the stored outputs with `{NOTEBOOK_STORE_COMMAND} notebooks/{path.name}` (all notebooks: no name)"
    assert stored, f"{path.name}: stored without outputs; {refresh}"
    assert stored == notebook_code_hash(notebook), f"{path.name}: its code changed since its outputs were stored; {refresh}"
    unrun = [i for i, c in enumerate(notebook["cells"]) if c["cell_type"] == "code" and c.get("execution_count") is None]
    assert not unrun, f"{path.name}: cells {unrun} have no stored run (outputs cleared?); {refresh}"


def test_the_code_hash_changes_with_the_code_only():
    notebook = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    code = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    markdown = next(c for c in notebook["cells"] if c["cell_type"] == "markdown")
    before = notebook_code_hash(notebook)
    markdown["source"], code["outputs"], code["execution_count"] = "changed", [], None
    assert notebook_code_hash(notebook) == before
    code["source"] = "".join(code["source"]) + "\nx = 1"
    assert notebook_code_hash(notebook) != before


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_shows_a_figure_and_stays_small(path):
    outputs = [o for c in cells(path) for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no stored figure (an image/png output)"
    timed = [i for i, c in enumerate(cells(path)) if "execution" in c.get("metadata", {})]
    assert not timed, f"{path.name}: cells {timed} keep execution timings in their metadata; store with `{NOTEBOOK_STORE_COMMAND}`"
    kib = path.stat().st_size / 1024
    assert kib <= MAX_STORED_KIB, f"{path.name}: {kib:.0f} KiB stored; keep figures small (fewer or smaller panels) and text outputs short"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_goals_equations_a_figure_and_a_closing_test(path):
    all_cells = cells(path)
    markdown = [cell_source(c) for c in all_cells if c["cell_type"] == "markdown"]
    code = [cell_source(c) for c in all_cells if c["cell_type"] == "code"]
    assert "Learning goals" in markdown[0], f"{path.name}: the first cell should state the learning goals"
    assert any("$$" in m for m in markdown), f"{path.name}: no display equation (LaTeX $$…$$)"
    assert any(call in c for c in code for call in FIGURE_CALLS), f"{path.name}: no figure"
    assert re.search(r"run_tests\(", code[-1]), f"{path.name}: the last code cell should run the module's tests"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    if blank := blanked_cells(notebook):  # a student copy: cells that rebuild an assignment were left to the student
        cells_left = "; ".join(f"cell {i}: assignment {', '.join(map(str, n))}" for i, n in blank.items())
        pytest.skip(f"{path.name}: a student copy's notebook; write its blanked cells first ({cells_left})")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
