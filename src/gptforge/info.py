"""Parameter counts and memory estimates of a preset or a saved model, without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from gptforge.checkpoint import ModelConfig, model_class
from gptforge.families import DecoderConfig
from gptforge.loader import read_run


def config_of(source: str) -> ModelConfig:
    """A model's config from a preset name or any checkpoint, without reading its weights."""
    return read_run(source).model


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


@dataclass(frozen=True)
class Int8Footprint:
    """What `quantize_int8` makes of a model: its int8 layers and the bytes it then stores."""

    layers: int  # linear layers that become Int8Linear, the output head always among them
    parameters: int  # weights stored as one-byte codes
    n_bytes: int  # the quantized state dict, with the float tensors in bfloat16


def int8_footprint(model: nn.Module) -> Int8Footprint:
    """The int8 layers and stored bytes of `quantize_int8(model)`, counted without quantizing.

    Follows quantize_int8: every linear layer, the output head included even when it is
    tied to the token embedding, becomes one-byte codes plus float32 scales (one per
    output channel) and a float32 bias; the embedding keeps its own (tied) weight, and
    the other parameters, counted here in bfloat16, stay as they are. Works on a model
    built on the meta device.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    others = {id(p): p for m in model.modules() if not isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)}
    codes = sum(m.weight.numel() for m in linears)
    per_row = sum(m.out_features * 4 + (0 if m.bias is None else m.bias.numel() * 4) for m in linears)
    kept = sum(p.numel() * 2 for p in others.values())
    return Int8Footprint(layers=len(linears), parameters=codes, n_bytes=codes + per_row + kept)


def model_info(source: str) -> dict[str, str]:
    """Parameter counts (with and without a separate output head) and memory needs.

    int8 is gptforge's weight-only quantization (`quantize_int8`): every linear layer's
    weight, a tied output head's as its own copy, in one byte each with float32 scales;
    embeddings and norms as stored (counted here in bfloat16).
    """
    cfg = config_of(source)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    unique = model.num_parameters()
    head = model.out_head.weight.numel()
    without_head = unique - (0 if cfg.tie_weights else head)
    int8 = int8_footprint(model)
    kv_heads = cfg.n_kv_heads if isinstance(cfg, DecoderConfig) else cfg.n_heads
    kv_per_token = 2 * cfg.n_layers * kv_heads * cfg.head_dim  # keys and values, every layer
    arch = cfg.arch if isinstance(cfg, DecoderConfig) else "gpt2"
    return {
        "architecture": arch,
        "config": json.dumps(cfg.to_dict()),
        "parameters (stored)": f"{unique:,}",
        "parameters (head counted separately)": f"{without_head + head:,}",
        "parameters (without output head)": f"{without_head:,}",
        "weights float32": _gib(unique * 4),
        "weights bfloat16": _gib(unique * 2),
        "int8-quantized linear layers": f"{int8.layers} ({int8.parameters:,} parameters, output head included)",
        "weights int8 (linear layers)": _gib(int8.n_bytes),
        "training, AdamW float32 (weights+grads+2 moments)": _gib(unique * 16),
        "KV cache per 1,000 tokens (bfloat16)": _gib(kv_per_token * 2 * 1000),
        "KV cache per sequence at full context (bfloat16)": _gib(kv_per_token * 2 * cfg.context_length),
    }
