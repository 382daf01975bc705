"""Log-probabilities of tokens, for completions that ask for `logprobs` or score a prompt.

`token_logprobs` reads them off a model's logits; `score` runs prompts through the
model in one batched forward pass, no cache, to score them (a completion with
`echo` and `max_tokens: 0`); `openai_logprobs` writes them in the legacy
completions format (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)
that OpenAI's API, vLLM and lm-evaluation-harness use.

The values are the model's own distribution: a log-softmax of the raw logits, in
float32, before temperature or top-k/top-p filtering (as vLLM reports them).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, Sequence

import torch

MAX_LOGPROBS = 20  # top alternatives per token a request may ask for (vLLM's default limit)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its place, most
    likely first, as (id, logprob) pairs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """The log-probability of `tokens` (T,) under `logits` (T, V), where row t is the
    distribution `tokens[t]` was drawn from, with the `top` most likely tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()  # (T,)
    if top > 0:
        values, ids = logp.topk(top, dim=-1)  # (T, top) each
        pairs = [tuple(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    else:
        pairs = [()] * len(chosen)
    return [TokenLogprob(int(t), p, alts) for t, p, alts in zip(tokens.tolist(), chosen, pairs)]


@torch.inference_mode()
def score(model: torch.nn.Module, prompts: Sequence[Sequence[int]], top: int) -> list[list[TokenLogprob]]:
    """Each prompt's tokens after the first, scored by `model` in one forward pass of the
    right-padded batch: entry t of a prompt's list is its token t+1 given tokens 0..t."""
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], device=device)  # (B, T)
    logits = model(ids)  # (B, T, V): padding comes after each prompt, so no prompt sees it
    return [token_logprobs(logits[row, :len(p) - 1], ids[row, 1:len(p)], top)
            for row, p in enumerate(prompts)]


def score_batches(lengths: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
    """Split prompts of these lengths, in order, into (start, end) batches of at most
    `max_tokens` padded tokens (at least one prompt each)."""
    batches, start, width = [], 0, 0
    for i, n in enumerate(lengths):
        wider = max(width, n)
        if i > start and (i - start + 1) * wider > max_tokens:
            batches.append((start, i))
            start, wider = i, n
        width = wider
    batches.append((start, len(lengths)))
    return batches


def token_text(tokenizer, token: int) -> str:
    """One token's text on its own (a piece of a character split across tokens reads as U+FFFD)."""
    return tokenizer.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def text_offsets(tokenizer, tokens: Sequence[int], start: int = 0) -> list[int]:
    """Where each token begins in the text the tokens decode to, counted from `start`: a
    character split across tokens belongs to the token that completes it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, at = [], start
    for token in tokens:
        offsets.append(at)
        at += len(decoder.decode(tokenizer.decode_single_token_bytes(token)))
    return offsets


def text_end(tokenizer, tokens: Sequence[int], start: int = 0) -> int:
    """Where the text of `tokens` ends, counted from `start` (as `text_offsets` counts)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars = sum(len(decoder.decode(tokenizer.decode_single_token_bytes(t))) for t in tokens)
    return start + chars + len(decoder.decode(b"", final=True))


def openai_logprobs(tokenizer, entries: Sequence[TokenLogprob | None], tokens: Sequence[int],
                    offset: int = 0, text_length: int | None = None) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object for `tokens`, with `entries` their logprobs (None
    where there is none: the first token of an echoed prompt).

    `offset` is where the first token begins in the choice's text; offsets past
    `text_length` (tokens after a cut at a stop sequence) are clipped to it.
    """
    offsets = text_offsets(tokenizer, tokens, offset)
    if text_length is not None:
        offsets = [min(o, text_length) for o in offsets]
    top_logprobs: list[dict[str, float] | None] = []
    for entry in entries:
        if entry is None:
            top_logprobs.append(None)
            continue
        alternatives: dict[str, float] = {}
        for token, logprob in entry.top:
            alternatives.setdefault(token_text(tokenizer, token), logprob)
        # The token itself is always listed, as vLLM does, so a reader can tell if it was the top one.
        alternatives.setdefault(token_text(tokenizer, entry.token), entry.logprob)
        top_logprobs.append(alternatives)
    return {"tokens": [token_text(tokenizer, t) for t in tokens],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": top_logprobs, "text_offset": offsets}
