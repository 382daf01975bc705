"""LoRA: low-rank adapters as a transform of an existing model, not a second model class.

Each wrapped nn.Linear keeps its frozen weight W and learns a low-rank update:
y = x W^T + b + alpha * (x A) B, with A (in, rank) random and B (rank, out) zero at
the start, so a freshly wrapped model computes exactly what it computed before. The
scale is `alpha` as in the book's appendix E (not alpha / rank as in some libraries).

A LoRA run is saved as adapters only (`save_lora`: a few MB instead of the whole
model) and names its base model; `load_lora_run` rebuilds it, `merge_lora` folds
the adapters in for export as a plain model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.A = nn.Parameter(torch.empty(base.in_features, rank, device=base.weight.device))
        self.B = nn.Parameter(torch.zeros(rank, base.out_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:  # so code that reads layer.weight still works
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.alpha * ((x @ self.A.to(x.dtype)) @ self.B.to(x.dtype))

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight includes the update."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.alpha * (self.A @ self.B)).T.to(self.base.weight.dtype)  # (out, in)
            out.weight.copy_(self.base.weight + delta)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _linear_children(model: nn.Module, skip: Iterable[nn.Module]) -> list[tuple[nn.Module, str, nn.Linear]]:
    skip_ids = {id(m) for m in skip}
    found = []
    for parent in model.modules():
        if isinstance(parent, LoRALinear):
            continue
        for name, child in parent.named_children():
            if type(child) is nn.Linear and id(child) not in skip_ids:
                found.append((parent, name, child))
    return found


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 16.0,
               train_also: Iterable[nn.Module] = ()) -> nn.Module:
    """Freeze every weight of `model` and wrap its linear layers with LoRA adapters.

    A head tied to the token embedding is left unwrapped (its update would change the
    embedding too). Modules in `train_also` (e.g. a new classification head) are
    neither frozen nor wrapped. Returns the model, changed in place.
    """
    train_also = list(train_also)
    for p in model.parameters():
        p.requires_grad_(False)
    skip = list(train_also)
    head = getattr(model, "out_head", None)
    emb = getattr(getattr(model, "emb", None), "tok", None)
    if head is not None and emb is not None and head.weight is emb.weight:
        skip.append(head)
    for parent, name, child in _linear_children(model, skip):
        setattr(parent, name, LoRALinear(child, rank, alpha))
    for module in train_also:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether any layer of `model` carries LoRA adapters."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the tensors that training changes: adapters and any other trainable parameters."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its linear layer; the result is a plain model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------
# LoRA runs on disk: adapter weights only, plus where the frozen base model comes from.

ADAPTER_NAME = "adapter.safetensors"
LORA_FORMAT = "gptforge-lora"


def lora_settings(model: nn.Module) -> dict:
    """{"rank", "alpha", "targets"} of a model wrapped by `apply_lora` (raises if it is not)."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not wrapped:
        raise ValueError("the model has no LoRA adapters; call apply_lora first")
    ranks = {m.rank for _, m in wrapped}
    alphas = {float(m.alpha) for _, m in wrapped}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError("all adapters of a saved LoRA run must share one rank and alpha")
    return {"rank": ranks.pop(), "alpha": alphas.pop(), "targets": [name for name, _ in wrapped]}


def save_lora(model: nn.Module, out_dir: str | os.PathLike, *, base_model: str, **meta) -> Path:
    """Save only what LoRA training changed: `adapter.safetensors` plus `gptforge.json`.

    `gptforge.json` records the adapters' settings under "lora" and the frozen
    model's source under "base_model" (a preset name or a path, stored absolute),
    so `load_lora_run` can rebuild the model from the directory alone.
    """
    from gptforge.checkpoint import CONFIG_NAME, FORMAT_VERSION, atomic_save_safetensors, atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    atomic_save_safetensors(lora_state_dict(model), out / ADAPTER_NAME, metadata={"format": "pt"})
    info = {"format": LORA_FORMAT, "version": FORMAT_VERSION, "lora": lora_settings(model),
            "base_model": base_model, **meta}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        info["model"] = cfg.to_dict()  # lets `gptforge info` and friends read the shape
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(info, indent=2) + "\n").encode())
    return out


def is_lora_run(path: str | os.PathLike) -> bool:
    """True if `path` is a directory written by `save_lora`."""
    meta = Path(path) / "gptforge.json"
    if not meta.is_file() or not (Path(path) / ADAPTER_NAME).is_file():
        return False
    return "lora" in json.loads(meta.read_text())


def load_lora_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a LoRA run: load its base model, wrap it as in training, load the adapters.

    The result has trainable adapters and a frozen base, as after `apply_lora`; call
    `merge_lora` on it for a plain model.
    """
    from safetensors.torch import load_file

    from gptforge.checkpoint import is_gptforge_dir, load_model, read_meta

    meta = read_meta(path)
    if "lora" not in meta or "base_model" not in meta:
        raise ValueError(f"{path} is not a LoRA run (its gptforge.json has no 'lora' / 'base_model')")
    base_source = meta["base_model"]
    if is_gptforge_dir(base_source) and not is_lora_run(base_source):
        base = load_model(base_source, device=device)
    else:
        from gptforge.pretrained import load_pretrained

        try:
            base = load_pretrained(base_source, device=device)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{path} adapts the base model {base_source!r}, which cannot be "
                                    f"loaded ({err}); put it back or edit 'base_model' in "
                                    f"{Path(path) / 'gptforge.json'}") from None
    settings = meta["lora"]
    model = apply_lora(base, rank=int(settings["rank"]), alpha=float(settings["alpha"]))
    wrapped = lora_settings(model)["targets"]
    if settings.get("targets") is not None and list(settings["targets"]) != wrapped:
        raise ValueError(f"the base model {base_source!r} does not have the layers the adapters "
                         f"in {path} were trained for")
    state = load_file(str(Path(path) / ADAPTER_NAME), device=str(device))
    own = dict(model.named_parameters())
    unknown = sorted(set(state) - set(own))
    missing = sorted(name for name in own if own[name].requires_grad and name not in state)
    if unknown or missing:
        raise ValueError(f"{path}/{ADAPTER_NAME} does not match the model: missing "
                         f"{missing or 'none'}, unexpected {unknown or 'none'}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
            own[name].requires_grad_(True)
    return model
