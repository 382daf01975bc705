"""The GPT model: embeddings, causal multi-head attention, transformer blocks, output head.

Architecture-compatible with OpenAI's GPT-2: pre-LayerNorm blocks, a 4x GELU(tanh)
feed-forward, learned absolute position embeddings. Shapes use B = batch,
T = tokens in this call, S = positions attended to (T, or with a KV cache everything
up to the newest token), L = n_layers, D = emb_dim, H = n_heads, hd = head_dim,
V = vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.config import GPTConfig
from gptforge.errors import BadInputError

# Where new tokens go: one start position for every row, or a (B,) tensor, one per row.
Positions = int | torch.Tensor


class GPTEmbeddings(nn.Module):
    """Token embedding plus absolute position embedding: ids (B, T) -> vectors (B, T, D)."""

    def __init__(self, vocab_size: int, emb_dim: int, context_length: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, emb_dim)
        self.pos = nn.Embedding(context_length, emb_dim)

    def forward(self, idx: torch.Tensor, positions: Positions = 0) -> torch.Tensor:
        """`positions` is where idx begins: one position for all rows, or a (B,) tensor."""
        steps = torch.arange(idx.shape[1], device=idx.device)  # (T,)
        if isinstance(positions, torch.Tensor):
            steps = positions[:, None] + steps  # (B, T)
        else:
            steps = steps + positions
        return self.tok(idx) + self.pos(steps)  # (B, T, D) + (T or B x T, D) broadcasts


def create_embeddings(
    vocab_size: int = 50257, emb_dim: int = 256, context_length: int = 1024, seed: int | None = None
) -> GPTEmbeddings:
    """Create the "text to vector embeddings" layer: token + absolute position embeddings.

    Call the result on a (B, T) tensor of token ids to get (B, T, emb_dim) input
    vectors; the GPT model uses the same layer as its first step.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return GPTEmbeddings(vocab_size, emb_dim, context_length)


class KVCache:
    """The keys and values of every attention layer for B rows of up to `max_len` positions.

    The caller owns it and passes it to `GPTModel.forward` with the positions of the
    new tokens; the model writes their keys and values in and attends over each row's
    earlier ones. Make one with `GPTModel.new_cache`. `rows(start, end)` is a view of
    some rows (writes reach this cache) and `copy_row` moves a row, so a server can
    give each request a row and keep the rows in use together.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # (L, B, H, max_len, hd) each

    @classmethod
    def zeros(cls, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> KVCache:
        """An empty cache. Zeros, not uninitialised memory: slots a row has not written yet
        are still read (with attention weight 0), and 0 * NaN would be NaN."""
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, end: int) -> KVCache:
        """Rows start .. end-1 as a cache of their own, sharing this cache's memory."""
        return KVCache(self.k[:, start:end], self.v[:, start:end])

    def copy_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy row `src`'s first `length` positions (by default all) onto row `dst`."""
        n = self.max_len if length is None else length
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def store(self, layer: int, positions: Positions, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one layer's new keys and values k, v (B, H, T, hd) at positions p .. p+T-1."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # e.g. bfloat16 under autocast
        T = k.shape[2]
        if isinstance(positions, int):
            self.k[layer, :, :, positions:positions + T] = k
            self.v[layer, :, :, positions:positions + T] = v
            return
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        slots = positions[:, None] + torch.arange(T, device=k.device)  # (B, T)
        # Two index tensors around a slice: the indexed dims come first, (B, T, H, hd).
        self.k[layer][rows, :, slots] = k.transpose(1, 2)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values at positions 0 .. length-1, each (B, H, S, hd)."""
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each position sees only itself and earlier positions."""

    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.layer = layer  # which of a KVCache's layers holds this one's keys and values
        self.impl = cfg.attn_impl
        self.drop_rate = cfg.drop_rate
        # Queries, keys and values come from one matmul (as in GPT-2's c_attn).
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: Positions = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With a cache, the new keys and values are stored at
        `positions` and the queries attend over the row up to them; `mask` (from the model)
        is None where plain causal attention over this call's tokens is right."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, H, T, hd)
        if cache is not None:
            cache.store(self.layer, positions, k, v)
            # Per-row positions always come with a mask, which is as wide as the longest row.
            length = mask.shape[-1] if mask is not None else positions + T
            k, v = cache.read(self.layer, length)  # (B, H, S, hd)
        out = self._attend(q, k, v, mask)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, D)  # heads side by side again
        return self.proj(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, H, T, hd) over k, v (B, H, S, hd); `mask` (T, S) or (B, 1, T, S)
        is True where a query may see a key, None for causal within the call (or T == 1)."""
        T, S = q.shape[2], k.shape[2]
        if self.impl == "sdpa":
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                dropout_p=self.drop_rate if self.training else 0.0,
            )
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if mask is None and T > 1:
            mask = causal_mask(torch.arange(T, device=q.device), S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = self.attn_drop(torch.softmax(scores, dim=-1))
        return weights @ v  # (B, H, T, hd)


def causal_mask(query_positions: torch.Tensor, length: int) -> torch.Tensor:
    """Bool mask (..., T, S), True where the query at position query_positions[..., i]
    may attend key position j: j <= that position, for j in 0 .. length-1."""
    keys = torch.arange(length, device=query_positions.device)  # (S,)
    return keys <= query_positions[..., None]


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: Positions = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache, positions, mask))  # shortcut around attention
        x = x + self.drop(self.ff(self.norm2(x)))  # shortcut around the feed-forward
        return x


class GPTModel(nn.Module):
    """A GPT-2-style language model: token ids (B, T) -> next-token logits (B, T, V).

    `forward(idx)` runs whole sequences from position 0 (training, evaluation). For
    fast generation, pass a KV cache from `new_cache(batch_size)` and the positions of
    the new tokens: `forward(idx, cache, positions=p)` processes only idx, at positions
    p, p+1, ... of every row, attending to what the cache holds before them. With a
    (B,) tensor of positions each row starts at its own position, so rows of
    different lengths (requests of a server, prompts of a batch) step together.
    """

    def __init__(self, cfg: GPTConfig, init: str = "gpt2") -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = GPTEmbeddings(cfg.vocab_size, cfg.emb_dim, cfg.context_length)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.emb.tok.weight
        if init == "gpt2":
            self._init_gpt2()
        elif init != "torch":  # "torch": PyTorch's default layer init, as the book's model has
            raise BadInputError(f"init must be 'gpt2' or 'torch', not {init!r}")

    def _init_gpt2(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the layers that
        write into the residual stream scaled down by 1/sqrt(2 * n_layers)."""
        self.apply(self._init_weights)
        for block in self.blocks:
            for layer in (block.attn.proj, block.ff.proj):
                nn.init.normal_(layer.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                positions: Positions | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for ids idx (B, T); with a cache, at `positions` (an int or (B,)).

        `logits_at` (B,) picks one position per row whose logits are wanted, (B, 1, V):
        generation needs only each prompt's last, and the output head over a whole
        prompt is the biggest matmul of a prefill.
        """
        self._check_input(idx, cache, positions)
        if cache is None:
            positions, mask = 0, None
        else:
            mask = self._cache_mask(idx.shape[1], positions, idx.device)
        x = self.drop(self.emb(idx, positions))  # (B, T, D)
        for block in self.blocks:
            x = block(x, cache, positions, mask)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]  # (B, 1, D)
        return self.out_head(self.final_norm(x))  # (B, T or 1, V)

    @staticmethod
    def _cache_mask(T: int, positions: Positions, device: torch.device) -> torch.Tensor | None:
        """Which cached positions each new token may see: None where plain causal attention
        is right (a prompt from position 0, or one new token per row at a shared position),
        else (T, S) for a chunk at a shared offset, or (B, 1, T, S) for per-row positions."""
        if isinstance(positions, int):
            if positions == 0 or T == 1:
                return None
            return causal_mask(torch.arange(positions, positions + T, device=device), positions + T)  # (T, S)
        query_positions = positions[:, None] + torch.arange(T, device=device)  # (B, T)
        length = int(positions.max()) + T
        return causal_mask(query_positions, length)[:, None]  # (B, 1, T, S): one mask for all heads

    def _check_input(self, idx: torch.Tensor, cache: KVCache | None, positions: Positions | None) -> None:
        check_step_input(idx, cache, positions, self.cfg.context_length, self.cfg.vocab_size,
                         (self.cfg.n_layers, self.cfg.n_heads, self.cfg.head_dim))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows of `max_len` positions (at most, and by
        default, the context length), in the model's dtype and on its device."""
        max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        p = self.emb.tok.weight
        return KVCache.zeros(self.cfg.n_layers, batch_size, self.cfg.n_heads, max_len,
                             self.cfg.head_dim, p.dtype, p.device)

    def num_parameters(self, include_tied_head: bool = False) -> int:
        """Count parameters; a tied output head is counted again only if asked."""
        n = sum(p.numel() for p in self.parameters())  # shared tensors are counted once
        if include_tied_head and self.cfg.tie_weights:
            n += self.out_head.weight.numel()
        return n


def check_step_input(idx: torch.Tensor, cache: KVCache | None, positions: Positions | None,
                     context_length: int, vocab_size: int, cache_shape: tuple[int, int, int]) -> None:
    """Refuse ids, a KV cache or positions that a model's forward cannot take, saying why.

    `cache_shape` is the (layers, key/value heads, head size) of the model's cache.
    Shared by every model class (GPTModel, DecoderModel).
    """
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
        raise BadInputError(f"expected token ids as an integer tensor of shape (batch, tokens), "
                            f"got {tuple(idx.shape)} of {idx.dtype}")
    B, T = idx.shape
    end = T  # one past the last position written
    if cache is None and positions is not None:
        raise BadInputError("positions need a KV cache: pass cache=model.new_cache(batch_size) too")
    if cache is not None:
        L, rows, H, _, hd = cache.k.shape
        if (L, H, hd) != cache_shape:
            raise BadInputError(f"the KV cache has {L} layers of {H} heads of size {hd}, this model "
                                f"{cache_shape[0]} of {cache_shape[1]} of {cache_shape[2]}: "
                                f"make it with this model's new_cache()")
        if rows != B:
            raise BadInputError(f"the KV cache has {rows} rows but the ids {B}: one row per "
                                f"sequence (cache.rows(start, end) views some of them)")
        if isinstance(positions, torch.Tensor):
            if positions.shape != (B,) or positions.dtype not in (torch.long, torch.int32):
                raise BadInputError(f"per-row positions must be an integer tensor with one per row, "
                                    f"shape ({B},), got {tuple(positions.shape)} of {positions.dtype}")
            if positions.device != idx.device:
                raise BadInputError(f"positions are on {positions.device} but the ids on {idx.device}")
            first, last = (int(positions.min()), int(positions.max())) if B else (0, 0)
        elif isinstance(positions, int) and not isinstance(positions, bool):
            first = last = positions
        else:
            raise BadInputError(f"with a KV cache, positions must be an int (the first new position "
                                f"of every row) or a ({B},) tensor, one per row; got {positions!r}")
        if first < 0:
            raise BadInputError(f"positions must not be negative, got {first}")
        end = last + T
    if end > context_length:
        raise BadInputError(f"sequence of {end} tokens is longer than the model's context length "
                            f"({context_length}); crop the input to the last {context_length} tokens")
    if cache is not None and end > cache.max_len:
        raise BadInputError(f"positions up to {end} do not fit a KV cache of {cache.max_len}: "
                            f"make it with model.new_cache(batch_size, max_len={end}) or more")
    if idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= vocab_size:
            raise BadInputError(f"token id {hi if hi >= vocab_size else lo} is outside "
                                f"the vocabulary [0, {vocab_size})")


def set_dropout(model: GPTModel, rate: float) -> None:
    """Change the dropout rate of every dropout in the model (and its config)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        if hasattr(module, "drop_rate"):
            module.drop_rate = rate
    model.cfg.drop_rate = rate


def init_like_book(model: GPTModel) -> None:
    """Draw every weight of `model` again from torch's global RNG, as the book's GPTModel
    draws its own when it is built: the same initialisers (PyTorch's defaults for
    nn.Embedding and nn.Linear), in the same order, with W_query, W_key and W_value as
    three layers (rows 0..D-1, D..2D-1 and 2D..3D-1 of our fused `qkv`).

    After `torch.manual_seed(s)` this gives the weights the book's model gets after
    `torch.manual_seed(s)`, and leaves the RNG where the book's leaves it. The draws are
    made on the CPU, as the book builds its model there, whatever device `model` is on.
    """
    if model.cfg.tie_weights:
        raise BadInputError("the book's model has an output head of its own: init_like_book needs "
                            "a model with tie_weights=False (book_config gives one)")

    def embedding(weight: torch.Tensor) -> None:
        weight.copy_(nn.init.normal_(torch.empty(weight.shape)))

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = nn.init.kaiming_uniform_(torch.empty(weight.shape), a=math.sqrt(5))  # nn.Linear's own
        weight.copy_(w)
        if bias is not None:
            bound = 1 / math.sqrt(weight.shape[1])
            bias.copy_(nn.init.uniform_(torch.empty(bias.shape), -bound, bound))

    D = model.cfg.emb_dim
    with torch.no_grad():
        embedding(model.emb.tok.weight)
        embedding(model.emb.pos.weight)
        for block in model.blocks:
            qkv = block.attn.qkv
            for part in range(3):  # W_query, W_key, W_value
                rows = slice(part * D, (part + 1) * D)
                linear(qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])
            linear(block.attn.proj.weight, block.attn.proj.bias)  # out_proj
            linear(block.ff.fc.weight, block.ff.fc.bias)
            linear(block.ff.proj.weight, block.ff.proj.bias)
            for norm in (block.norm1, block.norm2):  # the book's LayerNorm: scale 1, shift 0
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        nn.init.ones_(model.final_norm.weight)
        nn.init.zeros_(model.final_norm.bias)
        linear(model.out_head.weight, None)
