"""Text generation: a pure sampling function, a streaming token loop, and text helpers.

`sample` turns one step's logits into token ids. `generate_stream` runs the model one
token at a time (with a KV cache, each new token costs one position) and yields ids
as they come; `generate` collects them. Tokenization stays outside the loop, in
`stream_text`, which turns streamed ids into text pieces.
"""

from __future__ import annotations

import codecs
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.model import GPTModel


class DecodeLinear(nn.Linear):
    """A linear layer laid out for decoding a few tokens at a time on CPUs.

    The weight is the same [out, in] parameter stored input-major (transposed in
    memory), the order CPU matrix-vector products stream fastest. Such a product runs
    on one core, and one core cannot draw all of the memory bandwidth, so inputs of at
    most `max_rows` rows are computed as `parts` partial products, each over one
    contiguous slice of the weight's rows; `torch.bmm` runs them on parallel threads
    and their sum is the result. Longer inputs (a prompt) and small weights (which
    cache holds anyway, so splitting only adds work) take the usual path.
    """

    max_rows = 16
    min_split_size = 1 << 17  # weights of fewer elements (512 KB in float32) are not split

    def __init__(self, layer: nn.Linear, parts: int) -> None:
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None,
                         device="meta")  # no storage: the layer's own parameters are used
        self.weight, self.bias = layer.weight, layer.bias
        if self.weight.is_contiguous():
            self.weight.data = self.weight.data.t().contiguous().t()
        splittable = self.in_features % parts == 0 and self.weight.numel() >= self.min_split_size
        self.parts = parts if splittable else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.parts == 1 or rows > self.max_rows or not self.weight.t().is_contiguous():
            return F.linear(x, self.weight, self.bias)
        slices = self.weight.t().view(self.parts, -1, self.out_features)  # (P, in/P, out)
        pieces = x.reshape(rows, self.parts, -1).transpose(0, 1)  # (P, rows, in/P)
        y = torch.bmm(pieces, slices).sum(0)  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def use_decode_layout(model: nn.Module, parts: int | None = None) -> nn.Module:
    """Swap every linear layer of a CPU model for a `DecodeLinear`, for faster decoding.

    Values, shapes and parameter names stay the same; only the weights' memory order
    and the way one token's products are computed change (gpt2-small decodes about
    1.8x faster here, see docs/benchmarks.md). `parts` defaults to PyTorch's thread
    count. For models that are done training: an optimizer built before the change
    would hold state in the old order. Models on other devices are left as they are.
    Returns the model, changed in place.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        return model
    parts = parts or torch.get_num_threads()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, name, DecodeLinear(child, parts))
    return model


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise a ValueError that names the bad setting, if any."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of tokens, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit that top-k and then top-p (nucleus) filtering removes.

    top-k keeps the k largest logits. top-p keeps the fewest most probable tokens
    whose probabilities add up to at least `top_p` (always at least one token).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id for each row of `logits` (B, V) -> (B,).

    Temperature 0 is greedy (argmax); otherwise logits are divided by the
    temperature, filtered by top-k / top-p, and a token is drawn from the softmax.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids, a (B,) tensor per step, for a batch of prompts `idx` (B, T).

    Stops after `max_new_tokens`, or once every row has produced `eos_id` (rows that
    finished earlier then repeat `eos_id`). Past the context length the model sees
    the last `context_length` tokens; positions then shift every step, so cached keys
    go stale and each step runs the whole window, exactly as `use_cache=False` does.
    """
    check_sampling(temperature, top_k, top_p)
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    ctx = model.cfg.context_length
    if idx.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if idx.shape[1] > ctx:
        raise ValueError(f"the prompt has {idx.shape[1]} tokens but the model's context length is "
                         f"{ctx}: shorten the prompt")
    model.eval()
    tokens = idx.to(model.emb.tok.weight.device)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    cached = 0  # positions already in the KV cache
    if use_cache:
        model.setup_cache(tokens.shape[0], ctx)
    try:
        for _ in range(max_new_tokens):
            if use_cache and tokens.shape[1] <= ctx:
                logits = model(tokens[:, cached:], start_pos=cached)[:, -1]  # (B, V)
                cached = tokens.shape[1]
            else:
                logits = model(tokens[:, -ctx:])[:, -1]
            next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_ids = torch.where(done, torch.full_like(next_ids, eos_id), next_ids)
                done |= next_ids == eos_id
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            yield next_ids
            if eos_id is not None and bool(done.all()):
                break
    finally:
        if use_cache:
            model.clear_cache()


def generate(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return the prompt ids `idx` (B, T) followed by up to `max_new_tokens` new ids.

    Temperature 0 (the default) decodes greedily; see `generate_stream` for the rest.
    """
    squeeze = idx.dim() == 1
    idx = idx.unsqueeze(0) if squeeze else idx
    steps = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p,
                                 eos_id, use_cache, generator))
    out = torch.cat([idx.to(steps[0].device if steps else idx.device)] +
                    [s[:, None] for s in steps], dim=1)
    return out[0] if squeeze else out


def stream_text(model: GPTModel, prompt: str, max_new_tokens: int = 50, tokenizer=None,
                stop_at_eos: bool = True, **sampling) -> Iterator[str]:
    """Generate from a text prompt and yield the continuation as text pieces.

    Bytes of a character split across tokens are held back until complete, so every
    piece is valid text. `sampling` takes generate_stream's keyword arguments.
    """
    from gptforge.tokenizer import EOT_ID, get_tokenizer, text_to_ids

    tokenizer = tokenizer or get_tokenizer()
    ids = torch.tensor([text_to_ids(prompt, tokenizer)], dtype=torch.long)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for next_ids in generate_stream(model, ids, max_new_tokens, eos_id=EOT_ID if stop_at_eos else None,
                                    **sampling):
        token = int(next_ids[0])
        if stop_at_eos and token == EOT_ID:
            break
        piece = decoder.decode(tokenizer.decode_single_token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
