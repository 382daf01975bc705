"""Parameter counts and memory estimates of a preset or a saved model, without loading weights."""

from __future__ import annotations

import json

import torch

from gptforge.config import GPTConfig
from gptforge.loader import read_run
from gptforge.model import GPTModel


def config_of(source: str) -> GPTConfig:
    """A model's config from a preset name or any checkpoint, without reading its weights."""
    return read_run(source).model


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def model_info(source: str) -> dict[str, str]:
    """Parameter counts (with and without a separate output head) and memory needs."""
    cfg = config_of(source)
    with torch.device("meta"):
        model = GPTModel(cfg)
    unique = model.num_parameters()
    head = model.out_head.weight.numel()
    without_head = unique - (0 if cfg.tie_weights else head)
    kv_per_token = 2 * cfg.n_layers * cfg.emb_dim * 4
    return {
        "config": json.dumps(cfg.to_dict()),
        "parameters (stored)": f"{unique:,}",
        "parameters (head counted separately)": f"{without_head + head:,}",
        "parameters (without output head)": f"{without_head:,}",
        "weights float32": _gib(unique * 4),
        "weights bfloat16": _gib(unique * 2),
        "training, AdamW float32 (weights+grads+2 moments)": _gib(unique * 16),
        "KV cache per sequence at full context (float32)": _gib(kv_per_token * cfg.context_length),
    }
