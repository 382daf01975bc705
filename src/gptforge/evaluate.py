"""Mean cross-entropy, perplexity and bits per byte of a model over a text.

Bits per byte divides the summed cross-entropy by the size of what was predicted, so models
with different tokenizers (GPT-2's 50,257 ids, Qwen's 151,669) compare on the same footing:
bits_per_byte = sum of cross-entropy (nats) over the predicted tokens / (UTF-8 bytes of
those predicted tokens x ln 2). The bytes counted are exactly those of the tokens scored as
targets: each window's inputs are predicted from the token before them, so the text's first
token and the tail too short for a last whole window are left out of both sums. A special
token predicted as a target (`<|endoftext|>` between documents) counts the bytes of its text.
"""

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
                  batch_size: int = 4, progress: bool = False, tokenizer=None) -> dict[str, float]:
    """Score every token of the texts (files, directories, globs) once, in non-overlapping windows.

    Returns the mean cross-entropy per predicted token (nats), its perplexity, the number
    of tokens scored, the UTF-8 bytes of those tokens and bits per byte (see the module
    docstring). `tokenizer` is the model's (default: GPT-2's BPE).
    """
    what = f"the text of {', '.join(map(str, texts))}"
    return evaluate_string(model, read_texts(texts), context_length, batch_size, progress, what=what,
                           tokenizer=tokenizer)


@torch.inference_mode()
def evaluate_string(model: GPTModel, text: str, context_length: int | None = None,
                    batch_size: int = 4, progress: bool = False, what: str = "the text",
                    tokenizer=None) -> dict[str, float]:
    """Like `evaluate_text`, for a text already in memory (`what` names it in errors)."""
    check_language_model(model)
    if not hasattr(tokenizer, "eos_ids"):  # GPT-2's BPE (tiktoken), the default
        check_vocabulary(model.cfg)
    elif tokenizer.n_vocab > model.cfg.vocab_size:
        raise BadInputError(f"the tokenizer makes ids up to {tokenizer.n_vocab - 1}, beyond the model's "
                            f"vocabulary of {model.cfg.vocab_size}: evaluate with the model's own tokenizer")
    ctx = model.cfg.context_length
    if context_length is not None:
        if isinstance(context_length, bool) or not isinstance(context_length, int) or \
                not 1 <= context_length <= ctx:
            raise BadInputError(f"--context-length must be a whole number from 1 to the model's "
                                f"context length ({ctx}), not {context_length!r}")
        ctx = context_length
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"--batch-size must be a whole number of at least 1, not {batch_size!r}")
    data = GPTDataset(text, tokenizer, max_length=ctx, stride=ctx, what=what,
                      hint="give a longer text or a smaller --context-length")
    device = model.emb.tok.weight.device
    model.eval()
    total, count = 0.0, 0
    seen = torch.zeros(model.cfg.vocab_size, dtype=torch.long)  # how often each id was a target
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
        seen += torch.bincount(targets.flatten().cpu(), minlength=seen.numel())
    n_bytes = _target_bytes(seen, tokenizer)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "bytes": n_bytes,
            "bits_per_byte": total / (n_bytes * math.log(2))}


def _target_bytes(counts: torch.Tensor, tokenizer) -> int:
    """UTF-8 bytes of the target tokens, from how often each id occurred: each id's bytes once."""
    if tokenizer is None:
        from gptforge.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    ids = torch.nonzero(counts).flatten().tolist()
    return sum(int(counts[i]) * len(tokenizer.decode_single_token_bytes(i)) for i in ids)
