"""Speculative decoding: a small draft model proposes, the large target model verifies.

Decoding one token reads every weight of the model, so a large model spends most of a
token's time moving weights, whether it scores one position or five. Speculative
decoding lets a small draft model (same tokenizer) guess the next `draft_tokens`
tokens one by one, cheaply, and then runs the target once over all of them:

    accepted:  the prompt ...  t
    draft:                        d1 d2 d3 d4            (4 cheap steps of the draft)
    target:    one pass over   t  d1 d2 d3 d4  -> its own choice after each of them
    kept:      d1 d2 (the target agreed), then the target's own token where it
               disagreed (or, if it agreed with all four, its token after d4)

Each round keeps between 1 and draft_tokens + 1 tokens for one pass of the target.
Greedy decoding keeps exactly the tokens the target would pick alone. With
temperature > 0 a draft token d is kept with probability min(1, p(d) / q(d)) (p the
target's distribution, q the draft's), and a rejected one is replaced by a draw from
max(0, p - q), renormalised: the tokens then follow the target's distribution exactly
(Leviathan et al., 2023; Chen et al., 2023).

The KV caches need no copying on a rejection: each model remembers how many of the
sequence's tokens its cache holds, and the keys and values past that are overwritten
by the next call before anything attends to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from gptforge.errors import BadInputError
from gptforge.generate import (
    StopIds,
    check_sampling,
    decode_one,
    filter_logits,
    pack_chunks,
    stop_set,
    use_decode_layout,
)
from gptforge.model import KVCache


@dataclass
class SpeculationStats:
    """What a speculative run did: rounds (target passes), draft tokens proposed and kept."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """The share of draft tokens the target kept."""
        return self.accepted / self.proposed if self.proposed else 0.0


class Sequence1:
    """One model's view of one growing token sequence: it feeds the model only the
    tokens its KV cache (one row) does not hold yet; all of them, without a cache.

    `cached` leading tokens of the sequence are in `cache`: a server that already
    holds a request's keys and values passes its own row and count.
    """

    def __init__(self, model: nn.Module, cache: KVCache | None, cached: int = 0) -> None:
        self.model = model
        self.cache = cache
        self.cached = cached  # how many leading tokens of the sequence the cache holds

    @classmethod
    def new(cls, model: nn.Module, use_cache: bool, max_len: int) -> Sequence1:
        return cls(model, model.new_cache(1, max_len) if use_cache else None)

    def logits(self, tokens: list[int], last: int) -> torch.Tensor:
        """Logits (last, V) that follow each of the last `last` tokens of `tokens`."""
        device = self.model.emb.tok.weight.device
        if self.cache is None:
            ids = torch.tensor([tokens[-self.model.cfg.context_length:]], device=device)
            return self.model(ids)[0, -last:]
        start = min(self.cached, len(tokens) - last)
        ids = torch.tensor([tokens[start:]], device=device)  # (1, T)
        at = None if last > 1 else torch.tensor([ids.shape[1] - 1], device=device)
        out = self.model(ids, self.cache, start, logits_at=at)[0, -last:]  # (last, V)
        self.cached = len(tokens)
        return out

    def rewind(self, length: int) -> None:
        """Forget cached tokens past the first `length` (the rejected draft tokens)."""
        self.cached = min(self.cached, length)


def _distribution(logits: torch.Tensor, temperature: float, top_k: int | None,
                  top_p: float | None) -> torch.Tensor:
    """The probabilities (…, V) that `gptforge.generate.sample` draws from."""
    return torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)


def check_pair(target: nn.Module, draft: nn.Module) -> None:
    """Refuse a draft model that cannot propose tokens for `target`, saying why."""
    if draft is target:
        raise BadInputError("the draft model is the target model itself: give a smaller model "
                            "that shares its tokenizer")
    t_vocab, d_vocab = target.cfg.vocab_size, draft.cfg.vocab_size
    if t_vocab != d_vocab:
        raise BadInputError(
            f"the draft model's vocabulary has {d_vocab} tokens and the target's {t_vocab}: "
            "speculative decoding needs a draft with the target's tokenizer (e.g. a smaller "
            "model of the same family)")
    t_dev, d_dev = target.emb.tok.weight.device, draft.emb.tok.weight.device
    if t_dev != d_dev:
        raise BadInputError(f"the draft model is on {d_dev} and the target on {t_dev}: put both "
                            "on the same device")


def check_tokenizers(target_tokenizer, draft_tokenizer) -> None:
    """Refuse a draft whose tokenizer splits text differently from the target's: its
    proposals would be ids of other pieces of text."""
    sample = "Every effort moves you, 1234 times: naïve café ünïcode\n\n### Response:"
    same = (target_tokenizer.n_vocab == draft_tokenizer.n_vocab
            and target_tokenizer.encode(sample) == draft_tokenizer.encode(sample))
    if not same:
        raise BadInputError("the draft model's tokenizer is not the target model's: speculative "
                            "decoding needs a draft that shares the target's tokenizer (e.g. a "
                            "smaller model of the same family, or a GPT-2 model for a GPT-2 target)")


@torch.inference_mode()
def speculative_stream(
    target: nn.Module,
    draft: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: StopIds = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids that continue `prompt` (one sequence), as the
    target model alone would produce them (greedy: the same ids; sampling: the same
    distribution), drafting `draft_tokens` at a time with `draft`. Stops after the
    first id in `eos_id`. Pass a `SpeculationStats` to learn how many drafts were kept.
    """
    check_sampling(temperature, top_k, top_p)
    check_pair(target, draft)
    if draft_tokens < 1:
        raise BadInputError(f"draft_tokens must be at least 1, got {draft_tokens}")
    tokens = [int(t) for t in prompt]
    if not tokens:
        raise BadInputError("the prompt is empty: give at least one token")
    ctx = min(target.cfg.context_length, draft.cfg.context_length)
    if len(tokens) > ctx:
        raise BadInputError(f"the prompt has {len(tokens)} tokens but the models' context length "
                            f"is {ctx}: shorten the prompt")
    if max_new_tokens <= 0:
        return
    stats = stats if stats is not None else SpeculationStats()
    stops = set(stop_set(eos_id))
    for model in (target, draft):
        model.eval()
        use_decode_layout(model)
    pack_chunks(target)  # its check of k + 1 tokens costs about one token's pass
    big = Sequence1.new(target, use_cache, ctx)
    small = Sequence1.new(draft, use_cache, ctx)
    greedy = temperature == 0.0
    produced = 0
    while produced < max_new_tokens:
        k = min(draft_tokens, max_new_tokens - produced - 1, ctx - len(tokens) - 1)
        if k < 1:  # the last token, or the context is full: the target on its own
            window = torch.tensor([tokens], device=target.emb.tok.weight.device)
            logits = decode_one(target, None, window, [len(tokens)])[0]
            new = [_pick(logits, greedy, temperature, top_k, top_p, generator)]
        else:
            new = speculate(big, small, tokens, k, greedy, temperature, top_k, top_p, generator, stats)
        for token in new[:max_new_tokens - produced]:
            tokens.append(token)
            produced += 1
            yield token
            if token in stops:
                return


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None,
          top_p: float | None, generator: torch.Generator | None) -> int:
    if greedy:
        return int(torch.argmax(logits))
    probs = _distribution(logits, temperature, top_k, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def speculate(big: Sequence1, small: Sequence1, tokens: list[int], k: int, greedy: bool,
           temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None, stats: SpeculationStats) -> list[int]:
    """One draft-then-verify round after `tokens`: the tokens it keeps (1 to k + 1 of
    them). Afterwards both sequences hold the keys and values of `tokens` and of the
    kept tokens but the last."""
    n = len(tokens)
    proposal, draft_probs = list(tokens), []
    for _ in range(k):  # the draft proposes k tokens, one at a time
        logits = small.logits(proposal, 1)[0]  # (V,)
        if greedy:
            proposal.append(int(torch.argmax(logits)))
        else:
            q = _distribution(logits, temperature, top_k, top_p)
            draft_probs.append(q)
            proposal.append(int(torch.multinomial(q, 1, generator=generator)))
    drafted = proposal[n:]
    # One pass of the target over the last accepted token and the k drafts: its logits
    # after each of them, k + 1 rows.
    logits = big.logits(proposal, k + 1)  # (k + 1, V)
    kept: list[int] = []
    if greedy:
        choices = torch.argmax(logits, dim=-1).tolist()  # the target's token after each
        for d, choice in zip(drafted, choices):
            if d != choice:
                break
            kept.append(d)
        kept.append(choices[len(kept)])  # the correction, or the bonus token after all k
    else:
        p = _distribution(logits, temperature, top_k, top_p)  # (k + 1, V)
        for i, d in enumerate(drafted):
            u = torch.rand((), generator=generator, device=p.device)
            if u * draft_probs[i][d] <= p[i, d]:  # kept with probability min(1, p/q)
                kept.append(d)
                continue
            residual = torch.clamp(p[i] - draft_probs[i], min=0)
            if float(residual.sum()) <= 0:  # p == q: any draw from p is right
                residual = p[i]
            kept.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
            break
        else:
            kept.append(int(torch.multinomial(p[k], 1, generator=generator)))
    accepted = len(kept) - 1
    stats.rounds += 1
    stats.proposed += k
    stats.accepted += accepted
    # Both caches hold keys and values of drafts that were not kept: forget them.
    big.rewind(n + accepted)
    small.rewind(n + accepted)
    return kept


def speculative_generate(target: nn.Module, draft: nn.Module, prompt: Sequence[int],
                         max_new_tokens: int, **options) -> list[int]:
    """The prompt followed by the new ids (up to and including a stop id); see
    `speculative_stream` for the options."""
    return [int(t) for t in prompt] + list(speculative_stream(target, draft, prompt, max_new_tokens,
                                                              **options))
