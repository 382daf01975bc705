"""Pretraining: next-token prediction on a text corpus, through the shared training loop.

With no arguments this is the book's chapter-5 run: GPT-2 small (context 256, no QKV
bias, untied head, dropout 0.1) trained from scratch on "The Verdict" for 10 epochs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.checkpoint import is_gptforge_dir, load_model, save_model
from gptforge.config import GPTConfig, canonical_preset
from gptforge.data import GPTDataset, TokenFileDataset, read_texts
from gptforge.model import GPTModel
from gptforge.training import Trainer, TrainConfig, TrainResult

SAMPLE_PROMPT = "Every effort moves you"


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of next-token predictions; target -100 marks ignored positions."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


@dataclass
class PretrainData:
    """Where the text comes from and how it is cut into windows."""

    text: list[str] | None = None  # files, directories, globs; None = The Verdict
    data: str | None = None  # a token file from `gptforge prepare`
    train_ratio: float = 0.9
    stride: int | None = None  # None = the context length (windows do not overlap)


def book_config(preset: str = "gpt2-small", context_length: int = 256, **overrides) -> GPTConfig:
    """The book's model settings: context 256, dropout 0.1, no QKV bias, untied output head."""
    settings = dict(context_length=context_length, drop_rate=0.1, qkv_bias=False, tie_weights=False)
    return GPTConfig.from_name(preset, **{**settings, **overrides})


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
    if is_gptforge_dir(model):
        loaded = load_model(model)
    else:
        from gptforge.pretrained import load_pretrained

        loaded = load_pretrained(model)
    if shape:
        raise ValueError("--n-layers/--emb-dim/--n-heads shape a new model; they cannot change "
                         f"the loaded model {model}")
    if drop_rate is not None:
        set_dropout(loaded, drop_rate)
    return loaded


def set_dropout(model: GPTModel, rate: float) -> None:
    """Change the dropout rate of every dropout in the model (and its config)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        if hasattr(module, "drop_rate"):
            module.drop_rate = rate
    model.cfg.drop_rate = rate


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
    on_eval: Callable[[dict], None] | None = None,
    on_epoch_end: Callable[[GPTModel, int], None] | None = None,
    progress: bool = False,
    meta: dict | None = None,
) -> TrainResult:
    """Train `model` on `data`, writing checkpoints, metrics and loss.png to `out_dir`."""
    train, val = load_datasets(data, model.cfg.context_length)
    trainer = Trainer(
        model, train, val, lm_loss, cfg, out_dir, save_model=save_model,
        on_eval=on_eval, progress=progress, meta={"task": "lm", **(meta or {})},
        on_epoch_end=(lambda epoch: on_epoch_end(model, epoch)) if on_epoch_end else None,
    )
    if resume:
        trainer.resume(out_dir)
    return trainer.fit()
