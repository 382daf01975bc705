"""Text generation: a pure sampling function, a streaming token loop, and text helpers.

`sample` turns one step's logits into token ids. `generate_stream` runs the model
one token at a time for a batch of prompts of any lengths (with a KV cache, each
new token costs one position) and yields ids as they come; `generate` collects
them. Tokenization stays outside the loop, in `stream_text`, which turns streamed
ids into text pieces through `TextStream` (which also ends the text at stop texts,
such as a prompt template's end-of-response markers). On the CPU the loop stores the linear layers' weights in the
order decoding reads fastest (`use_decode_layout`); training puts them back.
"""

from __future__ import annotations

import codecs
from typing import Collection, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.errors import BadInputError
from gptforge.model import GPTModel, KVCache

# A batch of prompts: a (B, T) or (T,) tensor of ids, or lists of ids of any lengths.
Prompts = torch.Tensor | Sequence[Sequence[int]]
# Where a row stops: one id (GPT-2's <|endoftext|>) or several (a chat model's end-of-turn
# tokens, such as Llama 3's <|eot_id|> and <|end_of_text|>).
StopIds = int | Collection[int] | None


def stop_set(eos_id: StopIds) -> list[int]:
    """The stop ids as a list (empty for None)."""
    if eos_id is None:
        return []
    return [int(eos_id)] if isinstance(eos_id, int) else sorted({int(i) for i in eos_id})


def _bf16_kernels() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512 BF16 or AMX)."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


class DecodeLinear(nn.Linear):
    """A linear layer that stores and computes its weight the way CPU decoding runs fastest.

    Decoding multiplies a few rows (one per sequence) by every weight, so its speed is
    how fast the weights stream from memory. Two ways of doing that, by weight dtype:

    - float32, one row: the decode layout. The weight is the same [out, in] parameter
      stored input-major (transposed in memory), the order CPU matrix-vector products
      stream fastest. Such a product runs on one core, and one core cannot draw all of
      the memory bandwidth, so the product is computed as `parts` partial products,
      each over one contiguous slice of the weight's rows; `torch.bmm` runs them on
      parallel threads and their sum is the result.
    - several sequences decoding together in float32 (2 to `max_rows` rows of one token
      each), and every input of up to `max_rows` rows in bfloat16: oneDNN's product
      with the weight prepacked in the blocked order its kernel reads (`torch.ops.mkldnn`).
      The matrix library's kernels for so few rows, and its bfloat16 products, run at
      half the bandwidth or less. The packed copy doubles the
      memory of the layer's weight; `use_decode_layout` allows it only while the
      machine has room for it (`pack_batches = False` never makes one). It is made on
      first use, made again if the weight changes, and dropped by `train()`.

    Longer inputs (a prompt), small weights (which cache holds anyway) and anything
    that needs gradients take the usual `F.linear`. `train()` puts the weight back in
    the standard layout, in the same Parameter, so training runs at full speed and an
    optimizer that holds the parameter stays valid. Figures: docs/benchmarks.md.
    """

    max_rows = 16
    min_split_size = 1 << 17  # weights of fewer elements (512 KB in float32) keep the usual path
    pack_batches = torch.backends.mkldnn.is_available()  # set False to keep one copy of each weight

    def __init__(self, layer: nn.Linear, parts: int) -> None:
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None,
                         device="meta")  # no storage: the layer's own parameters are used
        self.weight, self.bias = layer.weight, layer.bias
        self.training = layer.training  # set, not train(): that would pick the standard layout
        self.parts = parts if self.in_features % parts == 0 and not self.small else 1
        self.pack = self.pack_batches  # use_decode_layout turns it off when memory is short
        self.pack_chunks = False  # float32 chunks of one sequence packed too (speculative decoding)
        self._packed: tuple[torch.Tensor, tuple[int, int]] | None = None  # (weight, its version)
        self.decode_layout()

    @property
    def in_decode_layout(self) -> bool:
        return self.weight.t().is_contiguous()

    @property
    def small(self) -> bool:
        """Too small to gain from any of this: the cache holds it anyway."""
        return self.weight.numel() < self.min_split_size

    def decode_layout(self) -> None:
        """Store a float32 weight input-major (other dtypes keep the standard layout)."""
        if self.weight.dtype != torch.float32 or self.small:
            self.standard_layout()
        elif not self.in_decode_layout:
            # A plain tensor even inside inference mode, so that training can use it later.
            with torch.inference_mode(False):
                self.weight.data = self.weight.data.t().contiguous().t()

    def standard_layout(self) -> None:
        """Store the weight as nn.Linear does, [out, in] row-major; nothing to do if it already is."""
        if not self.weight.is_contiguous():
            with torch.inference_mode(False):
                self.weight.data = self.weight.data.contiguous()

    def train(self, mode: bool = True) -> DecodeLinear:
        """Set training mode; training (`mode=True`) also restores the standard layout."""
        if mode:
            self.standard_layout()
            self._packed = None
        return super().train(mode)

    def __getstate__(self) -> dict:
        # Copies and pickles leave the prepacked weight behind (it has no storage to copy).
        return {**super().__getstate__(), "_packed": None}

    @property
    def packable(self) -> bool:
        """Whether oneDNN's prepacked product serves this weight's dtype on this machine."""
        if self.weight.dtype == torch.float32:
            return True
        return self.weight.dtype == torch.bfloat16 and _BF16_KERNELS

    def _packed_weight(self) -> torch.Tensor:
        """The weight prepacked for oneDNN's small-batch product, made again if it changed."""
        stamp = (self.weight.data_ptr(), self.weight._version)  # in-place updates bump the version
        if self._packed is None or self._packed[1] != stamp:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), self.max_rows)
            self._packed = (packed, stamp)
        return self._packed[0]

    def as_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's parameters, in the standard layout."""
        self.standard_layout()
        self._packed = None
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        plain.training = self.training
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows or self.small or x.requires_grad or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        # float32 packs only for several sequences decoding together (x: (B, 1, D), B > 1), not
        # for a short prompt of one: the copy would double the memory of a batch-1 user. A
        # model that verifies a draft's tokens (a chunk of 2-16 rows every step) asks for it.
        f32_batch = self.weight.dtype == torch.float32 and rows > 1 and (
            self.pack_chunks or (x.dim() == 3 and x.shape[1] == 1))
        if self.pack and self.packable and x.dtype == self.weight.dtype and (
                f32_batch or self.weight.dtype != torch.float32):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), self._packed_weight(), self.bias,
                                                   "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        if self.parts == 1 or not self.in_decode_layout:
            return F.linear(x, self.weight, self.bias)
        slices = self.weight.t().view(self.parts, -1, self.out_features)  # (P, in/P, out)
        pieces = x.reshape(rows, self.parts, -1).transpose(0, 1)  # (P, rows, in/P)
        y = torch.bmm(pieces, slices).sum(0)  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


_BF16_KERNELS = _bf16_kernels()


def _available_memory() -> int | None:
    """Bytes the system can still give (MemAvailable), or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def use_decode_layout(model: nn.Module, parts: int | None = None) -> nn.Module:
    """Put every linear layer of a CPU model in the decode layout (see `DecodeLinear`).

    Values, shapes and parameter names stay the same; only the weights' memory order
    and the way a few rows' products are computed change (see docs/benchmarks.md).
    `generate_stream` does this itself; on a model already in the decode layout it
    costs a walk over the modules. Prepacked copies of the weights (see
    `DecodeLinear`) are allowed while they would take less than half of the memory
    the system has available. `model.train()` restores the standard layout in the
    same parameters. `parts` defaults to PyTorch's thread count. Models on other
    devices are left as they are. Returns the model, changed in place.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        return model
    parts = parts or torch.get_num_threads()
    layers = []
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                child = DecodeLinear(child, parts)
                setattr(module, name, child)
            elif isinstance(child, DecodeLinear):
                child.decode_layout()  # e.g. after a round of training
            else:
                continue
            layers.append(child)
    unpacked = sum(m.weight.numel() * m.weight.element_size() for m in layers
                   if m._packed is None and not m.small and m.packable)
    available = _available_memory()
    room = available is None or unpacked < available // 2
    for layer in layers:
        layer.pack = DecodeLinear.pack_batches and (room or layer._packed is not None)
    return model


def pack_chunks(model: nn.Module) -> nn.Module:
    """Let a model in the decode layout run float32 inputs of 2 to `DecodeLinear.max_rows`
    rows of one sequence through the prepacked product too, as speculative decoding's
    check of a draft's tokens does every step: such a pass then costs about what one
    token's does (about half otherwise; docs/benchmarks.md), for a packed copy of each
    large weight (only where `use_decode_layout` found room). Returns the model."""
    for module in model.modules():
        if isinstance(module, DecodeLinear):
            module.pack_chunks = True
    return model


def plain_linears(model: nn.Module) -> nn.Module:
    """Turn every `DecodeLinear` of `model` back into an nn.Linear with the same parameters.

    For code that matches layers by their exact type, such as PyTorch's dynamic
    quantization. Returns the model, changed in place.
    """
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, DecodeLinear):
                setattr(module, name, child.as_linear())
    return model


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Raise a BadInputError (a ValueError) that names the bad setting, if any."""
    if temperature < 0:
        raise BadInputError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise BadInputError(f"top_k must be a positive number of tokens, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise BadInputError(f"top_p must be in (0, 1], got {top_p}")


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


def _prompt_batch(prompts: Prompts, context_length: int,
                  device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The prompts as one right-padded (B, T) tensor of ids on `device`, and each one's length."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts.unsqueeze(0) if prompts.dim() == 1 else prompts
        if ids.dim() != 2:
            raise BadInputError(f"expected prompts of shape (batch, tokens), got {tuple(prompts.shape)}")
        lengths = [ids.shape[1]] * ids.shape[0]
    else:
        try:
            rows = [[int(t) for t in row] for row in prompts]
        except TypeError:
            raise BadInputError("expected the prompts as a tensor of token ids or a list of "
                                "token-id lists") from None
        lengths = [len(row) for row in rows]
        width = max(lengths, default=0)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    if not lengths:
        raise BadInputError("no prompts: give at least one")
    if min(lengths) == 0:
        raise BadInputError("the prompt is empty: give at least one token")
    if max(lengths) > context_length:
        raise BadInputError(f"the prompt has {max(lengths)} tokens but the model's context length is "
                            f"{context_length}: shorten the prompt")
    return ids.to(device), lengths


def _positions(values: list[int], device: torch.device) -> int | torch.Tensor:
    """One int when all rows are at the same position (the model's fast path), else a (B,) tensor."""
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(values, device=device)


def _last_logits(model: GPTModel, ids: torch.Tensor, lengths: list[int],
                 cache: KVCache | None = None) -> torch.Tensor:
    """Run right-padded rows `ids` (B, T) from position 0 and return each row's logits at
    its last real token, (B, V)."""
    last = torch.tensor(lengths, device=ids.device) - 1  # (B,)
    return model(ids, cache, 0 if cache is not None else None, logits_at=last)[:, 0]


def prefill(model: GPTModel, cache: KVCache, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Run prompts from position 0 into `cache` and return each one's next-token logits (B, V).

    `ids` (B, T) holds the prompts right-padded; row b's padding sits at positions
    lengths[b] and beyond, which the row's next tokens overwrite in the cache before
    any query can see them.
    """
    return _last_logits(model, ids, lengths, cache)


def decode_one(model: GPTModel, cache: KVCache | None, tokens: torch.Tensor,
               lengths: list[int]) -> torch.Tensor:
    """Next-token logits (B, V) for the sequences in `tokens` (B, >= max length), right-padded.

    With a cache, each row feeds only its newest token, at its own position. A row
    longer than the context sees its last `context_length` tokens, run without the
    cache: its positions shift every step, so its cached keys are stale. Such rows
    still take part in the cached call, at the last position, to keep the batch
    whole; what they write there and get back is never used. Without a cache every
    row runs its last (up to) `context_length` tokens.
    """
    ctx = model.cfg.context_length
    every_row = list(range(len(lengths)))
    if cache is None:
        return _window_logits(model, tokens, lengths, every_row)
    long_rows = [b for b in every_row if lengths[b] > ctx]
    if len(long_rows) == len(every_row):
        return _window_logits(model, tokens, lengths, long_rows)
    newest = tokens[every_row, [n - 1 for n in lengths]]  # (B,)
    positions = _positions([min(n, ctx) - 1 for n in lengths], tokens.device)
    logits = model(newest[:, None], cache, positions)[:, -1]  # (B, V)
    if long_rows:
        logits[long_rows] = _window_logits(model, tokens, lengths, long_rows)
    return logits


def _window_logits(model: GPTModel, tokens: torch.Tensor, lengths: list[int],
                   rows: list[int]) -> torch.Tensor:
    """Next-token logits (len(rows), V) of these rows, each run without a cache on its
    last min(length, context_length) tokens, right-padded to a common width."""
    sizes = [min(lengths[b], model.cfg.context_length) for b in rows]
    starts = torch.tensor([lengths[b] - n for b, n in zip(rows, sizes)], device=tokens.device)
    index = starts[:, None] + torch.arange(max(sizes), device=tokens.device)  # (n, W)
    # A shorter window is followed by ids that are not its own: causal attention keeps
    # them from changing its logits.
    windows = tokens[rows].gather(1, index)  # (n, W)
    return _last_logits(model, windows, sizes)


@torch.inference_mode()
def generate_stream(
    model: GPTModel,
    prompts: Prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: StopIds = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids, a (B,) tensor per step, for a batch of prompts.

    `prompts` is a (B, T) or (T,) tensor of ids, or B lists of ids of any lengths;
    each row gets the tokens it would get alone (greedy decoding gives exactly
    those). Stops after `max_new_tokens`, or once every row has produced `eos_id`
    (one id or several; rows that finished earlier then repeat the id they stopped at). Past the context length a
    row sees its last `context_length` tokens, so cache or not, the tokens are the
    same. The model is put in eval mode and, on the CPU, in the decode layout.
    """
    check_sampling(temperature, top_k, top_p)
    ctx = model.cfg.context_length
    device = model.emb.tok.weight.device
    ids, lengths = _prompt_batch(prompts, ctx, device)
    if max_new_tokens <= 0:
        return
    model.eval()
    use_decode_layout(model)
    B = len(lengths)
    # Every row's ids, right-padded: the prompts, then room for the new tokens.
    tokens = torch.cat([ids, ids.new_zeros(B, max_new_tokens)], dim=1)  # (B, T + new)
    rows = torch.arange(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # Room for every position a step can write: the newest token sits at length - 1.
    cache = model.new_cache(B, max(lengths) + max_new_tokens - 1) if use_cache else None
    stops = torch.tensor(stop_set(eos_id), dtype=torch.long, device=device)
    last = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        if step == 0 and cache is not None:
            logits = prefill(model, cache, ids, lengths)  # (B, V)
        else:
            logits = decode_one(model, cache, tokens, lengths)
        next_ids = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        if len(stops):
            next_ids = torch.where(done, last, next_ids)
            done |= torch.isin(next_ids, stops)
            last = next_ids
        tokens[rows, torch.tensor(lengths, device=device)] = next_ids
        lengths = [n + 1 for n in lengths]
        yield next_ids
        if len(stops) and bool(done.all()):
            break


def generate(model: GPTModel, prompts: Prompts, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: StopIds = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             ) -> torch.Tensor | list[list[int]]:
    """Return the prompts followed by up to `max_new_tokens` new ids each.

    A tensor of prompts (B, T) gives a tensor (B, T + n), a (T,) tensor a (T + n,)
    one; rows that reached `eos_id` before the others keep repeating it. A list of
    token-id lists (of any lengths) gives a list: each prompt followed by its new
    ids, up to and including its first `eos_id`. Temperature 0 (the default) decodes
    greedily; see `generate_stream` for the rest.
    """
    steps = list(generate_stream(model, prompts, max_new_tokens, temperature, top_k, top_p,
                                 eos_id, use_cache, generator))
    if isinstance(prompts, torch.Tensor):
        squeeze = prompts.dim() == 1
        idx = prompts.unsqueeze(0) if squeeze else prompts
        out = torch.cat([idx.to(steps[0].device if steps else idx.device)] +
                        [s[:, None] for s in steps], dim=1)
        return out[0] if squeeze else out
    new = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]  # (B, steps)
    stops = set(stop_set(eos_id))
    out = []
    for prompt, ids in zip(prompts, new):
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        if end is not None:
            ids = ids[:end + 1]
        out.append([int(t) for t in prompt] + ids)
    return out


class TextStream:
    """Token ids in, text pieces out, ending at the first of the `stop` texts.

    Bytes of a character split across tokens are held back until complete, and so
    is any tail of the text that could be the start of a stop text (a marker such
    as "<|end|>" often comes as several tokens, and a token may hold the end of
    the answer and the start of a marker together), so the text released never
    contains, or ends with a piece of, a stop text; held text is let go as soon as
    the next token shows it is not one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # text that might begin a stop text

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; return (text to release, whether a stop text was reached)."""
        text = self._held + self._decoder.decode(self.tokenizer.decode_single_token_bytes(token))
        return self._release(text)

    def finish(self) -> str:
        """The text still held back, once generation has ended without a stop text."""
        text, stopped = self._release(self._held + self._decoder.decode(b"", final=True))
        held, self._held = self._held, ""
        return text if stopped else text + held

    def _release(self, text: str) -> tuple[str, bool]:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self._held = ""
            return text[:min(cuts)], True
        keep = 0  # the longest tail of `text` that a stop text starts with
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


def stream_text(model: GPTModel, prompt: str, max_new_tokens: int = 50, tokenizer=None,
                stop_at_eos: bool = True, stop_ids: StopIds = None, stop_texts: Sequence[str] = (),
                draft: nn.Module | None = None, draft_tokens: int = 4, **sampling) -> Iterator[str]:
    """Generate from a text prompt and yield the continuation as text pieces.

    Bytes of a character split across tokens are held back until complete, so every
    piece is valid text. Generation stops at `stop_ids` (default: the tokenizer's
    end tokens, GPT-2's <|endoftext|> or a chat model's end-of-turn ids) unless
    `stop_at_eos` is False, and at the first of the `stop_texts` (a prompt
    template's end-of-response markers, such as Alpaca's "\\n\\n### "); neither
    the stop id nor the stop text is yielded (see `TextStream`). `sampling` takes
    generate_stream's keyword arguments. With a `draft` model (same tokenizer), the
    tokens come from speculative decoding (`gptforge.speculative`), `draft_tokens`
    proposed at a time: the same text, faster when the draft often agrees.
    """
    from gptforge.tokenizer import EOT_ID, get_tokenizer, text_to_ids

    tokenizer = tokenizer or get_tokenizer()
    ids = torch.tensor([text_to_ids(prompt, tokenizer)], dtype=torch.long)
    if stop_ids is None:
        stop_ids = getattr(tokenizer, "eos_ids", None) or EOT_ID
    stops = set(stop_set(stop_ids)) if stop_at_eos else set()
    text = TextStream(tokenizer, stop_texts)
    if draft is None:
        steps = generate_stream(model, ids, max_new_tokens, eos_id=stops or None, **sampling)
    else:
        from gptforge.speculative import speculative_stream

        proposed = speculative_stream(model, draft, ids[0].tolist(), max_new_tokens, draft_tokens,
                                      eos_id=stops or None, **sampling)
        steps = (torch.tensor([t]) for t in proposed)
    try:
        for next_ids in steps:
            token = int(next_ids[0])
            if token in stops:
                break
            piece, stopped = text.push(token)
            if piece:
                yield piece
            if stopped:
                return
    finally:
        steps.close()  # no more model steps once the answer has ended
    tail = text.finish()
    if tail:
        yield tail
