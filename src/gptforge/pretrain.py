"""Pretraining: next-token prediction on a text corpus, through the shared training loop.

With no arguments this is the book's chapter-5 run: GPT-2 small (context 256, no QKV
bias, untied head, dropout 0.1) trained from scratch on "The Verdict" for 10 epochs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch

from gptforge.checkpoint import RunMeta
from gptforge.config import book_config, canonical_preset
from gptforge.data import GPTDataset, TokenFileDataset, read_texts
from gptforge.errors import BadInputError
from gptforge.loader import load
from gptforge.model import GPTModel, set_dropout
from gptforge.training import Callback, TrainConfig, Trainer, TrainResult, lm_loss

SAMPLE_PROMPT = "Every effort moves you"


@dataclass
class PretrainData:
    """Where the text comes from and how it is cut into windows."""

    text: list[str] | None = None  # files, directories, globs; None = The Verdict
    data: str | None = None  # a token file from `gptforge prepare`
    train_ratio: float = 0.9
    stride: int | None = None  # None = the context length (windows do not overlap)


def build_or_load_model(model: str, context_length: int | None = None,
                        drop_rate: float | None = None, **shape: int) -> GPTModel:
    """A preset name gives a fresh model with the book's settings (`shape` may change
    n_layers, emb_dim, n_heads); any other source (a run directory, a checkpoint) is
    loaded to continue training from."""
    overrides = dict(shape) if drop_rate is None else {**shape, "drop_rate": drop_rate}
    if canonical_preset(model) is not None and not Path(model).exists():
        # PyTorch's default init, as the book's model: with GPT-2's smaller init the
        # short Verdict run learns markedly slower.
        return GPTModel(book_config(model, context_length or 256, **overrides), init="torch")
    loaded = load(model, for_training=True)
    if shape:
        raise BadInputError("--n-layers/--emb-dim/--n-heads shape a new model; they cannot change "
                         f"the loaded model {model}")
    if drop_rate is not None:
        set_dropout(loaded, drop_rate)
    return loaded


def load_datasets(data: PretrainData, context_length: int) -> tuple[torch.utils.data.Dataset,
                                                                   torch.utils.data.Dataset | None]:
    """Training and validation windows: the first `train_ratio` of the text, then the rest."""
    stride = data.stride or context_length
    if data.data:
        train = TokenFileDataset(data.data, context_length, stride, 0.0, data.train_ratio)
        val = TokenFileDataset(data.data, context_length, context_length, data.train_ratio, 1.0) \
            if data.train_ratio < 1 else None
        return train, val
    if data.text:
        text = read_texts(data.text)
    else:
        from gptforge.download import download

        text = download("the-verdict").read_text(encoding="utf-8")
    split = int(data.train_ratio * len(text))
    train = GPTDataset(text[:split], max_length=context_length, stride=stride)
    val = GPTDataset(text[split:], max_length=context_length, stride=context_length) \
        if data.train_ratio < 1 else None
    return train, val


def pretrain(
    model: GPTModel,
    data: PretrainData,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    callbacks: Mapping[str, Callback] | None = None,
    progress: bool = False,
    base_model: str | None = None,
) -> TrainResult:
    """Train `model` on `data`, writing checkpoints, metrics and loss.png to `out_dir`.

    `callbacks` maps trainer events ("on_eval", "on_epoch_end") to functions of the
    trainer. `base_model` records where the weights started (a preset for a fresh
    model, or the checkpoint that training continues).
    """
    train, val = load_datasets(data, model.cfg.context_length)
    meta = RunMeta(model=model.cfg, task="lm", data=asdict(data), base_model=base_model)
    trainer = Trainer(model, train, val, lm_loss, cfg, out_dir, meta, progress=progress)
    for event, fn in (callbacks or {}).items():
        trainer.add_callback(event, fn)
    if resume:
        trainer.resume(out_dir)
    return trainer.fit()
