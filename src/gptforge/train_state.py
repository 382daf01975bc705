"""A training run on disk: checkpoints, the state that resumes them exactly, their rotation.

A run directory holds the model (`checkpoint.save_model`: weights or LoRA adapters,
and `gptforge.json` with the step), `training_state.pt` (optimizer, LR schedule,
random-number generators, data position, metrics history, settings) from the same
step, `train_config.json` and `metrics.jsonl`. Periodic checkpoints also keep the
model of the last few saves under `checkpoints/step-N/`, and the one with the
lowest validation loss under `best/`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptforge.checkpoint import RunMeta, save_model
from gptforge.errors import CheckpointError, NotFoundError
from gptforge.fileio import atomic_torch_save

STATE_NAME = "training_state.pt"
METRICS_NAME = "metrics.jsonl"
TRAIN_CONFIG_NAME = "train_config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"


def capture_rng() -> dict[str, Any]:
    """The state of every random-number generator training draws from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, meta: RunMeta,
                    state: dict[str, Any]) -> None:
    """Write the model and its training state (from the same step) into `run_dir`."""
    run = Path(run_dir)
    save_model(model, run, meta.replace(step=state["step"]))
    atomic_torch_save(state, run / STATE_NAME)


def keep_copy(run_dir: str | os.PathLike, model: nn.Module, meta: RunMeta, step: int,
              keep_last: int) -> None:
    """Keep the model of this step under checkpoints/step-N, and only the last `keep_last`."""
    if keep_last <= 0:
        return
    folder = Path(run_dir) / CHECKPOINTS_DIR
    save_model(model, folder / f"step-{step:07d}", meta.replace(step=step))
    for old in sorted(folder.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old)


def save_best(run_dir: str | os.PathLike, model: nn.Module, meta: RunMeta, step: int,
              val_loss: float) -> None:
    """Keep the model with the lowest validation loss so far under best/."""
    save_model(model, Path(run_dir) / BEST_DIR, meta.replace(step=step, val_loss=val_loss))


def load_training_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The training state saved in `run_dir`, checked to be from the same step as its model."""
    run = Path(run_dir)
    path = run / STATE_NAME
    if not path.is_file():
        raise NotFoundError(f"{run} holds no training state ({STATE_NAME}) to resume from")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved_step = RunMeta.read(run).step
    if saved_step is not None and saved_step != state["step"]:
        raise CheckpointError(f"{run}: the weights are from step {saved_step} but the training "
                              f"state from step {state['step']}; the last save was cut off")
    return state
