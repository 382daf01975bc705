"""Load a GPTModel from any GPT-2 source: OpenAI's TF files, Hugging Face, gptforge, a preset.

Whatever the source, the path is the same: read it into the flat GPT-2 naming
(openai.py, hf.py), map that onto gptforge's parameters (names.py), and build the
model around those tensors on the meta device, so that no random weights are
allocated and loading needs about the model's size in memory, not twice it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.checkpoint import build_model, is_gptforge_dir, load_model
from gptforge.config import PRESET_ALIASES, PRESETS, canonical_preset
from gptforge.model import GPTModel
from gptforge.pretrained.hf import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, read_hf_checkpoint
from gptforge.pretrained.names import flat_to_gptforge
from gptforge.pretrained.openai import HPARAMS_NAME, read_openai_checkpoint

# OpenAI names its downloads by parameter count: "gpt2-small" -> "124M".
_DOWNLOAD_SIZES: dict[str, str] = {preset: alias for alias, preset in PRESET_ALIASES.items()
                                   if alias.endswith("M")}
_LOOKED_FOR = ("gptforge.json + model.safetensors (a gptforge model), "
               "hparams.json + model.ckpt.index (OpenAI's TensorFlow checkpoint), "
               "config.json + model.safetensors (Hugging Face), "
               "or a .safetensors file with config.json beside it")


def detect_format(path: str | Path) -> str:
    """Say which kind of checkpoint `path` is: "gptforge", "openai" or "hf".

    Raises FileNotFoundError listing what was looked for when it is none of them.
    """
    path = Path(path)
    if path.is_dir():
        if is_gptforge_dir(path):
            return "gptforge"
        if (path / HPARAMS_NAME).is_file() and (
                (path / "checkpoint").is_file() or any(path.glob("*.index"))):
            return "openai"
        if (path / CONFIG_NAME).is_file() and (
                (path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file()):
            return "hf"
    elif path.suffix == ".safetensors" and path.is_file():
        return "hf"
    elif path.suffix == ".index" and path.is_file():
        return "openai"
    elif path.with_name(path.name + ".index").is_file():
        return "openai"  # a checkpoint prefix
    raise FileNotFoundError(f"{path} is not a model checkpoint; looked for {_LOOKED_FOR}")


def load_pretrained(source: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, fmt: str = "openai",
                    verify: bool = True) -> GPTModel:
    """Load a GPT-2 model from a checkpoint path or a preset name, ready for inference (eval mode).

    `source` is a directory with OpenAI's files (hparams.json + model.ckpt.*), a
    Hugging Face directory or .safetensors file (config.json with model_type
    gpt2), a gptforge model directory (gptforge.json + model.safetensors), or a
    preset ("gpt2-small", "124M", ... "gpt2-xl"), which is downloaded in format
    `fmt` ("openai" or "hf") first. `dtype` converts the weights (default: as
    stored); `verify=False` skips checking the CRC-32Cs of TensorFlow files.
    """
    path = Path(source)
    if not path.exists() and not path.with_name(path.name + ".index").is_file():
        path = _download_preset(str(source), fmt)
    kind = detect_format(path)
    if kind == "gptforge":
        return load_model(path, device=device, dtype=dtype).eval()
    if kind == "openai":
        cfg, flat = read_openai_checkpoint(path, verify=verify)
    else:
        cfg, flat = read_hf_checkpoint(path)
    state = flat_to_gptforge(flat, cfg, dtype=dtype, device=device)
    del flat  # drop the memory maps
    return build_model(cfg, state, device=device, dtype=dtype).eval()


def _download_preset(name: str, fmt: str) -> Path:
    preset = canonical_preset(name)
    if preset is None:
        names = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
        raise FileNotFoundError(
            f"cannot load {name!r}: no such file or directory, and not a preset name ({names}); "
            f"a path should hold {_LOOKED_FOR}")
    from gptforge.download import download_gpt2  # network code only when a download is asked for

    return Path(download_gpt2(_DOWNLOAD_SIZES[preset], fmt))
