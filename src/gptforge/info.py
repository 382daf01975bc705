"""Parameter counts and memory estimates of a preset or a saved model, without loading weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.config import GPTConfig, canonical_preset
from gptforge.model import GPTModel


def config_of(source: str) -> GPTConfig:
    """Read a model's config from a preset name or a checkpoint (gptforge, Hugging Face or OpenAI)."""
    if canonical_preset(source) and not Path(source).exists():
        return GPTConfig.from_name(source)
    from gptforge.checkpoint import read_meta
    from gptforge.pretrained.hf import CONFIG_NAME, config_from_hf
    from gptforge.pretrained.loader import detect_format
    from gptforge.pretrained.openai import HPARAMS_NAME, config_from_hparams

    path = Path(source)
    kind = detect_format(path)  # raises, listing what it looked for, if it is none of them
    folder = path if path.is_dir() else path.parent
    if kind == "gptforge":
        return GPTConfig.from_dict(read_meta(folder)["model"])
    if kind == "openai":
        return config_from_hparams(json.loads((folder / HPARAMS_NAME).read_text()))
    return config_from_hf(json.loads((folder / CONFIG_NAME).read_text()))


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
