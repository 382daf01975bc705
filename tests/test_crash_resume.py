"""Crash consistency: a run killed (SIGKILL) or interrupted (SIGINT, SIGTERM) at any moment
resumes to exactly the weights and metrics of a run that was never stopped.

The faults are injected with GPTFORGE_FAULT (gptforge/faults.py): the training process
sends itself the signal the N-th time it reaches a named point: inside each file write
of a save (data written, not yet flushed or renamed), between a checkpoint's completion
and its becoming current, after an optimizer step, at the start of an evaluation and
at the end of an epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import load

SRC = Path(__file__).resolve().parents[1] / "src"
# 9 steps an epoch (144 windows of 32 tokens, batches of 16), 12 steps: one epoch end, evaluations
# every 2 steps, checkpoints every 3 (so a save can be cut between two evaluations), dropout on.
RUN = ["pretrain", "--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "32",
       "--batch-size", "16", "--max-steps", "12", "--eval-every", "2", "--eval-batches", "2",
       "--save-every", "3", "--keep-last", "2", "--no-progress", "--device", "cpu"]

pytestmark = pytest.mark.needs_data("the-verdict")


def _gptforge(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("GPTFORGE_FAULT", None)
    if fault:
        env["GPTFORGE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "gptforge.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # timing differs


def _assert_same_run(run: Path, reference: Path) -> None:
    assert _metrics(run) == _metrics(reference)  # every evaluation once, with equal values
    ours, theirs = load(run).state_dict(), load(reference).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    strays = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not strays, strays  # nothing half-written is left behind once a later save succeeded


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "reference"
    done = _gptforge([*RUN, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [r["step"] for r in _metrics(out)]
    assert steps == [1, 3, 5, 7, 9, 11, 12]
    return out


KILL_POINTS = [
    "write:model.safetensors:1",  # inside the first save (step 0): no checkpoint exists yet
    "write:model.safetensors:2",  # inside the weights of the step-3 checkpoint
    "write:training_state.pt:2",  # inside its training state (the largest file)
    "write:gptforge.json:4",  # inside the file that makes it current
    "checkpoint:written:2",  # complete, not yet current
    "checkpoint:current:2",  # current, the older one not yet removed
    "write:model.safetensors:4",  # inside a later save, after one evaluation past the last
    "step:5",  # between two saves
    "eval:3",  # at the start of an evaluation
    "epoch_end:1",  # before the end-of-epoch sample
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_anywhere_resumes_exactly(tmp_path, reference, point):
    run = tmp_path / "run"
    killed = _gptforge([*RUN, "--out", str(run)], fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _gptforge(["pretrain", "--resume", str(run), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout or "starting it over" in resumed.stdout  # it says which
    _assert_same_run(run, reference)


@pytest.mark.parametrize("point", ["step:4:INT", "eval:2:INT", "eval:4:TERM", "epoch_end:1:INT",
                                   "write:training_state.pt:2:INT", "checkpoint:written:3:TERM"])
def test_ctrl_c_or_sigterm_at_any_phase_resumes_exactly(tmp_path, reference, point):
    run = tmp_path / "run"
    stopped = _gptforge([*RUN, "--out", str(run)], fault=point)
    assert stopped.returncode == 130, stopped.stderr[-2000:]  # a clean stop, with a checkpoint
    assert "stopping at the next safe point" in stopped.stderr
    resumed = _gptforge(["pretrain", "--resume", str(run), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(run, reference)


def test_a_pickled_payload_in_the_training_state_is_refused_without_running(tmp_path, reference):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    current = run / json.loads((run / "gptforge.json").read_text())["checkpoint"]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 12, "payload": Payload()}, current / "training_state.pt")
    refused = _gptforge(["pretrain", "--resume", str(run), "--no-progress"])
    assert refused.returncode == 2
    assert "refused to load" in refused.stderr and "Traceback" not in refused.stderr
    assert not marker.exists()  # the payload never ran
