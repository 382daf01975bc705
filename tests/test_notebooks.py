"""The notebooks run from top to bottom (in their tiny settings) without a failing cell,
the committed learning-path notebooks carry their outputs, and the fine-tuning notebooks
reach what their text promises."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
NUMBERED = sorted(NOTEBOOKS.glob("0*.ipynb"))
SPAM = NOTEBOOKS / "06_spam_classifier.ipynb"
INSTRUCT = NOTEBOOKS / "07_supervised_instruction.ipynb"
# The book's two example messages (chapter 6) and their labels.
BOOK_MESSAGES = {
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award.": "spam",
    "Hey, just wanted to check if we're still on for dinner tonight? Let me know!": "ham",
}


def _code_cells(notebook: Path) -> list:
    nbformat = pytest.importorskip("nbformat")
    return [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]


def _execute(notebook: Path, cwd: Path, **env: str):
    """Run every cell of `notebook` in a fresh kernel of this Python, in `cwd`; return the result."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(notebook, as_version=4)
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    kernel_env = {**os.environ, "PYTHONPATH": path, "GPTFORGE_NB_TINY": "1", **env}
    kernel_env.pop("GPTFORGE_NB_MODEL", None)  # the notebooks' default (offline) path
    # "python3" is started with this interpreter (jupyter_client swaps in sys.executable).
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=1800,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env)  # raises CellExecutionError naming the failing cell
    return nb


def _text(cell) -> str:
    """The printed text of a code cell's outputs."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


# ------------------------------------------------------------------------------------
# Every notebook, in tiny mode. The spam and instruction notebooks have their own tests
# below (which check their results too); a notebook without code (a page left at an old
# name that says where the notebook moved) has nothing to run.

@pytest.mark.parametrize("notebook", [p for p in ALL if p not in (SPAM, INSTRUCT)], ids=lambda p: p.name)
def test_notebook_runs(notebook, tmp_path):
    if not _code_cells(notebook):
        pytest.skip(f"{notebook.name} has no code (a pointer to a moved notebook)")
    _execute(notebook, tmp_path, OMP_NUM_THREADS="1")


def test_old_names_point_to_the_new_notebooks():
    for old, new in (("spam_classifier", SPAM), ("instruction_finetuning", INSTRUCT)):
        nbformat = pytest.importorskip("nbformat")
        cells = nbformat.read(NOTEBOOKS / f"{old}.ipynb", as_version=4).cells
        assert [c.cell_type for c in cells] == ["markdown"]
        assert f"({new.name})" in cells[0].source and new.is_file()


@pytest.mark.parametrize("notebook", NUMBERED, ids=lambda p: p.name)
def test_committed_notebook_has_outputs(notebook):
    """A learning-path notebook is committed executed: every code cell has run, none failed."""
    cells = _code_cells(notebook)
    assert cells, f"{notebook.name} has no code cells"
    for i, cell in enumerate(cells):
        assert cell.get("execution_count") is not None, f"{notebook.name}: code cell {i} was not run"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{notebook.name}: code cell {i} failed: {errors[0].get('ename')}"
    assert sum(len(c.get("outputs", [])) for c in cells) >= len(cells) // 2, \
        f"{notebook.name}: most code cells have no output"


# ------------------------------------------------------------------------------------
# notebooks/06_spam_classifier.ipynb

@pytest.mark.needs_data("sms-spam-collection")
def test_spam_notebook(tmp_path):
    """Tiny mode trains the notebook's from-scratch model exactly as its CPU mode does
    (5 epochs, 650 steps; only fewer evaluations) and ends at 96.67% test accuracy with seed
    123. Wall time: 634 s measured on 2 cores shared with many other jobs; about a minute on 2
    free cores (benchmarks/classify.py). The test asks for the 95% that the notebook promises."""
    nb = _execute(SPAM, tmp_path, OMP_NUM_THREADS="2")
    runs = list((tmp_path / "runs").glob("notebook-spam-classifier*"))
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "test_metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95, metrics["test_accuracy"]
    assert metrics["step"] == 650

    printed = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    shown = re.search(r"test accuracy: ([\d.]+)%", printed)
    assert shown and float(shown.group(1)) >= 95.0
    for message, label in BOOK_MESSAGES.items():
        line = next(line for line in printed.splitlines() if line.endswith(message))
        assert line.split()[0] == label, line


# ------------------------------------------------------------------------------------
# notebooks/07_supervised_instruction.ipynb

@pytest.mark.needs_data("instruction-data", "vocab-qwen2", "chat-template-Qwen-Qwen3-0.6B")
def test_instruction_notebook(tmp_path):
    _execute(INSTRUCT, tmp_path, OMP_NUM_THREADS="1")
    runs = sorted((tmp_path / "runs").glob("notebook-instruct*"))
    assert [r.name for r in runs] == ["notebook-instruct", "notebook-instruct-qwen3"]
    for run in runs:
        assert len(json.loads((run / "responses.json").read_text())) == 3
    modern = json.loads((runs[1] / "gptforge.json").read_text())
    assert modern["model"]["arch"] == "qwen3" and modern["template"] == "chat" and modern["lora"]["rank"] == 16
