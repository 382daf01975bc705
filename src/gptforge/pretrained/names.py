"""The one name map between GPT-2's flat weight naming and gptforge's parameters.

Every reader (OpenAI's TensorFlow checkpoint, Hugging Face safetensors) first turns
its source into one flat naming: Hugging Face's GPT-2 names without the
`transformer.` prefix, with weights in GPT-2's Conv1D orientation [in, out]:

    wte.weight [V, D], wpe.weight [C, D], ln_f.weight|bias [D],
    h.{i}.ln_1.weight|bias, h.{i}.attn.c_attn.weight [D, 3D]|bias,
    h.{i}.attn.c_proj.weight [D, D]|bias, h.{i}.ln_2.weight|bias,
    h.{i}.mlp.c_fc.weight [D, 4D]|bias, h.{i}.mlp.c_proj.weight [4D, D]|bias,
    lm_head.weight [V, D] (only for an output head not tied to wte).

The tables below map that naming onto gptforge's parameter names, and say which
tensors are transposed on the way (nn.Linear stores [out, in]).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from gptforge.config import GPTConfig
from gptforge.errors import CheckpointError
from gptforge.model import GPTModel

# (flat name, gptforge name, transpose). "{i}" is the block index.
LAYER_NAMES: tuple[tuple[str, str, bool], ...] = (
    ("h.{i}.ln_1.weight", "blocks.{i}.norm1.weight", False),
    ("h.{i}.ln_1.bias", "blocks.{i}.norm1.bias", False),
    ("h.{i}.attn.c_attn.weight", "blocks.{i}.attn.qkv.weight", True),
    ("h.{i}.attn.c_attn.bias", "blocks.{i}.attn.qkv.bias", False),
    ("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.proj.weight", True),
    ("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.proj.bias", False),
    ("h.{i}.ln_2.weight", "blocks.{i}.norm2.weight", False),
    ("h.{i}.ln_2.bias", "blocks.{i}.norm2.bias", False),
    ("h.{i}.mlp.c_fc.weight", "blocks.{i}.ff.fc.weight", True),
    ("h.{i}.mlp.c_fc.bias", "blocks.{i}.ff.fc.bias", False),
    ("h.{i}.mlp.c_proj.weight", "blocks.{i}.ff.proj.weight", True),
    ("h.{i}.mlp.c_proj.bias", "blocks.{i}.ff.proj.bias", False),
)
MODEL_NAMES: tuple[tuple[str, str, bool], ...] = (
    ("wte.weight", "emb.tok.weight", False),
    ("wpe.weight", "emb.pos.weight", False),
    ("ln_f.weight", "final_norm.weight", False),
    ("ln_f.bias", "final_norm.bias", False),
    ("lm_head.weight", "out_head.weight", False),  # only when the head is not tied to wte
)

Tensorish = Any  # np.ndarray or torch.Tensor


def name_map(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    """{flat name: (gptforge name, transpose)} for every tensor a model of `cfg` has."""
    table: dict[str, tuple[str, bool]] = {}
    for flat, ours, transpose in MODEL_NAMES:
        if flat == "lm_head.weight" and cfg.tie_weights:
            continue  # the tied head is wte itself
        table[flat] = (ours, transpose)
    for i in range(cfg.n_layers):
        for flat, ours, transpose in LAYER_NAMES:
            if flat.endswith("c_attn.bias") and not cfg.qkv_bias:
                continue
            table[flat.format(i=i)] = (ours.format(i=i), transpose)
    return table


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of gptforge's parameters for `cfg`, read off a model on the meta device."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def flat_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape every flat-named tensor must have for a model of `cfg`."""
    ours = parameter_shapes(cfg)
    return {flat: _flip(ours[name]) if transpose else ours[name]
            for flat, (name, transpose) in name_map(cfg).items()}


def flat_to_gptforge(flat: Mapping[str, Tensorish], cfg: GPTConfig, *,
                     dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Turn flat-named GPT-2 tensors into a gptforge state dict for a model of `cfg`.

    Values may be NumPy arrays or torch tensors, and `flat` may load them lazily:
    each is read, transposed where the table says so, and converted to `dtype` on
    `device` one at a time, so memory peaks at the model's size plus one tensor.
    A tied output head appears as the same tensor as `emb.tok.weight`. Raises
    ValueError naming any missing, unexpected or wrongly shaped tensor.
    """
    table = name_map(cfg)
    _check_names(set(flat), set(table), "checkpoint")
    shapes = flat_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for flat_name, (name, transpose) in table.items():
        value = flat[flat_name]
        if tuple(value.shape) != shapes[flat_name]:
            wrong.append(f"{flat_name} has shape {list(value.shape)}, expected "
                         f"{list(shapes[flat_name])}")
        if wrong:
            continue  # only collect the remaining shape errors
        state[name] = _to_torch(value, transpose).to(device=device, dtype=dtype)
    if wrong:
        raise CheckpointError(f"checkpoint tensors do not fit {_describe(cfg)}: " + "; ".join(wrong))
    if cfg.tie_weights:
        state["out_head.weight"] = state["emb.tok.weight"]
    return state


def gptforge_to_flat(state_dict: Mapping[str, torch.Tensor],
                     cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Turn a gptforge state dict into flat-named GPT-2 tensors (the inverse of flat_to_gptforge).

    Transposed weights come back as views, not copies. With `cfg.tie_weights`
    an `out_head.weight` entry may be present but must be the token embedding.
    Raises ValueError naming any missing, unexpected or wrongly shaped tensor.
    """
    table = name_map(cfg)
    state = dict(state_dict)
    if cfg.tie_weights and "out_head.weight" in state and "emb.tok.weight" in state:
        head, tok = state.pop("out_head.weight"), state["emb.tok.weight"]
        if not _same_tensor(head, tok):
            raise CheckpointError(
                "out_head.weight is not tied to emb.tok.weight although the config says "
                "tie_weights=True; save a model whose config has tie_weights=False instead")
    _check_names(set(state), {ours for ours, _ in table.values()}, "state dict")
    shapes = parameter_shapes(cfg)
    wrong = [f"{name} has shape {list(state[name].shape)}, expected {list(shapes[name])}"
             for name, _ in table.values() if tuple(state[name].shape) != shapes[name]]
    if wrong:
        raise CheckpointError(f"state dict does not fit {_describe(cfg)}: " + "; ".join(wrong))
    return {flat: state[name].t() if transpose else state[name]
            for flat, (name, transpose) in table.items()}


def _check_names(present: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected)}")
        raise CheckpointError(f"{what} does not match a GPT-2 model: " + "; ".join(parts))


def _to_torch(value: Tensorish, transpose: bool) -> torch.Tensor:
    """A contiguous torch tensor that owns its memory (one copy of a memory-mapped array)."""
    if isinstance(value, np.ndarray):
        array = value.T if transpose else value
        return torch.from_numpy(np.array(array, order="C", copy=True))
    tensor = value.detach()
    return tensor.t().contiguous() if transpose else tensor.contiguous()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b))


def _flip(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape))


def _describe(cfg: GPTConfig) -> str:
    return (f"a model with vocab_size={cfg.vocab_size}, context_length={cfg.context_length}, "
            f"emb_dim={cfg.emb_dim}, n_layers={cfg.n_layers}")
