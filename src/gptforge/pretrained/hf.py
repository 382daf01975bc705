"""Read and write Hugging Face GPT-2 checkpoints (config.json + safetensors) without transformers.

Reading maps Hugging Face's names onto the flat naming of names.py: the
`transformer.` prefix goes, the attention-mask buffers (`h.{i}.attn.bias`,
`h.{i}.attn.masked_bias`) that old exports carry are dropped, and `lm_head.weight`
is kept only when the config unties it from `wte`. Tensors are read lazily from
the memory-mapped files, one at a time, as they are looked up.

Writing produces what `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from gptforge.config import GPTConfig
from gptforge.errors import CheckpointError, NotFoundError
from gptforge.fileio import atomic_write_json, write_safetensors
from gptforge.model import GPTModel
from gptforge.pretrained.names import gptforge_to_flat, name_map

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# The GELU variants Hugging Face offers that are the tanh approximation gptforge uses.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Flat-named tensors in safetensors files, each read from its file only when looked up."""

    def __init__(self, files: list[Path], tie_weights: bool) -> None:
        self._where: dict[str, tuple[object, str]] = {}  # flat name -> (open file, key in it)
        for file in files:
            handle = safe_open(str(file), framework="pt")
            for key in handle.keys():
                flat = _hf_to_flat_name(key, tie_weights)
                if flat is None:
                    continue
                if flat in self._where:
                    raise CheckpointError(f"{file} holds tensor {flat!r} twice (as {key!r} and "
                                     f"{self._where[flat][1]!r}); keep one of them")
                self._where[flat] = (handle, key)

    def __getitem__(self, name: str) -> torch.Tensor:
        handle, key = self._where[name]
        return handle.get_tensor(key)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _hf_to_flat_name(key: str, tie_weights: bool) -> str | None:
    """The flat name of a Hugging Face GPT-2 tensor, or None for tensors that are not weights."""
    name = key.removeprefix("transformer.")
    if _MASK_BUFFER.match(name):
        return None  # causal-mask buffers, rebuilt by every implementation
    if name == "lm_head.weight" and tie_weights:
        return None  # the same values as wte.weight
    return name


def config_from_hf(config: dict) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 `config.json`.

    Raises ValueError for settings gptforge's model cannot reproduce (another
    model type, a non-tanh GELU, a custom feed-forward width, layer-wise attention
    scaling). Dropout is set to 0.0, as for OpenAI's checkpoints: a loaded model
    is ready for inference, and a rate can be set before fine-tuning.
    """
    model_type = config.get("model_type", "gpt2")
    if model_type != "gpt2":
        from gptforge.pretrained.hf_decoder import MODEL_TYPES

        raise CheckpointError(f"{CONFIG_NAME} describes a {model_type!r} model; gptforge loads the model "
                              f"types gpt2, {', '.join(MODEL_TYPES)}")
    emb_dim = config.get("n_embd", config.get("hidden_size"))
    problems = []
    if config.get("activation_function", "gelu_new") not in _TANH_GELUS:
        problems.append(f"activation_function={config['activation_function']!r} (gptforge uses "
                        f"the tanh GELU, 'gelu_new')")
    if config.get("n_inner") not in (None, 4 * (emb_dim or 0)):
        problems.append(f"n_inner={config['n_inner']} (gptforge's feed-forward is 4 * n_embd)")
    if config.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=false")
    if config.get("add_cross_attention"):
        problems.append("add_cross_attention=true")
    if problems:
        raise CheckpointError(f"this GPT-2 variant cannot be loaded: {'; '.join(problems)}")
    fields = {"vocab_size": config.get("vocab_size"), "emb_dim": emb_dim,
              "n_heads": config.get("n_head"), "n_layers": config.get("n_layer"),
              "context_length": config.get("n_positions", config.get("n_ctx"))}
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise CheckpointError(f"{CONFIG_NAME} lacks the GPT-2 sizes for {', '.join(missing)} "
                         f"(expected vocab_size, n_embd, n_head, n_layer, n_positions)")
    return GPTConfig(**{k: int(v) for k, v in fields.items()}, drop_rate=0.0, qkv_bias=True,
                     tie_weights=bool(config.get("tie_word_embeddings", True)),
                     ln_eps=float(config.get("layer_norm_epsilon", 1e-5)))


def hf_config(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A Hugging Face `config.json` (as a dict) for a GPT-2 with the architecture of `cfg`."""
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.ln_eps,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_weights,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    # GPT-2's <|endoftext|> is token 50256; for a smaller vocabulary it is unknown.
    end_of_text = 50256 if cfg.vocab_size > 50256 else None
    config["bos_token_id"] = config["eos_token_id"] = end_of_text
    return config


def read_hf_checkpoint(path: str | Path) -> tuple[GPTConfig, SafetensorsWeights]:
    """Read a Hugging Face GPT-2 checkpoint into (config, lazily loaded flat-named tensors).

    `path` is a directory with `config.json` and `model.safetensors` (or a sharded
    `model.safetensors.index.json`), or a `.safetensors` file with `config.json`
    beside it.
    """
    cfg = config_from_hf(read_hf_config(path))
    return cfg, SafetensorsWeights(hf_weight_files(path), cfg.tie_weights)


def read_hf_config(path: str | Path) -> dict:
    """The parsed `config.json` of a checkpoint (see `hf_config_file`); CheckpointError when it
    is not valid JSON."""
    config_file = hf_config_file(path)
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err}); download the model again") from None


def hf_config_file(path: str | Path) -> Path:
    """The `config.json` of a Hugging Face checkpoint directory or of a `.safetensors` file
    (the one beside it); NotFoundError when there is none."""
    path = Path(path)
    config_file = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config_file.is_file():
        raise NotFoundError(f"{config_file} not found: a Hugging Face checkpoint needs its "
                                f"config.json next to the weights")
    return config_file


def hf_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint (GPT-2 or another family).

    `path` itself when it is a file; else its directory's (a missing file's: the one
    it would be in) `model.safetensors`, or the shards its `model.safetensors.index.json`
    lists, in name order. NotFoundError when there is neither, or when a listed shard is missing.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    directory = path if path.is_dir() else path.parent
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    if (directory / WEIGHTS_INDEX_NAME).is_file():
        weight_map = json.loads((directory / WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise NotFoundError(f"{shard} is missing: the shard index lists it; download the model again")
        return shards
    hint = ""
    if (directory / "pytorch_model.bin").is_file():
        hint = (" (it has pytorch_model.bin: convert it with transformers, "
                "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(out_dir))")
    raise NotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}{hint}")


def save_hf(model: GPTModel, out_dir: str | Path, special: dict | None = None) -> Path:
    """Save `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors).

    The result loads with `transformers.GPT2LMHeadModel.from_pretrained(out_dir)`.
    `special` (bos_token_id, eos_token_id, pad_token_id) goes into config.json.
    A model without QKV biases gets zero biases (the same function). Tensors are
    written one at a time, so saving needs no second copy of the model in memory.
    Returns the output directory.
    """
    cfg = model.cfg
    flat = gptforge_to_flat(model.state_dict(), cfg)
    dtype = model.emb.tok.weight.dtype
    if not cfg.qkv_bias:
        flat.update({f"h.{i}.attn.c_attn.bias": torch.zeros(3 * cfg.emb_dim, dtype=dtype)
                     for i in range(cfg.n_layers)})
    order = list(name_map(cfg.replace(qkv_bias=True)))
    tensors = {(name if name == "lm_head.weight" else f"transformer.{name}"): flat[name]
               for name in order}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_NAME, {**hf_config(cfg, dtype), **(special or {})})
    return out
