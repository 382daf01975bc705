"""Model configuration: one typed dataclass with GPT-2's four sizes as named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.errors import BadInputError

# GPT-2's released sizes: (emb_dim, n_layers, n_heads). Every size shares the
# vocabulary (50257 BPE tokens) and the context length (1024 positions).
_PRESET_SHAPES: dict[str, tuple[int, int, int]] = {
    "gpt2-small": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}

# OpenAI names its checkpoints by parameter count; both spellings are accepted.
PRESET_ALIASES: dict[str, str] = {
    "124M": "gpt2-small",
    "355M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
    "gpt2": "gpt2-small",
}

PRESETS: tuple[str, ...] = tuple(_PRESET_SHAPES)

# The largest value each size field takes: far beyond any GPT-2 (or GPT-3: 96 layers,
# 12288 wide, 2048 positions), but small enough that a typo such as an extra six zeros
# is refused at once instead of sending the allocator after terabytes.
SIZE_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 21,
    "context_length": 1 << 20,
    "emb_dim": 1 << 16,
    "n_heads": 1 << 10,
    "n_layers": 1 << 10,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def canonical_preset(name: str) -> str | None:
    """Return the canonical preset name for `name` ("124M" -> "gpt2-small"), or None."""
    name = PRESET_ALIASES.get(name, name)
    return name if name in _PRESET_SHAPES else None


@dataclass
class GPTConfig:
    """Architecture of a GPT model.

    The defaults are GPT-2 small as OpenAI released it (QKV bias, 1024 positions,
    output head tied to the token embedding). `attn_impl` picks the attention
    kernel: "sdpa" (PyTorch's fused scaled_dot_product_attention) or "math" (the
    explicit masked softmax of QK^T/sqrt(d), for reading); both compute the same.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = True
    tie_weights: bool = True
    ln_eps: float = 1e-5
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        """Refuse a shape that cannot be built, naming the field and what it takes."""
        problems = []
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= limit:
                problems.append(f"{name} must be a whole number from 1 to {limit:,}, not {value!r}")
        if not _is_number(self.drop_rate) or not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be a number in [0, 1), not {self.drop_rate!r}")
        if not _is_number(self.ln_eps) or not self.ln_eps > 0:
            problems.append(f"ln_eps must be a number above 0, not {self.ln_eps!r}")
        for name in ("qkv_bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.attn_impl not in ("sdpa", "math"):
            problems.append(f"attn_impl must be 'sdpa' or 'math', not {self.attn_impl!r}")
        if not problems and self.emb_dim % self.n_heads:
            problems.append(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if problems:
            raise BadInputError("; ".join(problems))

    def num_parameters(self) -> int:
        """How many parameters a GPTModel of this config holds (a tied head counted once),
        computed from the shape alone, without building the model."""
        d = self.emb_dim
        # Per block: two LayerNorms (2d each), QKV (3d^2 + 3d bias), attention output (d^2 + d),
        # feed-forward up (4d^2 + 4d) and down (4d^2 + d).
        block = 12 * d * d + 10 * d + (3 * d if self.qkv_bias else 0)
        head = 0 if self.tie_weights else self.vocab_size * d
        return (self.vocab_size + self.context_length) * d + self.n_layers * block + 2 * d + head

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPTConfig":
        """Build the config of a named preset ("gpt2-small" ... "gpt2-xl", or "124M" ...).

        Keyword arguments override single fields, e.g.
        `GPTConfig.from_name("gpt2-small", context_length=256, qkv_bias=False)`.
        """
        preset = canonical_preset(name)
        if preset is None:
            known = ", ".join(list(_PRESET_SHAPES) + list(PRESET_ALIASES))
            raise BadInputError(f"unknown model preset {name!r}; choose one of: {known}")
        emb_dim, n_layers, n_heads = _PRESET_SHAPES[preset]
        return cls(emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads).replace(**overrides)

    def replace(self, **overrides: Any) -> "GPTConfig":
        """Return a copy with some fields changed (unknown fields raise)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise BadInputError(f"unknown GPTConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GPTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def book_config(preset: str = "gpt2-small", context_length: int = 256, **overrides) -> GPTConfig:
    """The book's model settings: context 256, dropout 0.1, no QKV bias, untied output head."""
    settings = dict(context_length=context_length, drop_rate=0.1, qkv_bias=False, tie_weights=False)
    return GPTConfig.from_name(preset, **{**settings, **overrides})
