"""A training run on disk: crash-consistent checkpoints, the state that resumes them exactly.

A run directory holds:

    gptforge.json        the run's RunMeta; "checkpoint" names the current checkpoint
    checkpoints/step-N/  a complete checkpoint: the model (weights, or LoRA adapters) with
                         its own gptforge.json, and training_state.pt (optimizer, LR
                         schedule, random-number generators, data position, metrics
                         history, settings), all from step N
    train_config.json    the run's settings;  metrics.jsonl  one row per evaluation
    best/                the model with the lowest validation loss so far
    base/                a LoRA run's frozen copy of a base that cannot be loaded again

A checkpoint is written whole into a hidden temporary directory (every file flushed
to disk), renamed into place, and only then made current by atomically replacing
gptforge.json; older checkpoints are removed after that. A kill at any moment
leaves the previous checkpoint current and complete, and `--resume` continues
from it exactly. Training state is read with `torch.load(weights_only=True)`: a
file holding anything but tensors and plain data is refused, never run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptforge import faults
from gptforge.checkpoint import META_NAME, RunMeta, save_model
from gptforge.errors import CheckpointError, NotFoundError
from gptforge.fileio import atomic_torch_save, atomic_write, publish_dir

log = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
METRICS_NAME = "metrics.jsonl"
TRAIN_CONFIG_NAME = "train_config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


def capture_rng() -> dict[str, Any]:
    """The state of every random-number generator training draws from, as tensors and plain
    data only (so that it loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # gptforge 0.1 kept numpy's own tuple
        np.random.set_state(n)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, meta: RunMeta,
                    state: dict[str, Any], keep: int = 1) -> Path:
    """Write a complete checkpoint of step `state["step"]` and make it the run's current one.

    `keep` is how many checkpoints stay (at least this one). Returns its directory.
    """
    run = Path(run_dir)
    folder = run / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    name, n = f"step-{step:07d}", 1
    while (folder / name).exists():  # saved again at the same step (say, after an interruption)
        name, n = f"step-{step:07d}.{n}", n + 1
    tmp = folder / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, meta.replace(step=step, checkpoint=None,
                                        base_model=_relative_base(meta.base_model, run, folder / name)))
    atomic_torch_save(state, tmp / STATE_NAME)
    publish_dir(tmp, folder / name)
    faults.reach("checkpoint:written")
    # The run's gptforge.json: the checkpoint's own (what save_model found: adapters, head
    # size), pointing at it, with the base as seen from the run directory.
    RunMeta.read(folder / name).replace(checkpoint=f"{CHECKPOINTS_DIR}/{name}",
                                        base_model=meta.base_model).write(run)
    faults.reach("checkpoint:current")
    _prune(run, folder, max(keep, 1))
    return folder / name


def save_best(run_dir: str | os.PathLike, model: nn.Module, meta: RunMeta, step: int,
              val_loss: float) -> None:
    """Keep the model with the lowest validation loss so far under best/ (replaced whole)."""
    run = Path(run_dir)
    tmp = run / f".{BEST_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tmp, meta.replace(step=step, val_loss=val_loss, checkpoint=None,
                                        base_model=_relative_base(meta.base_model, run, run / BEST_DIR)))
    publish_dir(tmp, run / BEST_DIR)


def _relative_base(base_model: str | None, run: Path, target: Path) -> str | None:
    """A run's own base/ as seen from `target` (the loader resolves it from there)."""
    if base_model == "base" and (run / "base").is_dir():
        return os.path.relpath(run / "base", target)
    return base_model


def _prune(run: Path, folder: Path, keep: int) -> None:
    """Remove checkpoints older than the newest `keep`, and what interrupted saves left."""
    current = RunMeta.read(run).checkpoint
    steps = sorted(p for p in folder.glob("step-*") if p.is_dir())
    # The checkpoint of step 0 (saved when a run starts) is only there until another exists.
    start = [p for p in steps if p.name.split(".")[0] == "step-0000000"]
    later = [p for p in steps if p not in start]
    for old in (start if later else []) + later[:-keep]:
        if f"{CHECKPOINTS_DIR}/{old.name}" != current:
            shutil.rmtree(old)
    for stray in [*folder.glob(".*.tmp"), *folder.glob(".*.old"), *run.glob(".*.tmp"), *run.glob(".*.old")]:
        shutil.rmtree(stray) if stray.is_dir() else stray.unlink()


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether a run has a checkpoint to resume from (rather than only its settings)."""
    run = Path(run_dir)
    return RunMeta.read(run).checkpoint is not None or (run / STATE_NAME).is_file()


def load_training_state(run_dir: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The training state of a run's current checkpoint, and that checkpoint's directory.

    The state is loaded with weights_only=True: only tensors and plain data. A run
    written by gptforge 0.1 (training_state.pt beside the weights) still resumes.
    """
    run = Path(run_dir)
    meta = RunMeta.read(run)
    folder = run / meta.checkpoint if meta.checkpoint else run
    path = folder / STATE_NAME
    if not path.is_file():
        raise NotFoundError(f"{run} holds no checkpoint ({STATE_NAME}) to resume from; start the run "
                            f"again without --resume")
    state = _safe_load(path)
    saved_step = RunMeta.read(folder).step if (folder / META_NAME).is_file() else None
    if saved_step is not None and saved_step != state.get("step"):
        raise CheckpointError(f"{run}: the weights are from step {saved_step} but the training "
                              f"state from step {state.get('step')}; the last save was cut off")
    return state, folder


def _safe_load(path: Path) -> dict[str, Any]:
    # numpy's random state, as gptforge 0.1 stored it, is plain data too.
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "GLOBAL" not in text and "global" not in text:
            raise CheckpointError(f"{path} is not a readable training state (not a file torch.save "
                                  f"wrote); it may be truncated or corrupt: resume from another copy "
                                  f"of the run, or start it again") from None
        culprit = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line), "")
        raise CheckpointError(f"refused to load {path}: it holds Python objects other than tensors and "
                              f"plain data, which could run code on this machine ({culprit[:200]}); "
                              f"resume only runs written by gptforge that you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable training state ({err}); it may be truncated "
                              f"or corrupt: resume from another copy of the run, or start it again") from None
    needed = {"step", "epoch", "batch_in_epoch", "optimizer", "scheduler", "rng", "history"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path} is not a gptforge training state (it lacks "
                              f"{', '.join(sorted(needed - set(state or {})))})")
    return state


def write_metrics(run_dir: str | os.PathLike, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from a history: one row per evaluation, each step once."""
    with atomic_write(Path(run_dir) / METRICS_NAME, "w", encoding="utf-8") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")


def append_metrics(run_dir: str | os.PathLike, record: dict) -> None:
    with open(Path(run_dir) / METRICS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
