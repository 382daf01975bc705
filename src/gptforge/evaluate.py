"""Mean cross-entropy and perplexity of a model over a text."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from gptforge.data import GPTDataset, read_texts
from gptforge.model import GPTModel


@torch.inference_mode()
def evaluate_text(model: GPTModel, texts: Sequence[str | os.PathLike], context_length: int | None = None,
                  batch_size: int = 4, progress: bool = False) -> dict[str, float]:
    """Score every token of the texts (files, directories, globs) once, in non-overlapping windows.

    Returns the mean cross-entropy per predicted token (nats), its perplexity, and the
    number of tokens scored.
    """
    return evaluate_string(model, read_texts(texts), context_length, batch_size, progress)


@torch.inference_mode()
def evaluate_string(model: GPTModel, text: str, context_length: int | None = None,
                    batch_size: int = 4, progress: bool = False) -> dict[str, float]:
    """Like `evaluate_text`, for a text already in memory."""
    ctx = min(context_length or model.cfg.context_length, model.cfg.context_length)
    data = GPTDataset(text, max_length=ctx, stride=ctx)
    device = model.emb.tok.weight.device
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(data), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, unit="batch", desc="evaluating")
    for start in starts:
        batch = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        inputs = torch.stack([b[0] for b in batch]).to(device)
        targets = torch.stack([b[1] for b in batch]).to(device)
        logits = model(inputs).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
