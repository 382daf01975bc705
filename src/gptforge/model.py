"""The GPT model: embeddings, causal multi-head attention, transformer blocks, output head.

Architecture-compatible with OpenAI's GPT-2: pre-LayerNorm blocks, a 4x GELU(tanh)
feed-forward, learned absolute position embeddings. Shapes use B = batch,
T = tokens in this call, S = tokens attended to (T plus what the KV cache holds),
D = emb_dim, H = n_heads, hd = head_dim, V = vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.config import GPTConfig


class GPTEmbeddings(nn.Module):
    """Token embedding plus absolute position embedding: ids (B, T) -> vectors (B, T, D)."""

    def __init__(self, vocab_size: int, emb_dim: int, context_length: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, emb_dim)
        self.pos = nn.Embedding(context_length, emb_dim)

    def forward(self, idx: torch.Tensor, start_pos: int | list[int] = 0) -> torch.Tensor:
        """`start_pos` is where idx begins: one position for all rows, or a list, one per row."""
        offsets = torch.as_tensor(start_pos, device=idx.device).view(-1, 1)  # (1 or B, 1)
        positions = offsets + torch.arange(idx.shape[1], device=idx.device)  # (1 or B, T)
        return self.tok(idx) + self.pos(positions)  # (B, T, D) + (1 or B, T, D) broadcasts


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


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, preallocated for `max_len` positions."""

    def __init__(self, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, n_heads, max_len, head_dim)
        # Uninitialised: positions are always written before they are read.
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) at start_pos and return all keys/values up to there."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, S, hd)


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each position sees only itself and earlier positions."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.impl = cfg.attn_impl
        self.drop_rate = cfg.drop_rate
        # Queries, keys and values come from one matmul (as in GPT-2's c_attn).
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_drop = nn.Dropout(cfg.drop_rate)
        self.cache: KVCache | nn.ModuleList | None = None  # a ModuleList: one KVCache per row

    def forward(self, x: torch.Tensor, start_pos: int | list[int] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, H, T, hd)
        if start_pos is None:
            out = self._attend(q, k, v, 0)
        elif self.cache is None:
            raise RuntimeError("call model.setup_cache(...) before a forward pass with start_pos")
        elif isinstance(start_pos, list):
            # Rows of different requests (serving): each row has its own position and its
            # own cache, so attention runs row by row; the linear layers stay batched.
            out = torch.cat([self._attend(q[b:b + 1], *cache.update(pos, k[b:b + 1], v[b:b + 1]), pos)
                             for b, (pos, cache) in enumerate(zip(start_pos, self.cache))])
        else:
            out = self._attend(q, *self.cache.update(start_pos, k, v), start_pos)  # keys (B, H, S, hd)
        out = out.transpose(1, 2).reshape(B, T, D)  # heads side by side again
        return self.proj(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
        """Causal attention of queries at positions offset, offset + 1, ... over keys from 0."""
        T, S = q.shape[2], k.shape[2]
        if self.impl == "sdpa":
            # Without an offset the causal mask is the plain lower triangle; one new
            # token (T == 1) may see every cached position, so it needs no mask.
            mask = None if offset == 0 or T == 1 else _causal_mask(T, S, offset, q.device)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=(offset == 0 and T > 1),
                dropout_p=self.drop_rate if self.training else 0.0,
            )
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        scores = scores.masked_fill(~_causal_mask(T, S, offset, q.device), float("-inf"))
        weights = self.attn_drop(torch.softmax(scores, dim=-1))
        return weights @ v  # (B, H, T, hd)


def _causal_mask(T: int, S: int, offset: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool mask, True where query i (at position offset + i) may attend key j."""
    q_pos = torch.arange(offset, offset + T, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    return k_pos <= q_pos


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

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, start_pos: int | list[int] | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), start_pos))  # shortcut around attention
        x = x + self.drop(self.ff(self.norm2(x)))  # shortcut around the feed-forward
        return x


class GPTModel(nn.Module):
    """A GPT-2-style language model: token ids (B, T) -> next-token logits (B, T, V).

    `forward(idx)` runs the whole sequence from position 0. For fast generation,
    `setup_cache(batch_size, max_len)` adds a KV cache, after which
    `forward(idx, start_pos=p)` processes only the new tokens at positions p, p+1, ...
    To step rows of different requests together (serving), give each attention layer
    an `nn.ModuleList` with one cache per row and pass one token per row with a list
    of their positions.
    """

    def __init__(self, cfg: GPTConfig, init: str = "gpt2") -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = GPTEmbeddings(cfg.vocab_size, cfg.emb_dim, cfg.context_length)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.emb.tok.weight
        if init == "gpt2":
            self._init_gpt2()
        elif init != "torch":  # "torch": PyTorch's default layer init, as the book's model has
            raise ValueError(f"init must be 'gpt2' or 'torch', not {init!r}")

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

    def forward(self, idx: torch.Tensor, start_pos: int | list[int] | None = None) -> torch.Tensor:
        self._check_input(idx, start_pos)
        x = self.drop(self.emb(idx, 0 if start_pos is None else start_pos))  # (B, T, D)
        for block in self.blocks:
            x = block(x, start_pos)
        return self.out_head(self.final_norm(x))  # (B, T, V)

    def _check_input(self, idx: torch.Tensor, start_pos: int | list[int] | None) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"expected token ids as an integer tensor of shape (batch, tokens), "
                             f"got {tuple(idx.shape)} of {idx.dtype}")
        if isinstance(start_pos, list):
            if len(start_pos) != idx.shape[0] or idx.shape[1] != 1:
                raise ValueError(f"a list of start positions needs one per row and one token per "
                                 f"row, got {len(start_pos)} for ids of shape {tuple(idx.shape)}")
            if not isinstance(self.blocks[0].attn.cache, nn.ModuleList):
                raise RuntimeError("a list of start positions needs an nn.ModuleList of KV caches, "
                                   "one per row, in every attention layer")
            start_pos = max(start_pos)
        end = (start_pos or 0) + idx.shape[1]
        if end > self.cfg.context_length:
            raise ValueError(f"sequence of {end} tokens is longer than the model's context length "
                             f"({self.cfg.context_length}); crop the input to the last "
                             f"{self.cfg.context_length} tokens")
        if idx.numel() and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token id {hi if hi >= self.cfg.vocab_size else lo} is outside "
                                 f"the vocabulary [0, {self.cfg.vocab_size})")

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Give every attention layer an empty KV cache for `max_len` positions."""
        max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        p = self.emb.tok.weight
        for block in self.blocks:
            block.attn.cache = KVCache(batch_size, self.cfg.n_heads, max_len, self.cfg.head_dim,
                                       p.dtype, p.device)

    def clear_cache(self) -> None:
        """Remove the KV caches (frees their memory)."""
        for block in self.blocks:
            block.attn.cache = None

    def num_parameters(self, include_tied_head: bool = False) -> int:
        """Count parameters; a tied output head is counted again only if asked."""
        n = sum(p.numel() for p in self.parameters())  # shared tensors are counted once
        if include_tied_head and self.cfg.tie_weights:
            n += self.out_head.weight.numel()
        return n
