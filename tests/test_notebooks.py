"""The notebooks run from top to bottom (in their tiny settings) without a failing cell."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _execute(notebook: Path, cwd: Path, **env: str) -> None:
    """Run every cell of `notebook` in a fresh kernel of this Python, in `cwd`."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(notebook, as_version=4)
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    kernel_env = {**os.environ, "PYTHONPATH": path, **env}
    # "python3" is started with this interpreter (jupyter_client swaps in sys.executable).
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env)  # raises CellExecutionError naming the failing cell


# ------------------------------------------------------------------------------------
# notebooks/spam_classifier.ipynb

@pytest.mark.needs_data("sms-spam-collection")
def test_spam_notebook(tmp_path):
    _execute(ROOT / "notebooks" / "spam_classifier.ipynb", tmp_path, GPTFORGE_NB_TINY="1",
             OMP_NUM_THREADS="1")
    runs = list((tmp_path / "runs").glob("notebook-spam-classifier*"))
    assert len(runs) == 1 and (runs[0] / "test_metrics.json").is_file()


# ------------------------------------------------------------------------------------
# notebooks/instruction_finetuning.ipynb

@pytest.mark.needs_data("instruction-data", "vocab-qwen2", "chat-template-Qwen-Qwen3-0.6B")
def test_instruction_notebook(tmp_path):
    import json

    _execute(ROOT / "notebooks" / "instruction_finetuning.ipynb", tmp_path, GPTFORGE_NB_TINY="1")
    runs = sorted((tmp_path / "runs").glob("notebook-instruct*"))
    assert [r.name for r in runs] == ["notebook-instruct", "notebook-instruct-qwen3"]
    for run in runs:
        assert len(json.loads((run / "responses.json").read_text())) == 3
    modern = json.loads((runs[1] / "gptforge.json").read_text())
    assert modern["model"]["arch"] == "qwen3" and modern["template"] == "chat" and modern["lora"]["rank"] == 16
