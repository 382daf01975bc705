"""gptforge's model format: a directory with `model.safetensors` and `gptforge.json`.

`gptforge.json` holds the GPTConfig under "model" plus what a task needs to rebuild
the model from the directory alone (e.g. a classifier's label names). Every file is
written under a temporary name and renamed when complete, so an interrupted save
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gptforge.config import GPTConfig
from gptforge.model import GPTModel

CONFIG_NAME = "gptforge.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def is_gptforge_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read a gptforge directory's `gptforge.json`."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a gptforge model directory (no {CONFIG_NAME})")
    return json.loads(file.read_text())


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for saving: contiguous, and a tied output head stored once."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, GPTModel) and model.out_head.weight is model.emb.tok.weight:
        state.pop("out_head.weight")
    return state


def save_model(model: GPTModel, out_dir: str | os.PathLike, **meta: Any) -> Path:
    """Save weights (safetensors) and config (+ any `meta` entries) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model_state(model), out / WEIGHTS_NAME, metadata={"format": "pt"})
    head = model.out_head
    info = {"format": "gptforge", "version": FORMAT_VERSION, "model": model.cfg.to_dict(),
            "head": {"outputs": head.out_features, "bias": head.bias is not None}, **meta}
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(info, indent=2) + "\n").encode())
    return out


def build_model(cfg: GPTConfig, state: dict[str, torch.Tensor], head: dict | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPTModel:
    """Build a GPTModel around `state` without allocating a second, random copy of the weights.

    `head` ({"outputs": n, "bias": bool}) describes an output head that differs from
    the language-model head, such as a classifier's.
    """
    with torch.device("meta"):
        model = GPTModel(cfg)
        if head and (head["outputs"] != cfg.vocab_size or head.get("bias")):
            model.out_head = nn.Linear(cfg.emb_dim, head["outputs"], bias=head.get("bias", False))
    tied = model.out_head.weight is model.emb.tok.weight
    if tied:
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    expected = {k for k in model.state_dict() if not (tied and k == "out_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing or 'none'}, "
                         f"unexpected {unexpected or 'none'}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.out_head.weight = model.emb.tok.weight
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> GPTModel:
    """Load a model saved by `save_model` (a gptforge run or model directory).

    A LoRA run (adapters only, next to the name of its base model) comes back with
    the adapters merged into a plain model.
    """
    meta = read_meta(path)
    if "lora" in meta and not (Path(path) / WEIGHTS_NAME).is_file():
        from gptforge.finetune.lora import load_lora_run, merge_lora

        model = merge_lora(load_lora_run(path, device))
        return model.to(dtype=dtype) if dtype else model
    cfg = GPTConfig.from_dict(meta["model"])
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    return build_model(cfg, state, meta.get("head"), device, dtype)
