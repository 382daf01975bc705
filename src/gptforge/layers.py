"""The parts that Llama 3, Qwen3 and Gemma 3 add to GPT-2, each a small module.

- `RMSNorm`: scale by the root mean square, no mean subtraction and no bias (GPT-2 uses
  LayerNorm). Gemma stores the scale as an offset from 1.
- `RotaryEmbedding` + `apply_rope`: positions enter by rotating pairs of query and key
  features by a position-dependent angle, instead of a learned position embedding added
  to the input. Llama 3 stretches the slow-turning frequencies for long contexts.
- `GatedFeedForward`: down(act(gate(x)) * up(x)); SiLU for Llama and Qwen ("SwiGLU"),
  tanh-GELU for Gemma.
- `GroupedQueryAttention`: fewer key/value heads than query heads (each K/V head serves
  n_heads / n_kv_heads query heads), optional RMSNorm of each query and key head
  (QK-norm: Qwen3, Gemma 3), optional sliding window (Gemma 3's local layers).

Shapes: B = batch, T = tokens in this call, S = key positions, H = query heads,
Hkv = key/value heads, hd = head_dim, D = emb_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.model import KVCache, Positions


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and returned in x's dtype.

    `unit_offset` (Gemma) stores the weight as w - 1 (initialised to 0) and scales by
    1 + w. The two families also round differently in low precision, as their
    reference code does: Llama casts the normalised x back before the scale, Gemma
    scales in float32 and casts the product.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(head_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """The inverse frequencies (head_dim / 2,) of rotary embeddings: base^(-2i / head_dim).

    `scaling` {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_context_length"} keeps the fast frequencies, divides the slow ones (whose
    wavelength exceeds the original context) by `factor`, and blends between the two;
    {"type": "linear", "factor"} divides them all.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if not scaling:
        return inv_freq
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_context_length"]
    wavelength = 2 * math.pi / inv_freq
    slow = wavelength > old_context / low  # turns less than `low` times over the old context
    fast = wavelength < old_context / high
    blend = (old_context / wavelength - low) / (high - low)  # 0 at the slow edge, 1 at the fast
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(slow, inv_freq / factor, torch.where(fast, inv_freq, blended))


class RotaryEmbedding(nn.Module):
    """cos and sin of every position's rotation angles, for `apply_rope`.

    The frequencies are computed from the config, in float32, on first use on each
    device; they are neither saved with the weights nor cast by `model.to(dtype)`.
    """

    def __init__(self, head_dim: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) or (T,) -> cos, sin (B or 1, 1, T, hd), in `dtype`."""
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            with torch.device("cpu"):  # not the meta device, even inside a meta-device context
                inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling)
            inv_freq = self._inv_freq[positions.device] = inv_freq.to(positions.device)
        angles = positions.float()[..., None] * inv_freq  # (.., T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # the two halves rotate together
        if angles.dim() == 2:
            angles = angles[None]
        return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd): feature i pairs with feature i + hd/2 (the "half" layout
    of Hugging Face's checkpoints, not the interleaved one of Meta's originals)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return x * cos + rotated_half * sin


class GatedFeedForward(nn.Module):
    """down(act(gate(x)) * up(x)): the gate decides, per hidden feature, how much of up(x) passes."""

    def __init__(self, emb_dim: int, hidden_dim: int, activation: str) -> None:
        super().__init__()
        self.gate = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.up = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, emb_dim, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down(gate * self.up(x))


class GroupedQueryAttention(nn.Module):
    """Causal attention with n_kv_heads key/value heads shared by n_heads query heads."""

    def __init__(self, emb_dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, layer: int,
                 qkv_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 unit_offset_norm: bool = False, scale: float | None = None,
                 sliding_window: int | None = None, impl: str = "sdpa") -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer = layer  # which of a KVCache's layers holds this one's keys and values
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.sliding_window = sliding_window  # None: attend to every earlier position
        self.impl = impl
        self.q = nn.Linear(emb_dim, n_heads * head_dim, bias=qkv_bias)
        self.k = nn.Linear(emb_dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v = nn.Linear(emb_dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_heads * head_dim, emb_dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps, unit_offset_norm) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, unit_offset_norm) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                positions: Positions = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). `rope` is (cos, sin) of the new tokens' positions; with a
        cache their keys and values are stored at `positions`; `mask` (T, S) or (B, 1, T, S)
        is True where a query may see a key, None for plain causal attention within the call."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_norm is not None:  # QK-norm: each head's query and key scaled to unit RMS
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), *rope)  # (B, H, T, hd)
        k = apply_rope(k.transpose(1, 2), *rope)  # (B, Hkv, T, hd)
        if cache is not None:
            cache.store(self.layer, positions, k, v)
            length = mask.shape[-1] if mask is not None else positions + T
            k, v = cache.read(self.layer, length)  # (B, Hkv, S, hd)
        out = self._attend(q, k, v, mask)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        T = q.shape[2]
        if self.impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                  scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
        groups = self.n_heads // self.n_kv_heads  # query heads per key/value head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, S)
        if mask is None and T > 1:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
