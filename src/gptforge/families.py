"""Configs of the decoder families after GPT-2: Llama 3, Qwen3 and Gemma 3, with presets.

All three are the same decoder (`decoder.DecoderModel`): token embedding, blocks of
RMSNorm -> grouped-query attention with rotary positions -> RMSNorm -> gated
feed-forward, a final RMSNorm and an output head. What tells them apart is this table:

| setting | Llama 3 | Qwen3 | Gemma 3 |
| --- | --- | --- | --- |
| feed-forward activation | SiLU (SwiGLU) | SiLU (SwiGLU) | tanh-GELU (GeGLU) |
| QK-norm | no | yes | yes |
| RoPE base | 500,000 | 1,000,000 | 1,000,000 global, 10,000 local |
| RoPE scaling | "llama3" (3.1 and later) | none | linear 8x (4B and up) |
| attention | global | global | 5 sliding-window layers, then 1 global |
| norms per block | 2 | 2 | 4 (before and after attention and feed-forward) |
| RMSNorm weight | w | w | 1 + w |
| embedding | as is | as is | times sqrt(emb_dim) |
| attention scale | 1/sqrt(head_dim) | 1/sqrt(head_dim) | 1/sqrt(query_pre_attn_scalar) |
| head_dim | emb_dim / n_heads | 128 (set apart from emb_dim) | 256 |

`FAMILY_DEFAULTS` holds the rows of that table as config fields; a preset adds the
sizes. GPT-2 keeps its own config and model (config.py, model.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gptforge.errors import BadInputError

ARCHS = ("llama3", "qwen3", "gemma3")

# Per family, the fields in which it differs from the dataclass defaults below.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama3": dict(activation="silu", rope_base=500_000.0, norm_eps=1e-5,
                   rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_context_length": 8192}),
    "qwen3": dict(activation="silu", rope_base=1_000_000.0, norm_eps=1e-6, qk_norm=True),
    "gemma3": dict(activation="gelu_tanh", rope_base=1_000_000.0, rope_local_base=10_000.0, norm_eps=1e-6,
                   qk_norm=True, gemma_norms=True, embed_scale=True, sliding_window=512,
                   global_every=6, query_scale=256.0),
}


@dataclass
class DecoderConfig:
    """Architecture of a Llama 3, Qwen3 or Gemma 3 model (see the table above).

    `n_kv_heads` < `n_heads` is grouped-query attention. `rope_scaling` is None or a
    dict with "type" "llama3" or "linear" (see layers.rope_frequencies). In Gemma 3,
    every `global_every`-th layer attends globally with RoPE base `rope_base`; the
    others see the last `sliding_window` positions, with base `rope_local_base`.
    `drop_rate` is for fine-tuning (the released models use none).
    """

    arch: str = "llama3"
    vocab_size: int = 128_256
    context_length: int = 131_072
    emb_dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 64
    hidden_dim: int = 8192
    activation: str = "silu"
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: dict | None = None
    rope_local_base: float | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    gemma_norms: bool = False  # Gemma: 1 + w RMSNorm weights, and norms after attention and feed-forward
    embed_scale: bool = False  # Gemma: embeddings times sqrt(emb_dim)
    sliding_window: int | None = None
    global_every: int | None = None  # Gemma: every n-th layer (1-based) is global, the rest sliding
    query_scale: float | None = None  # attention scale 1/sqrt(query_scale); None: 1/sqrt(head_dim)
    final_softcap: float | None = None  # logits = cap * tanh(logits / cap), if set
    tie_weights: bool = True
    drop_rate: float = 0.0
    attn_impl: str = "sdpa"
    layer_types: list[str] | None = field(default=None)  # "sliding" / "full" per layer; None: from global_every

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive whole number, not {value!r}")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim must be even for rotary embeddings, not {self.head_dim}")
        if self.activation not in ("silu", "gelu_tanh"):
            problems.append(f"activation must be 'silu' or 'gelu_tanh', not {self.activation!r}")
        if self.attn_impl not in ("sdpa", "math"):
            problems.append(f"attn_impl must be 'sdpa' or 'math', not {self.attn_impl!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop_rate must be in [0, 1), not {self.drop_rate!r}")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("llama3", "linear"):
            problems.append(f"rope_scaling type must be 'llama3' or 'linear', not {self.rope_scaling!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {"sliding", "full"}:
                problems.append(f"layer_types must list 'sliding' or 'full' for each of the {self.n_layers} "
                                f"layers, not {self.layer_types!r}")
            elif "sliding" in self.layer_types and not self.sliding_window:
                problems.append("sliding layers need a sliding_window")
        if problems:
            raise BadInputError("; ".join(problems))

    def layer_type(self, layer: int) -> str:
        """"sliding" or "full" (global) attention for layer `layer` (0-based)."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        if self.sliding_window and self.global_every:
            return "full" if (layer + 1) % self.global_every == 0 else "sliding"
        return "sliding" if self.sliding_window else "full"

    def num_parameters(self) -> int:
        """Parameters of a DecoderModel of this config (a tied head counted once)."""
        d, hd = self.emb_dim, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        norms = (4 if self.gemma_norms else 2) * d
        block = attn + 3 * d * self.hidden_dim + norms
        head = 0 if self.tie_weights else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + d + head

    @classmethod
    def for_arch(cls, arch: str, **sizes: Any) -> "DecoderConfig":
        """A config of family `arch` ("llama3", "qwen3", "gemma3") with the given sizes."""
        if arch not in FAMILY_DEFAULTS:
            raise BadInputError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
        return cls(arch=arch, **{**FAMILY_DEFAULTS[arch], **sizes})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "DecoderConfig":
        """The config of a released model, by preset name ("qwen3-0.6b") or Hugging Face
        repository ("Qwen/Qwen3-0.6B"); keyword arguments override single fields."""
        key = canonical_family_preset(name)
        if key is None:
            raise BadInputError(f"unknown model {name!r}; presets: {', '.join(FAMILY_PRESETS)}")
        arch, sizes, _ = FAMILY_PRESETS[key]
        return cls.for_arch(arch, **sizes).replace(**overrides)

    def replace(self, **overrides: Any) -> "DecoderConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise BadInputError(f"unknown DecoderConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _llama(emb, layers, heads, hidden, tie=True, factor=32.0):
    scaling = dict(FAMILY_DEFAULTS["llama3"]["rope_scaling"], factor=factor)
    return dict(emb_dim=emb, n_layers=layers, n_heads=heads, n_kv_heads=8, head_dim=emb // heads,
                hidden_dim=hidden, tie_weights=tie, vocab_size=128_256, context_length=131_072,
                rope_scaling=scaling)


def _qwen3(emb, layers, heads, hidden, tie=True):
    return dict(emb_dim=emb, n_layers=layers, n_heads=heads, n_kv_heads=8, head_dim=128, hidden_dim=hidden,
                tie_weights=tie, vocab_size=151_936, context_length=40_960)


def _gemma3(emb, layers, hidden):
    return dict(emb_dim=emb, n_layers=layers, n_heads=4, n_kv_heads=1, head_dim=256, hidden_dim=hidden,
                vocab_size=262_144, context_length=32_768)


# preset name -> (arch, sizes, Hugging Face repository of the released weights).
FAMILY_PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {}
for _name, _arch, _sizes, _repo in [
    ("llama-3.2-1b", "llama3", _llama(2048, 16, 32, 8192), "meta-llama/Llama-3.2-1B"),
    ("llama-3.2-3b", "llama3", _llama(3072, 28, 24, 8192), "meta-llama/Llama-3.2-3B"),
    ("llama-3.1-8b", "llama3", _llama(4096, 32, 32, 14336, tie=False, factor=8.0), "meta-llama/Llama-3.1-8B"),
    ("qwen3-0.6b", "qwen3", _qwen3(1024, 28, 16, 3072), "Qwen/Qwen3-0.6B-Base"),
    ("qwen3-1.7b", "qwen3", _qwen3(2048, 28, 16, 6144), "Qwen/Qwen3-1.7B-Base"),
    ("qwen3-4b", "qwen3", _qwen3(2560, 36, 32, 9728), "Qwen/Qwen3-4B-Base"),
    ("qwen3-8b", "qwen3", _qwen3(4096, 36, 32, 12288, tie=False), "Qwen/Qwen3-8B-Base"),
    ("gemma-3-270m", "gemma3", _gemma3(640, 18, 2048), "google/gemma-3-270m"),
    ("gemma-3-1b", "gemma3", _gemma3(1152, 26, 6912), "google/gemma-3-1b-pt"),
]:
    FAMILY_PRESETS[_name] = (_arch, _sizes, _repo)
# The instruction-tuned releases share their base's shape (Qwen3's hybrid
# thinking models are the repositories without "-Base").
for _base, _name, _repo in [
    ("llama-3.2-1b", "llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    ("llama-3.2-3b", "llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct"),
    ("llama-3.1-8b", "llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("qwen3-0.6b", "qwen3-0.6b-instruct", "Qwen/Qwen3-0.6B"),
    ("qwen3-1.7b", "qwen3-1.7b-instruct", "Qwen/Qwen3-1.7B"),
    ("qwen3-4b", "qwen3-4b-instruct", "Qwen/Qwen3-4B"),
    ("qwen3-8b", "qwen3-8b-instruct", "Qwen/Qwen3-8B"),
    ("gemma-3-270m", "gemma-3-270m-instruct", "google/gemma-3-270m-it"),
    ("gemma-3-1b", "gemma-3-1b-instruct", "google/gemma-3-1b-it"),
]:
    FAMILY_PRESETS[_name] = (FAMILY_PRESETS[_base][0], FAMILY_PRESETS[_base][1], _repo)


def canonical_family_preset(name: str) -> str | None:
    """The preset key for a preset name or its Hugging Face repository (any case), or None."""
    lowered = name.lower()
    for key, (_, _, repo) in FAMILY_PRESETS.items():
        if lowered in (key, repo.lower(), repo.lower().split("/")[-1]):
            return key
    return None


def hub_repo(name: str) -> str | None:
    """The Hugging Face repository of a family preset, or None if `name` is not one."""
    key = canonical_family_preset(name)
    return FAMILY_PRESETS[key][2] if key else None


def small_config(arch: str, vocab_size: int = 50_257, context_length: int = 256, emb_dim: int = 768,
                 n_layers: int = 12, n_heads: int = 12, n_kv_heads: int | None = None,
                 drop_rate: float = 0.0) -> DecoderConfig:
    """A config of family `arch` for pretraining from scratch, GPT-2-small-sized by default.

    With GPT-2's tokenizer (50,257 ids) and the book's context of 256, it trains on the
    same data as `gptforge pretrain` does for GPT-2. Keys and values get a quarter of
    the query heads (grouped-query attention, as the released models) where that
    divides; the feed-forward is 8/3 of the width (the gated MLP's usual size, which
    keeps its parameters near GPT-2's 4x ungated one), rounded up to 64. Gemma's
    sliding window is a quarter of the context.
    """
    if n_kv_heads is None:
        n_kv_heads = n_heads // 4 if n_heads % 4 == 0 else n_heads
    if emb_dim % n_heads:
        raise BadInputError(f"--emb-dim ({emb_dim}) must be divisible by --n-heads ({n_heads})")
    hidden = -(-emb_dim * 8 // 3 // 64) * 64
    sizes: dict[str, Any] = dict(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                                 n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                 head_dim=emb_dim // n_heads, hidden_dim=hidden, drop_rate=drop_rate)
    if arch == "llama3":
        sizes["rope_scaling"] = None  # the scaling stretches a context trained at 8K; not needed here
    if arch == "gemma3":
        sizes.update(sliding_window=max(context_length // 4, 1), query_scale=float(emb_dim // n_heads))
    return DecoderConfig.for_arch(arch, **sizes)
