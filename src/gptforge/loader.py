"""The one way in: `load(source)` turns any model source into a ready GPTModel.

Sources, and how each is read:
- a preset name ("gpt2-small", "124M", ...): OpenAI's files are downloaded first;
- OpenAI's TensorFlow checkpoint (hparams.json + model.ckpt.*) and Hugging Face
  safetensors (config.json + model.safetensors, a sharded index, or one .safetensors
  file): read into GPT-2's flat naming (pretrained/), mapped onto our names;
- a gptforge model or run directory (gptforge.json + model.safetensors), a
  classifier run among them;
- Llama 3, Qwen3 (Qwen2) and Gemma 3 Hugging Face checkpoints, the same files with
  their own config.json (`pretrained/hf_decoder.py`); a Hub repository id
  ("Qwen/Qwen3-0.6B") or a family preset ("qwen3-0.6b") is downloaded first with
  huggingface_hub. These load in bfloat16 unless another dtype is asked for;
- a LoRA run (gptforge.json + adapter.safetensors): its base model is loaded
  through this same function, wrapped with adapters as in training, and the saved
  adapters (and a classifier's head) are put in.

Every path ends in `checkpoint.build_model`, which builds the model on the meta
device around the tensors read, so loading needs the model's size in memory once.
`read_run(source)` gives a source's `RunMeta` without reading any weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from gptforge.checkpoint import (
    ADAPTER_NAME,
    META_NAME,
    WEIGHTS_NAME,
    RunMeta,
    build_model,
    is_gptforge_dir,
    read_weights,
)
from gptforge.config import PRESET_ALIASES, PRESETS, GPTConfig, canonical_preset
from gptforge.errors import CheckpointError, NotFoundError
from gptforge.families import DecoderConfig, hub_repo
from gptforge.finetune.lora import apply_lora, lora_settings, merge_lora
from gptforge.model import GPTModel
from gptforge.pretrained.hf import (
    CONFIG_NAME as HF_CONFIG_NAME,
)
from gptforge.pretrained.hf import (
    WEIGHTS_INDEX_NAME,
    config_from_hf,
    hf_weight_files,
    read_hf_checkpoint,
    read_hf_config,
)
from gptforge.pretrained.hf_decoder import MODEL_TYPES, config_from_hf_decoder, read_model_type, state_from_hf
from gptforge.pretrained.names import flat_to_gptforge
from gptforge.pretrained.openai import HPARAMS_NAME, config_from_hparams, read_openai_checkpoint

# OpenAI names its downloads by parameter count: "gpt2-small" -> "124M".
_DOWNLOAD_SIZES: dict[str, str] = {preset: alias for alias, preset in PRESET_ALIASES.items()
                                   if alias.endswith("M")}
NO_VERIFY_ENV = "GPTFORGE_NO_VERIFY"
_LOOKED_FOR = (f"{META_NAME} + {WEIGHTS_NAME} or {ADAPTER_NAME} (gptforge), "
               f"{HPARAMS_NAME} + model.ckpt.index (OpenAI's TensorFlow checkpoint), "
               f"{HF_CONFIG_NAME} + model.safetensors or {WEIGHTS_INDEX_NAME} (Hugging Face), "
               f"or a .safetensors file with {HF_CONFIG_NAME} beside it")


def load(source: str | os.PathLike, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | str | None = None, for_training: bool = False,
         verify: bool | None = None, download_format: str = "openai") -> GPTModel:
    """Load a GPTModel from any source (see the module docstring for the kinds).

    The model comes in eval mode, with a LoRA run's adapters merged in. With
    `for_training`, it comes in train mode and a LoRA run keeps its adapters
    separate and trainable (the base frozen), as when it was saved. `dtype`
    converts the weights; "auto" keeps every tensor as stored, and so does None, except
    that Llama / Qwen / Gemma checkpoints from Hugging Face load in bfloat16 (float32
    with `for_training`: optimizer updates need full-precision weights to accumulate
    in). `verify=False` skips the checks
    of the weights: the sha256 recorded for gptforge's files, NaN and
    infinities, the CRC-32Cs of TensorFlow files (default: check, unless the
    environment sets GPTFORGE_NO_VERIFY=1, as `gptforge --no-verify` does). A preset
    is downloaded in `download_format` ("openai" or "hf") if it is not in the cache.
    """
    if verify is None:
        verify = os.environ.get(NO_VERIFY_ENV) != "1"
    path = resolve(source, download_format)
    kind = detect_format(path)
    if dtype == "auto":
        dtype = None if kind != "hf" or not _is_decoder_family(path) else "as stored"
    if kind == "gptforge":
        model = _load_gptforge(path, device, dtype, for_training, verify)
    elif kind == "hf" and _is_decoder_family(path):
        default = torch.float32 if for_training else torch.bfloat16
        model = _load_hf_decoder(path, device, None if dtype == "as stored" else dtype or default, verify)
    else:
        if kind == "openai":
            cfg, flat = read_openai_checkpoint(path, verify=verify)
        else:
            cfg, flat = read_hf_checkpoint(path)
        try:
            state = flat_to_gptforge(flat, cfg, dtype=dtype, device=device)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        del flat  # drop the memory maps
        model = build_model(cfg, state, where=str(path))
    return model.train(for_training)


def read_run(source: str | os.PathLike) -> RunMeta:
    """The `RunMeta` of a source, read from its config files alone (no weights are read;
    a Hub model not in the cache is downloaded).

    For OpenAI and Hugging Face checkpoints and preset names it describes a plain
    language model with that config.
    """
    path = Path(source)
    preset = canonical_preset(str(source))
    if preset is not None and not path.exists():
        return RunMeta(model=GPTConfig.from_name(preset, drop_rate=0.0), base_model=preset)
    if preset is None and hub_repo(str(source)) and not path.exists():
        return RunMeta(model=DecoderConfig.from_name(str(source)), base_model=str(source))
    if not path.exists() and _is_hub_id(str(source)):
        path = resolve(source)  # a Hub model: its config.json (from the cache, or fetched)
    kind = detect_format(path)
    folder = path if path.is_dir() else path.parent
    if kind == "gptforge":
        return RunMeta.read(folder)
    try:
        if kind == "openai":
            cfg = config_from_hparams(json.loads((folder / HPARAMS_NAME).read_text()))
        elif _is_decoder_family(folder):
            cfg = config_from_hf_decoder(json.loads((folder / HF_CONFIG_NAME).read_text()))
        else:
            cfg = config_from_hf(json.loads((folder / HF_CONFIG_NAME).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"the config file in {folder} is not valid JSON ({err})") from None
    return RunMeta(model=cfg, source=str(path))


def resolve(source: str | os.PathLike, download_format: str = "openai") -> Path:
    """The local path of a source: the path itself, or a preset's downloaded folder."""
    path = Path(source)
    if path.exists() or path.with_name(path.name + ".index").is_file():
        return path
    preset = canonical_preset(str(source))
    if preset is None and _is_hub_id(str(source)):
        from gptforge.hub import download_model  # network code only when a download is asked for

        return download_model(hub_repo(str(source)) or str(source))
    if preset is None:
        names = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
        raise NotFoundError(f"cannot load {str(source)!r}: no such file or directory, and not a "
                            f"preset name ({names}); a path should hold {_LOOKED_FOR}")
    from gptforge.download import download_gpt2  # network code only when a download is asked for

    return Path(download_gpt2(_DOWNLOAD_SIZES[preset], download_format))


def detect_format(path: str | os.PathLike) -> str:
    """Say which kind of checkpoint `path` is: "gptforge", "openai" or "hf".

    Raises NotFoundError listing what was looked for when it is none of them.
    """
    path = Path(path)
    if path.is_dir():
        if is_gptforge_dir(path):
            return "gptforge"
        if (path / HPARAMS_NAME).is_file() and (
                (path / "checkpoint").is_file() or any(path.glob("*.index"))):
            return "openai"
        if (path / HF_CONFIG_NAME).is_file() and (
                (path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file()):
            return "hf"
    elif path.suffix == ".safetensors" and path.is_file():
        return "hf"
    elif path.suffix == ".index" and path.is_file():
        return "openai"
    elif path.with_name(path.name + ".index").is_file():
        return "openai"  # a checkpoint prefix
    hint = ""
    if path.is_dir() and not any(path.iterdir()):
        hint = " (the directory is empty)"
    raise NotFoundError(f"{path} is not a model checkpoint{hint}; looked for {_LOOKED_FOR}")


def _load_gptforge(path: Path, device, dtype, for_training: bool, verify: bool) -> GPTModel:
    meta = RunMeta.read(path)
    if meta.checkpoint:  # a training run: its current checkpoint holds the weights
        path = path / meta.checkpoint
        meta = RunMeta.read(path)
    if meta.adapters_only:
        return _load_lora_run(path, meta, device, dtype, for_training, verify)
    if not meta.adapters_only and not (path / WEIGHTS_NAME).is_file() and (path / "train_config.json").is_file():
        raise NotFoundError(f"{path} is a training run that was stopped before its first checkpoint: "
                            f"it holds no weights yet; resume it (`--resume {path}`) or start it again")
    if for_training and meta.classifier is not None and meta.classifier.trainable == "lora":
        raise CheckpointError(f"{path} is a LoRA classifier saved by gptforge 0.1 with its adapters "
                              f"merged in; it loads for use, but training cannot resume from it: "
                              f"start a new run with --model {path}")
    state = read_weights(path / WEIGHTS_NAME, device, (meta.sha256 or {}).get(WEIGHTS_NAME), verify)
    model = build_model(meta.model, state, meta.num_outputs, meta.head_bias,
                        where=str(path / WEIGHTS_NAME))
    return model.to(dtype=dtype) if dtype else model


def _load_lora_run(path: Path, meta: RunMeta, device, dtype, for_training: bool,
                   verify: bool) -> GPTModel:
    """The base model, wrapped with adapters as in training, holding the saved adapters."""
    if not meta.base_model:
        raise CheckpointError(f"{path / META_NAME} describes LoRA adapters but names no base_model")
    # A relative path is the run's own copy of its base, next to (or above) the adapters.
    base = path / meta.base_model if (path / meta.base_model).exists() else meta.base_model
    try:
        model = load(base, device=device, dtype=dtype, verify=verify)
    except NotFoundError as err:
        raise NotFoundError(f"{path} adapts the base model {meta.base_model!r}, which cannot be "
                            f"loaded ({err}); put it back or edit 'base_model' in "
                            f"{path / META_NAME}") from None
    train_also: list[nn.Module] = []
    if meta.num_outputs is not None:  # a classifier: its new head is trained and saved too
        weight = model.out_head.weight
        model.out_head = nn.Linear(model.cfg.emb_dim, meta.num_outputs, bias=meta.head_bias,
                                   device=weight.device, dtype=weight.dtype)
        train_also.append(model.out_head)
    apply_lora(model, rank=meta.lora.rank, alpha=meta.lora.alpha, train_also=train_also)
    if meta.lora.targets is not None and list(meta.lora.targets) != lora_settings(model)["targets"]:
        raise CheckpointError(f"the base model {meta.base_model!r} does not have the layers the "
                              f"adapters in {path} were trained for")
    state = read_weights(path / ADAPTER_NAME, device, (meta.sha256 or {}).get(ADAPTER_NAME), verify)
    own = dict(model.named_parameters())
    unknown = sorted(set(state) - set(own))
    missing = sorted(name for name, p in own.items() if p.requires_grad and name not in state)
    wrong = [n for n in state if n in own and state[n].shape != own[n].shape]
    if unknown or missing or wrong:
        raise CheckpointError(f"{path / ADAPTER_NAME} does not fit the model: missing "
                              f"{missing or 'none'}, unexpected {unknown or 'none'}, wrong shape "
                              f"{wrong or 'none'}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)
            own[name].requires_grad_(True)
    return model if for_training else merge_lora(model)


def _is_hub_id(name: str) -> bool:
    from gptforge.hub import looks_like_repo

    # "runs/x" where runs/ exists is a local path that is missing, not a Hub model.
    return hub_repo(name) is not None or (looks_like_repo(name) and not Path(name).parent.exists())


def _is_decoder_family(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent
    return read_model_type(folder / HF_CONFIG_NAME) in MODEL_TYPES


def _load_hf_decoder(path: Path, device, dtype: torch.dtype | None, verify: bool) -> nn.Module:
    """A Llama / Qwen / Gemma checkpoint: tensors read one at a time from the memory-mapped
    safetensors files, converted to `dtype` on `device`, and put into a model built on the
    meta device (so loading needs the model's size in memory once)."""
    from safetensors import safe_open

    cfg = config_from_hf_decoder(read_hf_config(path))
    where: dict[str, object] = {}
    for file in hf_weight_files(path):
        handle = safe_open(str(file), framework="pt", device="cpu")
        where.update({key: handle for key in handle.keys()})

    state = state_from_hf(_TensorReader(where, device, dtype, verify, str(path)), cfg, str(path))
    del where  # closes the files: the model holds copies
    return build_model(cfg, state, where=str(path))


TOKENIZER_FILE = "tokenizer.json"


def tokenizer_dir(source: str | os.PathLike) -> Path | None:
    """The folder holding the tokenizer (tokenizer.json) of a source's model, or None for
    GPT-2's BPE, which gptforge builds itself. A run looks in its own folder and its
    current checkpoint, then follows its base model or the source it was made from."""
    seen: set[str] = set()
    todo = [source]
    while todo:
        item = todo.pop(0)
        if item is None or str(item) in seen or str(item).startswith("init:"):
            continue
        seen.add(str(item))
        path = Path(item)
        if not path.exists():
            if canonical_preset(str(item)) is not None or not _is_hub_id(str(item)):
                continue
            path = resolve(item)
        folder = path if path.is_dir() else path.parent
        if (folder / TOKENIZER_FILE).is_file():
            return folder
        if is_gptforge_dir(folder):
            meta = RunMeta.read(folder)
            if meta.checkpoint:
                todo.append(folder / meta.checkpoint)
            for ref in (meta.base_model, meta.source):
                if ref:  # a relative path is the run's own copy of its base, next to the run
                    todo.append(folder / ref if (folder / ref).exists() else ref)
    return None


def tokenizer_for(source: str | os.PathLike):
    """The tokenizer of a source's model: its own (tokenizer.json, through the `tokenizers`
    library) for Llama / Qwen / Gemma models, or GPT-2's BPE (tiktoken) otherwise."""
    folder = tokenizer_dir(source)
    if folder is None:
        from gptforge.tokenizer import get_tokenizer

        return get_tokenizer()
    from gptforge.hf_tokenizer import load_tokenizer

    return load_tokenizer(folder)


class _TensorReader(dict):
    """Tensors of open safetensors files looked up by name, each read and converted when asked for.

    Each is a copy, not a view of the memory-mapped file: one norm weight left on the map
    would keep the whole file mapped (and counted as the process's memory) while the model
    is in use."""

    def __init__(self, where: dict, device, dtype: torch.dtype | None, verify: bool, path: str) -> None:
        super().__init__(dict.fromkeys(where))
        self._where, self._device, self._dtype, self._verify, self._path = where, device, dtype, verify, path

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._where[key].get_tensor(key).to(device=self._device, dtype=self._dtype, copy=True)
        if self._verify and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self._path}: tensor {key} holds NaN or infinite values")
        return tensor
