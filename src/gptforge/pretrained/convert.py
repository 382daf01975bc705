"""Convert any loadable GPT-2 checkpoint into gptforge's format or Hugging Face's."""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.checkpoint import save_model
from gptforge.pretrained.hf import save_hf
from gptforge.pretrained.loader import load_pretrained

FORMATS = ("gptforge", "hf")


def convert(source: str | Path, out_dir: str | Path, to: str = "gptforge", *,
            dtype: torch.dtype | None = None) -> Path:
    """Load `source` (anything `load_pretrained` accepts) and save it to `out_dir` in format `to`.

    `to="gptforge"` writes gptforge.json + model.safetensors (loadable with
    `load_pretrained` or `gptforge.checkpoint.load_model`); `to="hf"` writes a
    directory that `transformers.GPT2LMHeadModel.from_pretrained` loads. `dtype`
    converts the weights (e.g. torch.float16 to halve the size). Returns `out_dir`.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    model = load_pretrained(source, dtype=dtype)
    if to == "hf":
        return save_hf(model, out_dir)
    return Path(save_model(model, out_dir, converted_from=str(source)))
