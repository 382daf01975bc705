"""gptforge's own format: a directory with `gptforge.json` and the weights beside it.

`RunMeta` is the only reader and writer of `gptforge.json`: the model's GPTConfig,
what the directory is for (a language model, an instruction run, a classifier),
where its weights started, and what a command needs to use it again (the prompt
template, the label names). The weights are `model.safetensors`, or, for a LoRA
run, only the trained tensors in `adapter.safetensors` (adapters, and a
classifier's new head) on top of the base model that `base_model` names.

This module knows files, not sources: `gptforge.loader.load` is the one entry
point that turns any source (this format, OpenAI's, Hugging Face's, a preset
name) into a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from gptforge.config import GPTConfig
from gptforge.errors import CheckpointError, NotFoundError
from gptforge.families import DecoderConfig
from gptforge.fileio import atomic_write_json, file_sha256, write_safetensors
from gptforge.finetune.lora import has_lora, lora_settings, lora_state_dict, without_lora
from gptforge.model import GPTModel

ModelConfig = GPTConfig | DecoderConfig  # GPT-2, or Llama 3 / Qwen3 / Gemma 3 (its `arch` says which)

META_NAME = "gptforge.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_NAME = "adapter.safetensors"
BASE_DIR = "base"  # a LoRA run's own copy of a base that cannot be loaded from elsewhere
FORMAT_VERSION = 2  # 1: gptforge 0.1 (still read); 2: typed sections, one LoRA format
TASKS = ("lm", "instruct", "classifier")


@dataclass
class LoRASettings:
    """The adapters of a LoRA run: their rank and scale, and the layers they wrap."""

    rank: int
    alpha: float
    targets: list[str] | None = None


@dataclass
class ClassifierSettings:
    """What a classifier needs besides its weights to read text and name its answers."""

    labels: list[str]
    pooling: str = "last-token"
    max_length: int | None = None
    pad_id: int = 50256
    trainable: str = "last-block"  # which parameters training updates (see finetune.classify)


@dataclass
class RunMeta:
    """The contents of `gptforge.json`: a model's config and what its run was.

    `lora` set means the directory holds adapters only, to be put on `base_model`.
    `num_outputs` is the output head's width when it is not the vocabulary (a
    classifier's classes). `template` is the prompt template of an instruction run.
    """

    model: ModelConfig
    task: str = "lm"
    num_outputs: int | None = None
    head_bias: bool = False
    step: int | None = None
    base_model: str | None = None  # a preset, a path, or "init:PRESET" for a fresh model
    lora: LoRASettings | None = None
    template: str | None = None
    instruct: dict[str, Any] | None = None  # the options of an instruction run
    classifier: ClassifierSettings | None = None
    data: Any = None  # what the run trained on
    source: str | None = None  # what the weights were converted or merged from
    val_loss: float | None = None  # set on a best/ checkpoint
    sha256: dict[str, str] | None = None  # of each weights file, checked when it is loaded
    checkpoint: str | None = None  # a run's current checkpoint directory, relative to the run
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CheckpointError(f"unknown task {self.task!r} (expected one of {', '.join(TASKS)})")

    @property
    def adapters_only(self) -> bool:
        return self.lora is not None

    def replace(self, **changes: Any) -> "RunMeta":
        return dataclasses.replace(self, **changes)

    # -- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": "gptforge", "version": FORMAT_VERSION, "task": self.task,
                               "model": self.model.to_dict()}
        if self.num_outputs is not None:
            out["head"] = {"outputs": self.num_outputs, "bias": self.head_bias}
        for name in ("step", "base_model", "template", "instruct", "data", "source", "val_loss", "sha256",
                     "checkpoint"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.lora is not None:
            out["lora"] = dataclasses.asdict(self.lora)
        if self.classifier is not None:
            out["classifier"] = dataclasses.asdict(self.classifier)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = META_NAME) -> "RunMeta":
        """Parse gptforge.json (format version 1 or 2); CheckpointError names what is wrong."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where} holds a {type(data).__name__}, not a JSON object; "
                                  f"it is not a gptforge model directory")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"{where} has format version {version!r}; this gptforge reads "
                                  f"versions up to {FORMAT_VERSION}: upgrade gptforge")
        if not isinstance(data.get("model"), dict):
            raise CheckpointError(f"{where} has no 'model' object with the model's config")
        try:
            config = _config_from_dict(data["model"])
            fields = _fields_v1(data) if version == 1 else _fields_v2(data)
            return cls(model=config, version=version, **fields)
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{where} is not valid: {err}") from None

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "RunMeta":
        """Read `directory/gptforge.json`."""
        path = Path(directory) / META_NAME
        if not path.is_file():
            raise NotFoundError(f"{directory} is not a gptforge model directory (no {META_NAME})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON ({err}); restore it from a backup "
                                  f"or save the model again") from None
        return cls.from_dict(data, str(path))

    def write(self, directory: str | os.PathLike) -> Path:
        """Write `directory/gptforge.json` atomically."""
        path = Path(directory) / META_NAME
        atomic_write_json(path, self.to_dict())
        return path


def _config_from_dict(model: dict[str, Any]) -> ModelConfig:
    if model.get("arch", "gpt2") != "gpt2":
        return DecoderConfig.from_dict(model)
    known = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    ints = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
    for name in ints:
        if name in model and (not isinstance(model[name], int) or isinstance(model[name], bool)):
            raise ValueError(f"model.{name} must be a whole number, not {model[name]!r}")
    return GPTConfig.from_dict({k: v for k, v in model.items() if k in known})


def _fields_v2(data: dict[str, Any]) -> dict[str, Any]:
    head = data.get("head") or {}
    return dict(
        task=data.get("task", "lm"), num_outputs=head.get("outputs"),
        head_bias=bool(head.get("bias", False)), step=data.get("step"),
        base_model=data.get("base_model"),
        lora=LoRASettings(**data["lora"]) if data.get("lora") else None,
        template=data.get("template"), instruct=data.get("instruct"),
        classifier=ClassifierSettings(**data["classifier"]) if data.get("classifier") else None,
        data=data.get("data"), source=data.get("source"), val_loss=data.get("val_loss"),
        sha256=data.get("sha256"), checkpoint=data.get("checkpoint"),
    )


def _fields_v1(data: dict[str, Any]) -> dict[str, Any]:
    """gptforge 0.1's layout: task settings at the top level, LoRA runs with their own format
    name, and the prompt template inside the instruction options."""
    head = data.get("head") or {}
    outputs = head.get("outputs")
    vocab = data["model"].get("vocab_size", GPTConfig.vocab_size)
    classifier = None
    if data.get("task") == "classifier":
        classifier = ClassifierSettings(
            labels=list(data["labels"]), pooling=data.get("pooling", "last-token"),
            max_length=data.get("max_length"), pad_id=data.get("pad_id", 50256),
            trainable=data.get("trainable", "last-block"))
    instruct = data.get("instruct")
    lora = data.get("lora") if data.get("format") == "gptforge-lora" else None
    return dict(
        task=data.get("task", "lm"),
        num_outputs=outputs if outputs is not None and (outputs != vocab or head.get("bias")) else None,
        head_bias=bool(head.get("bias", False)), step=data.get("step"),
        base_model=data.get("base_model") or (data.get("source") if classifier else None),
        lora=LoRASettings(**lora) if lora else None,
        template=(instruct or {}).get("template"), instruct=instruct, classifier=classifier,
        data=data.get("data"), source=data.get("converted_from") or data.get("merged_from"),
        val_loss=data.get("val_loss"),
    )


def is_gptforge_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META_NAME).is_file()


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """root/<name>, or root/<name>-2, -3, ... if taken, so no earlier run is overwritten."""
    base = Path(root) / name
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


# ------------------------------------------------------------------------------------
# weights

def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for saving, with a tied output head stored once."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.out_head.weight is model.emb.tok.weight:
        state.pop("out_head.weight")
    return state


def save_model(model: GPTModel, out_dir: str | os.PathLike, meta: RunMeta | None = None) -> Path:
    """Save `model` into `out_dir` with `meta` (default: a plain language model).

    A model carrying LoRA adapters is saved as adapters only (plus any other
    trainable tensor, such as a classifier's new head) on top of the model that
    `meta.base_model` names. A base that cannot be loaded again (a freshly
    initialised model, "init:PRESET") is saved once, frozen, into `out_dir/base`.
    Anything else is saved whole. Returns `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or RunMeta(model=model.cfg)
    head = model.out_head
    outputs = head.out_features if head.out_features != model.cfg.vocab_size or head.bias is not None else None
    meta = meta.replace(model=model.cfg, num_outputs=outputs, head_bias=head.bias is not None)
    if has_lora(model):
        if not meta.base_model or meta.base_model.startswith("init:"):
            if not is_gptforge_dir(out / BASE_DIR):
                save_model(without_lora(model), out / BASE_DIR, RunMeta(model=model.cfg,
                                                                        base_model=meta.base_model))
            meta = meta.replace(base_model=BASE_DIR)
        settings = lora_settings(model)
        meta = meta.replace(lora=LoRASettings(settings["rank"], settings["alpha"], settings["targets"]))
        digest = write_safetensors(out / ADAPTER_NAME, lora_state_dict(model), metadata={"format": "pt"})
        (out / WEIGHTS_NAME).unlink(missing_ok=True)  # a stale full model would shadow the adapters
        meta = meta.replace(sha256={ADAPTER_NAME: digest})
    else:
        digest = write_safetensors(out / WEIGHTS_NAME, model_state(model), metadata={"format": "pt"})
        meta = meta.replace(lora=None, sha256={WEIGHTS_NAME: digest})
    meta.replace(checkpoint=None).write(out)
    return out


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu",
                 sha256: str | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked: it parses and, with `verify`, matches
    `sha256` (when one is recorded) and holds no NaN or infinity. A CheckpointError
    names the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path} is missing; the directory holds no weights")
    if verify and sha256 is not None and file_sha256(path) != sha256:
        raise CheckpointError(f"{path} does not have the sha256 recorded in {META_NAME}: the file "
                              f"was changed or damaged after it was saved; save or download it again "
                              f"(or load with verify=False / gptforge --no-verify to use it anyway)")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be "
                              f"truncated or corrupt: save or download the model again") from None
    if verify:
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"{path} holds NaN or infinite values in {', '.join(bad[:5])}"
                                  f"{' ...' if len(bad) > 5 else ''}: the model was saved after training "
                                  f"diverged; use an earlier checkpoint")
    return tensors


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """GPTModel for a GPT-2 config, DecoderModel for the later families."""
    if isinstance(cfg, DecoderConfig):
        from gptforge.decoder import DecoderModel

        return DecoderModel
    return GPTModel


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], num_outputs: int | None = None,
                head_bias: bool = False, where: str = "the checkpoint") -> GPTModel:
    """Build a GPTModel (or DecoderModel) around `state` without allocating a second, random copy of the weights.

    `num_outputs`/`head_bias` describe an output head other than the language-model
    head, such as a classifier's. The model is built on the meta device and takes
    the tensors as they are (their device and dtype).
    """
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
        if num_outputs is not None:
            model.out_head = nn.Linear(cfg.emb_dim, num_outputs, bias=head_bias)
    tied = model.out_head.weight is model.emb.tok.weight
    if tied:
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "out_head.weight")}
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    wrong = [f"{k} is {list(state[k].shape)}, expected {list(s)}" for k, s in shapes.items()
             if k in state and tuple(state[k].shape) != s]
    if missing or unexpected or wrong:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
                   ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + wrong
        raise CheckpointError(f"{where} does not fit its config ({_describe(cfg)}): "
                              + "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.out_head.weight = model.emb.tok.weight
    return model


def _describe(cfg: ModelConfig) -> str:
    if isinstance(cfg, DecoderConfig):
        return (f"{cfg.arch}, vocab_size={cfg.vocab_size}, emb_dim={cfg.emb_dim}, n_layers={cfg.n_layers}, "
                f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}")
    return (f"vocab_size={cfg.vocab_size}, context_length={cfg.context_length}, "
            f"emb_dim={cfg.emb_dim}, n_heads={cfg.n_heads}, n_layers={cfg.n_layers}")

