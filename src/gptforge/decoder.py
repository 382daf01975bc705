"""Llama 3, Qwen3 and Gemma 3: one decoder built from the parts in layers.py.

The model takes and returns what GPTModel does (ids (B, T) -> logits (B, T, V), the
same KV cache and per-row positions, `logits_at`), so every command runs either.
Against GPT-2 it has no position embedding (rotary embeddings inside attention
instead), RMSNorm instead of LayerNorm, a gated feed-forward, grouped-query
attention and no biases. Where the three families differ, see families.py.
Shapes: B = batch, T = new tokens, S = key positions, D = emb_dim, V = vocab_size.
"""

from __future__ import annotations

import torch
from torch import nn

from gptforge.families import DecoderConfig
from gptforge.layers import GatedFeedForward, GroupedQueryAttention, RMSNorm, RotaryEmbedding
from gptforge.model import KVCache, Positions, causal_mask, check_step_input


class TokenEmbedding(nn.Module):
    """Token ids (B, T) -> vectors (B, T, D); Gemma multiplies them by sqrt(D)."""

    def __init__(self, vocab_size: int, emb_dim: int, scale: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, emb_dim)
        self.scale = emb_dim ** 0.5 if scale else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        if self.scale is not None:  # rounded to the weights' dtype first, as Gemma's reference does
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        return x


class DecoderBlock(nn.Module):
    """x + attention(norm(x)), then x + feed_forward(norm(x)); Gemma also norms each
    branch's output before adding it back."""

    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.sliding = cfg.layer_type(layer) == "sliding"
        gemma = cfg.gemma_norms
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.norm_eps, unit_offset=gemma)
        self.attn = GroupedQueryAttention(
            cfg.emb_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, layer=layer, qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, unit_offset_norm=gemma,
            scale=cfg.query_scale ** -0.5 if cfg.query_scale else None,
            sliding_window=cfg.sliding_window if self.sliding else None, impl=cfg.attn_impl)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.norm_eps, unit_offset=gemma)
        self.ff = GatedFeedForward(cfg.emb_dim, cfg.hidden_dim, cfg.activation)
        self.post_attn_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, unit_offset=True) if gemma else nn.Identity()
        self.post_ff_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, unit_offset=True) if gemma else nn.Identity()
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None,
                positions: Positions, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.post_attn_norm(self.attn(self.norm1(x), rope, cache, positions, mask)))
        x = x + self.drop(self.post_ff_norm(self.ff(self.norm2(x))))
        return x


class DecoderModel(nn.Module):
    """A Llama 3 / Qwen3 / Gemma 3 language model: token ids (B, T) -> logits (B, T, V).

    `forward(idx)` runs sequences from position 0; `forward(idx, cache, positions=p)`
    continues them from the positions in a KV cache (`new_cache`), an int for every
    row or a (B,) tensor, one per row, exactly as GPTModel does.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = TokenEmbedding(cfg.vocab_size, cfg.emb_dim, cfg.embed_scale)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, unit_offset=cfg.gemma_norms)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.emb.tok.weight
        # Global layers turn at rope_base (scaled); Gemma's sliding layers at their own base, unscaled.
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
        self.local_rope = (RotaryEmbedding(cfg.head_dim, cfg.rope_local_base)
                           if cfg.rope_local_base is not None else None)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 0.02) weights, zero biases; RMSNorm scales start at 1 (or Gemma's 0 offset)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                positions: Positions | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for ids idx (B, T); with a cache, at `positions` (an int or (B,)).
        `logits_at` (B,) picks one position per row whose logits are wanted, (B, 1, V)."""
        self._check_input(idx, cache, positions)
        B, T = idx.shape
        start = 0 if cache is None else positions
        steps = torch.arange(T, device=idx.device)
        query_positions = start[:, None] + steps if isinstance(start, torch.Tensor) else steps + start  # (B, T) or (T,)
        masks = self._masks(query_positions, start, T, cache is not None)
        x = self.drop(self.emb(idx))  # (B, T, D)
        dtype = x.dtype
        global_rope = self.rope(query_positions, dtype)
        local_rope = self.local_rope(query_positions, dtype) if self.local_rope is not None else global_rope
        for block in self.blocks:
            kind = "sliding" if block.sliding else "full"
            x = block(x, local_rope if block.sliding else global_rope, cache, start, masks[kind])
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # (B, 1, D)
        logits = self.out_head(self.final_norm(x))
        if self.cfg.final_softcap:
            logits = self.cfg.final_softcap * torch.tanh(logits / self.cfg.final_softcap)
        return logits

    def _masks(self, query_positions: torch.Tensor, start: Positions, T: int,
               cached: bool) -> dict[str, torch.Tensor | None]:
        """Masks for global and sliding layers: None where plain causal attention within this
        call is right, else (T, S) or, for per-row positions, (B, 1, T, S), True where allowed."""
        per_row = isinstance(start, torch.Tensor)
        length = (int(start.max()) if per_row else start) + T if cached else T  # S: keys attended over
        full = None
        if per_row or (cached and start > 0 and T > 1):
            full = causal_mask(query_positions, length)
            full = full[:, None] if per_row else full
        masks: dict[str, torch.Tensor | None] = {"full": full}
        window = self.cfg.sliding_window
        if window and length > window:  # some query would see further back than its window
            keys = torch.arange(length, device=query_positions.device)
            recent = keys > query_positions[..., None] - window  # (.., T, S)
            sliding = causal_mask(query_positions, length) & recent
            masks["sliding"] = sliding[:, None] if per_row else sliding
        else:
            masks["sliding"] = full
        return masks

    def _check_input(self, idx: torch.Tensor, cache: KVCache | None, positions: Positions | None) -> None:
        check_step_input(idx, cache, positions, self.cfg.context_length, self.cfg.vocab_size,
                         (self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows of `max_len` positions (at most, and by
        default, the context length), in the model's dtype and on its device. Sliding
        layers keep every position too; their mask hides the old ones."""
        max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        p = self.emb.tok.weight
        return KVCache.zeros(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len,
                             self.cfg.head_dim, p.dtype, p.device)

    def num_parameters(self, include_tied_head: bool = False) -> int:
        """Count parameters; a tied output head is counted again only if asked."""
        n = sum(p.numel() for p in self.parameters())
        if include_tied_head and self.cfg.tie_weights:
            n += self.out_head.weight.numel()
        return n
