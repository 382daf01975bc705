"""Training-curve plots (matplotlib is imported only when a plot is drawn)."""

from __future__ import annotations

import os
from pathlib import Path

from gptforge.fileio import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], out_dir: str | os.PathLike, metrics: list[str] = ()) -> Path:
    """Draw loss.png (train and validation loss against steps, tokens seen on a second
    axis) and `<metric>.png` for each metric; return the loss plot's path."""
    plt = _pyplot()
    out = Path(out_dir)
    steps = [r["step"] for r in history]
    tokens = [r["tokens_seen"] for r in history]
    paths = []
    for name in ["loss", *metrics]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, style in (("train", "-"), ("val", "-.")):
            values = [r.get(f"{split}_{name}") for r in history]
            if any(v is not None for v in values):
                label = "Training" if split == "train" else "Validation"
                ax.plot(steps, values, style, label=f"{label} {name}")
        ax.set_xlabel("Steps")
        ax.set_ylabel(name.capitalize())
        ax.legend(loc="best")
        top = ax.twiny()  # a second x-axis with the tokens seen at the same points
        top.plot(tokens, [r.get(f"train_{name}") for r in history], alpha=0)
        top.set_xlabel("Tokens seen")
        fig.tight_layout()
        path = out / f"{name}.png"
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths[0]
