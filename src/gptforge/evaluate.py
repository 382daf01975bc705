"""Mean cross-entropy and perplexity of a model over a text."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from gptforge.data import GPTDataset, check_language_model, check_vocabulary, read_texts
from gptforge.errors import BadInputError
from gptforge.model import GPTModel


@torch.inference_mode()
def evaluate_text(model: GPTModel, texts: Sequence[str | os.PathLike], context_length: int | None = None,
                  batch_size: int = 4, progress: bool = False) -> dict[str, float]:
    """Score every token of the texts (files, directories, globs) once, in non-overlapping windows.

    Returns the mean cross-entropy per predicted token (nats), its perplexity, and the
    number of tokens scored.
    """
    what = f"the text of {', '.join(map(str, texts))}"
    return evaluate_string(model, read_texts(texts), context_length, batch_size, progress, what=what)


@torch.inference_mode()
def evaluate_string(model: GPTModel, text: str, context_length: int | None = None,
                    batch_size: int = 4, progress: bool = False, what: str = "the text") -> dict[str, float]:
    """Like `evaluate_text`, for a text already in memory (`what` names it in errors)."""
    check_language_model(model)
    check_vocabulary(model.cfg)
    ctx = model.cfg.context_length
    if context_length is not None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or \
                not 1 <= context_length <= ctx:
            raise BadInputError(f"--context-length must be a whole number from 1 to the model's "
                                f"context length ({ctx}), not {context_length!r}")
        ctx = context_length
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"--batch-size must be a whole number of at least 1, not {batch_size!r}")
    data = GPTDataset(text, max_length=ctx, stride=ctx, what=what,
                      hint="give a longer text or a smaller --context-length")
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
