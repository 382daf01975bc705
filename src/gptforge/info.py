"""Parameter counts and memory estimates of a preset or a saved model, without loading weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.config import GPTConfig, canonical_preset
from gptforge.model import GPTModel


def config_of(source: str) -> GPTConfig:
    """Read a model's config from a preset name or a directory (gptforge, Hugging Face or OpenAI)."""
    if canonical_preset(source) and not Path(source).exists():
        return GPTConfig.from_name(source)
    path = Path(source)
    if path.is_file():
        path = path.parent
    if (path / "gptforge.json").is_file():
        return GPTConfig.from_dict(json.loads((path / "gptforge.json").read_text())["model"])
    if (path / "hparams.json").is_file():
        h = json.loads((path / "hparams.json").read_text())
        return GPTConfig(vocab_size=h["n_vocab"], context_length=h["n_ctx"], emb_dim=h["n_embd"],
                         n_heads=h["n_head"], n_layers=h["n_layer"])
    if (path / "config.json").is_file():
        h = json.loads((path / "config.json").read_text())
        return GPTConfig(vocab_size=h["vocab_size"], context_length=h["n_positions"],
                         emb_dim=h["n_embd"], n_heads=h["n_head"], n_layers=h["n_layer"])
    raise FileNotFoundError(f"{source} is neither a preset nor a directory with gptforge.json, "
                            f"config.json or hparams.json")


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
