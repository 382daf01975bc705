"""Write any loadable model in gptforge's format, Hugging Face's, or llama.cpp's GGUF."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from gptforge.checkpoint import save_model
from gptforge.errors import BadInputError
from gptforge.families import DecoderConfig
from gptforge.hf_tokenizer import HFTokenizer, save_tokenizer_files
from gptforge.loader import load, read_run, tokenizer_for
from gptforge.pretrained.hf import save_hf
from gptforge.pretrained.hf_decoder import save_hf_decoder

logger = logging.getLogger(__name__)

FORMATS = ("gptforge", "hf", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, to: str = "gptforge", *,
            dtype: torch.dtype | None = None, gguf_type: str = "f16") -> Path:
    """Load `source` (anything `gptforge.load` takes) and save it to `out_dir` in format `to`.

    `to="gptforge"` writes gptforge.json + model.safetensors, keeping the run's
    metadata (a LoRA run comes out merged, as a full model). `to="hf"` writes a
    directory that transformers loads as it stands (GPT-2, Llama, Qwen3 or Gemma 3, as
    the model is): the weights and config.json, the tokenizer (GPT-2's rebuilt in
    Hugging Face's formats), tokenizer_config.json with the chat template the run was
    trained with, special_tokens_map.json and generation_config.json (see `hf_export`).
    `to="gguf"` writes one llama.cpp GGUF file holding the weights as `gguf_type` ("f32",
    "f16" or "q8_0"; norms and biases stay float32) and the tokenizer: `out_dir` is that
    file when it ends in ".gguf", else a directory that gets "model-<type>.gguf".
    `dtype` converts the weights first (e.g. torch.float16 halves an HF export). Returns
    the directory (or the GGUF file) written.
    """
    if to not in FORMATS:
        raise BadInputError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if to == "gguf" and gguf_type not in GGUF_TYPES:
        raise BadInputError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    model = load(source, dtype=dtype or "auto")  # as stored unless a dtype is asked for
    if to == "gptforge":
        origin = str(Path(source).resolve()) if Path(source).exists() else str(source)
        out = save_model(model, out_dir, read_run(source).replace(lora=None, source=origin))
        # The model's own tokenizer travels with it (GPT-2's BPE is rebuilt by gptforge itself).
        save_tokenizer_files(tokenizer_for(source), out)
        return out

    from gptforge.hf_export import export_tokens, write_tokenizer_files

    if model.out_head.out_features != model.cfg.vocab_size:
        raise BadInputError(f"{source} is a classifier; only language models can be written "
                            f"in {'Hugging Face' if to == 'hf' else 'GGUF'} format")
    tokenizer = tokenizer_for(source)
    fits = isinstance(tokenizer, HFTokenizer) or tokenizer.n_vocab <= model.cfg.vocab_size
    tokens = export_tokens(tokenizer, read_run(source)) if fits else None
    if to == "gguf":
        from gptforge.gguf_export import write_gguf

        if tokens is None:
            raise BadInputError(f"{source} has a vocabulary of {model.cfg.vocab_size} tokens, smaller than GPT-2's "
                                f"tokenizer ({tokenizer.n_vocab}); a GGUF file needs the model's tokenizer, so "
                                "only models with GPT-2's vocabulary (or their own tokenizer) can be written")
        path = Path(out_dir)
        if path.suffix != ".gguf":
            path = path / f"model-{gguf_type}.gguf"
        return write_gguf(model, path, tokenizer, tokens, gguf_type)

    special = tokens.config_ids() if tokens is not None else None
    if isinstance(model.cfg, DecoderConfig):
        out = save_hf_decoder(model, out_dir, special)
    else:
        out = save_hf(model, out_dir, special)
    if tokens is None:
        logger.warning("%s has a vocabulary of %d tokens, smaller than GPT-2's %d: no tokenizer files written; "
                       "pass token ids to it yourself", source, model.cfg.vocab_size, tokenizer.n_vocab)
        return out
    write_tokenizer_files(tokenizer, tokens, out, model.cfg.context_length)
    return out
