"""Log-likelihood of continuations given contexts, as lm-evaluation-harness scores them.

Tokenization follows lm-eval's `_encode_pair`: trailing spaces of a context move to the front
of its continuation, the whole text is encoded, and the continuation's tokens are what follows
the context's own encoding; the model's BOS (when its tokenizer adds one, as Llama's and
Gemma's do) goes first, and an empty context is the BOS or end-of-text token alone. A pair too
long for the model keeps the last `context_length + 1` tokens, as lm-eval does.

Speed: requests are grouped by their context's tokens. A batch runs one forward over its
contexts (right-padded, logits taken at each context's last token) into a KV cache, copies
each context's cache rows once per continuation, and runs all continuations in one more
forward at per-row positions; a one-token continuation (MMLU's " A") needs no second pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptforge.errors import BadInputError
from gptforge.model import KVCache


@dataclass(frozen=True)
class Score:
    """A continuation's summed log-probability (nats), whether greedy decoding gives it
    exactly, and its number of tokens."""

    logprob: float
    greedy: bool
    n_tokens: int


def _prefix_token(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None:
        return bos
    eot = getattr(tokenizer, "eot_token", None)
    if eot is None:
        raise BadInputError("the tokenizer has neither a BOS nor an end-of-text token to stand for an empty context")
    return eot


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The token ids of a context and of its continuation, split as lm-eval splits them."""
    bos = getattr(tokenizer, "bos_id", None)
    if not context:
        return [_prefix_token(tokenizer)], tokenizer.encode_ordinary(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode_ordinary(context + continuation)
    ctx = tokenizer.encode_ordinary(context)
    head = [bos] if bos is not None else []
    return head + ctx, whole[len(ctx):]


class _MemoEncoder:
    """A tokenizer whose `encode_ordinary` remembers the texts it has encoded."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self._seen = tokenizer, {}
        self.bos_id = getattr(tokenizer, "bos_id", None)
        self.eot_token = getattr(tokenizer, "eot_token", None)

    def encode_ordinary(self, text: str) -> list[int]:
        if text not in self._seen:
            self._seen[text] = self._tokenizer.encode_ordinary(text)
        return self._seen[text]


def _device_of(model) -> torch.device:
    return model.emb.tok.weight.device


@torch.inference_mode()
def score_requests(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   on_progress: Callable[[int, int], None] | None = None) -> list[Score]:
    """Score each (context, continuation) pair: the continuation's log-likelihood given the context.

    `batch_size` is the number of continuations per forward pass. `on_progress(n_requests,
    n_tokens)` is called after each batch with the requests and tokens it scored.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"--batch-size must be a whole number of at least 1, not {batch_size!r}")
    limit = model.cfg.context_length
    memo = _MemoEncoder(tokenizer)  # a context is encoded once, however many choices share it
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(memo, context, continuation)
        if not cont:
            raise BadInputError(f"request {index}: the continuation {continuation!r} has no tokens to score")
        if len(cont) > limit:
            raise BadInputError(f"request {index}: the continuation is {len(cont)} tokens, longer than the "
                                f"model's context length ({limit})")
        keep = limit + 1 - len(cont)  # lm-eval keeps the last limit + 1 tokens of context + continuation
        ctx = ctx[-keep:]
        groups.setdefault(tuple(ctx), []).append((index, cont))
    # Longest contexts first, so the padding in a batch stays small.
    order = sorted(groups.items(), key=lambda g: -len(g[0]))
    results: list[Score | None] = [None] * len(requests)
    batch: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]] = []
    rows = 0
    for ctx, conts in order:
        longest_ctx = len(batch[0][0]) if batch else len(ctx)
        longest_cont = max([len(c) for _, cs in batch for _, c in cs] + [len(c) for _, c in conts])
        if batch and (rows + len(conts) > batch_size or longest_ctx + longest_cont - 1 > limit):
            _score_batch(model, batch, results, on_progress)
            batch, rows = [], 0
        batch.append((ctx, conts))
        rows += len(conts)
    if batch:
        _score_batch(model, batch, results, on_progress)
    return results  # type: ignore[return-value]


def _score_batch(model, batch, results: list, on_progress) -> None:
    """Score the continuations of a few contexts: one pass over the contexts, one over the continuations."""
    device = _device_of(model)
    ctx_lens = [len(ctx) for ctx, _ in batch]
    rows = [(g, index, cont) for g, (_, conts) in enumerate(batch) for index, cont in conts]
    longest_cont = max(len(cont) for _, _, cont in rows)
    T = max(ctx_lens)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    for g, (ctx, _) in enumerate(batch):
        ids[g, :len(ctx)] = torch.tensor(ctx)
    cache = model.new_cache(len(batch), T + longest_cont - 1)
    last = torch.tensor(ctx_lens, device=device) - 1
    first = model(ids.to(device), cache=cache, positions=0, logits_at=last)[:, 0].float()  # (G, V)
    first = torch.log_softmax(first, dim=-1)

    row_group = torch.tensor([g for g, _, _ in rows], device=device)
    first_ids = torch.tensor([cont[0] for _, _, cont in rows], device=device)
    first_rows = first[row_group]  # (R, V)
    logprob = first_rows.gather(1, first_ids[:, None])[:, 0]  # (R,)
    greedy = first_rows.argmax(-1) == first_ids
    n_tokens = sum(ctx_lens) + sum(len(cont) for _, _, cont in rows)

    if longest_cont > 1:
        # Each continuation row reads its context's keys and values; the copy is one gather.
        row_cache = KVCache(cache.k[:, row_group], cache.v[:, row_group])
        rest = torch.zeros(len(rows), longest_cont - 1, dtype=torch.long)
        targets = torch.zeros(len(rows), longest_cont - 1, dtype=torch.long)
        mask = torch.zeros(len(rows), longest_cont - 1, dtype=torch.bool)
        for r, (_, _, cont) in enumerate(rows):
            n = len(cont) - 1
            rest[r, :n] = torch.tensor(cont[:-1])
            targets[r, :n] = torch.tensor(cont[1:])
            mask[r, :n] = True
        rest, targets, mask = rest.to(device), targets.to(device), mask.to(device)
        positions = torch.tensor([ctx_lens[g] for g, _, _ in rows], device=device)
        logits = model(rest, cache=row_cache, positions=positions).float()  # (R, T', V)
        # log-softmax at the targets only: one (R, T', V) tensor instead of two
        picked = logits.gather(2, targets[..., None])[..., 0] - logits.logsumexp(-1)  # (R, T')
        logprob = logprob + (picked * mask).sum(1)
        greedy = greedy & ((logits.argmax(-1) == targets) | ~mask).all(1)
    for r, (_, index, cont) in enumerate(rows):
        results[index] = Score(float(logprob[r]), bool(greedy[r]), len(cont))
    if on_progress is not None:
        on_progress(len(rows), n_tokens)


class Throughput:
    """Counts requests and tokens scored and the seconds taken, for a progress bar's tokens/s."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, n_tokens: int) -> float:
        """Count `n_tokens` more; return tokens per second so far."""
        self.tokens += n_tokens
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
