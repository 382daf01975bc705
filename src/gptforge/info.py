"""Parameter counts and memory estimates of a preset or a saved model, without loading weights."""

from __future__ import annotations

import json

import torch

from gptforge.checkpoint import ModelConfig, model_class
from gptforge.families import DecoderConfig
from gptforge.loader import read_run


def config_of(source: str) -> ModelConfig:
    """A model's config from a preset name or any checkpoint, without reading its weights."""
    return read_run(source).model


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def model_info(source: str) -> dict[str, str]:
    """Parameter counts (with and without a separate output head) and memory needs.

    int8 is gptforge's weight-only quantization: the linear layers' weights in one
    byte each, embeddings and norms as stored (counted here in bfloat16).
    """
    cfg = config_of(source)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    unique = model.num_parameters()
    head = model.out_head.weight.numel()
    without_head = unique - (0 if cfg.tie_weights else head)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                 and m.weight is not model.emb.tok.weight)
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
        "weights int8 (linear layers)": _gib(linear + (unique - linear) * 2),
        "training, AdamW float32 (weights+grads+2 moments)": _gib(unique * 16),
        "KV cache per 1,000 tokens (bfloat16)": _gib(kv_per_token * 2 * 1000),
        "KV cache per sequence at full context (bfloat16)": _gib(kv_per_token * 2 * cfg.context_length),
    }
