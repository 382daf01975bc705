"""Write any loadable model in gptforge's format or Hugging Face's."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptforge.checkpoint import save_model
from gptforge.errors import BadInputError
from gptforge.families import DecoderConfig
from gptforge.hf_tokenizer import save_tokenizer_files
from gptforge.loader import load, read_run, tokenizer_for
from gptforge.pretrained.hf import save_hf
from gptforge.pretrained.hf_decoder import save_hf_decoder

FORMATS = ("gptforge", "hf")


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, to: str = "gptforge", *,
            dtype: torch.dtype | None = None) -> Path:
    """Load `source` (anything `gptforge.load` takes) and save it to `out_dir` in format `to`.

    `to="gptforge"` writes gptforge.json + model.safetensors, keeping the run's
    metadata (a LoRA run comes out merged, as a full model); `to="hf"` writes a
    directory that transformers' `AutoModelForCausalLM.from_pretrained` loads (GPT-2,
    Llama, Qwen3 or Gemma 3, as the model is). `dtype`
    converts the weights (e.g. torch.float16 halves the size). A model with its own
    tokenizer (tokenizer.json) gets its tokenizer files in `out_dir` too. Returns `out_dir`.
    """
    if to not in FORMATS:
        raise BadInputError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    model = load(source, dtype=dtype or "auto")  # as stored unless a dtype is asked for
    if to == "hf":
        if model.out_head.out_features != model.cfg.vocab_size:
            raise BadInputError(f"{source} is a classifier; only language models can be written "
                                f"in Hugging Face's layout")
        out = save_hf_decoder(model, out_dir) if isinstance(model.cfg, DecoderConfig) else save_hf(model, out_dir)
    else:
        origin = str(Path(source).resolve()) if Path(source).exists() else str(source)
        out = save_model(model, out_dir, read_run(source).replace(lora=None, source=origin))
    # The model's own tokenizer travels with it (GPT-2's BPE is rebuilt by gptforge itself).
    save_tokenizer_files(tokenizer_for(source), out)
    return out
