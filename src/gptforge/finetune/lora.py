"""LoRA: low-rank adapters as a transform of an existing model, not a second model class.

Each wrapped nn.Linear keeps its frozen weight W and learns a low-rank update:
y = x W^T + b + alpha * (x A) B, with A (in, rank) random and B (rank, out) zero at
the start, so a freshly wrapped model computes exactly what it computed before. The
scale is `alpha` as in the book's appendix E (not alpha / rank as in some libraries).

This module knows layers only. A LoRA run is saved as adapters only (a few MB
instead of the whole model) next to the name of its base model
(`gptforge.checkpoint.save_model`); `gptforge.load` rebuilds it, merged for use or
with trainable adapters to continue training; `merge_lora` folds adapters in.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from gptforge.errors import BadInputError


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise BadInputError(f"LoRA rank must be at least 1, got {rank}")
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
            if isinstance(child, nn.Linear) and id(child) not in skip_ids:
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


def without_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter removed: the frozen base the adapters sit on."""
    import copy

    base = copy.deepcopy(model)
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.base)
    return base


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_settings(model: nn.Module) -> dict:
    """{"rank", "alpha", "targets"} of a model wrapped by `apply_lora` (raises if it is not)."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not wrapped:
        raise BadInputError("the model has no LoRA adapters; call apply_lora first")
    ranks = {m.rank for _, m in wrapped}
    alphas = {float(m.alpha) for _, m in wrapped}
    if len(ranks) > 1 or len(alphas) > 1:
        raise BadInputError("all adapters of a saved LoRA run must share one rank and alpha")
    return {"rank": ranks.pop(), "alpha": alphas.pop(), "targets": [name for name, _ in wrapped]}
