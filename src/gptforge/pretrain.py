"""Pretraining: next-token prediction on a text corpus, through the shared training loop.

With no arguments this is the book's chapter-5 run: GPT-2 small (context 256, no QKV
bias, untied head, dropout 0.1) trained from scratch on "The Verdict" for 10 epochs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from gptforge.checkpoint import ModelConfig, RunMeta
from gptforge.config import book_config, canonical_preset
from gptforge.data import GPTDataset, TokenFileDataset, check_language_model, check_vocabulary, read_texts
from gptforge.errors import BadInputError
from gptforge.families import DecoderConfig, small_config
from gptforge.loader import load
from gptforge.model import CausalSelfAttention, GPTModel, init_like_book, set_dropout
from gptforge.training import Callback, TrainConfig, Trainer, TrainResult, lm_loss

SAMPLE_PROMPT = "Every effort moves you"


@dataclass
class PretrainData:
    """Where the text comes from and how it is cut into windows."""

    text: list[str] | None = None  # files, directories, globs; None = The Verdict
    data: str | None = None  # a token file from `gptforge prepare`
    train_ratio: float = 0.9
    stride: int | None = None  # None = the context length (windows do not overlap)

    def __post_init__(self) -> None:
        """Refuse settings that would be silently replaced or cannot make windows."""
        if self.text is not None and self.data is not None:
            raise BadInputError("give text files (--text) or a token file (--data), not both")
        if self.text is not None and (isinstance(self.text, (str, bytes)) or not self.text):
            raise BadInputError(f"text must be a non-empty list of files, directories or globs, "
                                f"not {self.text!r}")
        ratio = self.train_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise BadInputError(f"--train-ratio must be a number in (0, 1] (the share of the text "
                                f"to train on; 1 keeps no validation split), not {ratio!r}")
        stride = self.stride
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
            raise BadInputError(f"--stride must be a whole number of at least 1 (tokens between "
                                f"window starts; left out: the context length), not {stride!r}")


def new_model_config(model: str, context_length: int | None = None, drop_rate: float | None = None,
                     arch: str | None = None, **shape: int) -> ModelConfig | None:
    """The config `build_or_load_model` gives a fresh model of preset `model` (the book's
    settings, changed by `shape`), or None when `model` names a checkpoint to load.
    `arch` ("llama3", "qwen3", "gemma3") builds that family instead, GPT-2-small-sized
    with GPT-2's tokenizer unless `shape` says otherwise (families.small_config)."""
    if arch is not None and arch != "gpt2":
        return small_config(arch, context_length=context_length or 256,
                            drop_rate=0.0 if drop_rate is None else drop_rate, **shape)
    if canonical_preset(model) is None or Path(model).exists():
        return None
    overrides = dict(shape) if drop_rate is None else {**shape, "drop_rate": drop_rate}
    return book_config(model, context_length or 256, **overrides)


def fresh_model(cfg: ModelConfig) -> nn.Module:
    """A new, randomly initialised model of `cfg`. GPT-2 gets PyTorch's default init, as the
    book's model: with GPT-2's smaller init the short Verdict run learns markedly slower."""
    if isinstance(cfg, DecoderConfig):
        from gptforge.decoder import DecoderModel

        return DecoderModel(cfg)
    return GPTModel(cfg, init="torch")


def build_or_load_model(model: str, context_length: int | None = None,
                        drop_rate: float | None = None, arch: str | None = None, **shape: int) -> nn.Module:
    """A preset name gives a fresh model with the book's settings (`shape` may change
    n_layers, emb_dim, n_heads); any other source (a run directory, a checkpoint) is
    loaded to continue training from."""
    cfg = new_model_config(model, context_length, drop_rate, arch, **shape)
    if cfg is not None:
        return fresh_model(cfg)
    if shape:
        raise BadInputError("--n-layers/--emb-dim/--n-heads shape a new model; they cannot change "
                            f"the loaded model {model}")
    loaded = load(model, for_training=True)
    if context_length is not None and context_length != loaded.cfg.context_length:
        raise BadInputError(f"--context-length shapes a new model; the loaded model {model} has "
                            f"context length {loaded.cfg.context_length}: leave the flag out")
    if drop_rate is not None:
        set_dropout(loaded, drop_rate)
    return loaded


def initial_model(meta: RunMeta) -> GPTModel:
    """The model a run started from, rebuilt from its metadata (call after seeding torch
    as the run did): a fresh model of its config, or its base checkpoint loaded again."""
    base = meta.base_model or ""
    if base.startswith("init:"):
        return fresh_model(meta.model)
    model = load(base, for_training=True)
    set_dropout(model, meta.model.drop_rate)
    return model


def _percent(share: float) -> str:
    return f"{share * 100:.2f}".rstrip("0").rstrip(".") + "%"


def load_datasets(data: PretrainData, context_length: int) -> tuple[torch.utils.data.Dataset,
                                                                   torch.utils.data.Dataset | None]:
    """Training and validation windows: the first `train_ratio` of the text, then the rest.

    A split too short for one window is an error that says how many tokens it has,
    how many it needs and what to change.
    """
    stride = data.stride or context_length
    train_pct, val_pct = _percent(data.train_ratio), _percent(1 - data.train_ratio)
    train_hint = "give more text or choose a smaller --context-length"
    val_hint = (f"give the validation split a bigger share with a lower --train-ratio (now "
                f"{data.train_ratio}), choose a smaller --context-length (now {context_length}), or give "
                f"more text (--train-ratio 1 trains without validation)")
    if data.data:
        source = f"token file {data.data}"
        train = TokenFileDataset(data.data, context_length, stride, 0.0, data.train_ratio,
                                 what=f"the training split of {source} (its first {train_pct})",
                                 hint=train_hint)
        val = TokenFileDataset(data.data, context_length, context_length, data.train_ratio, 1.0,
                               what=f"the validation split of {source} (its last {val_pct})",
                               hint=val_hint) if data.train_ratio < 1 else None
        return train, val
    if data.text:
        text = read_texts(data.text)
        source = ", ".join(data.text)
        if not text.replace("<|endoftext|>", "").strip():
            raise BadInputError(f"{source}: the files hold no text to train on")
    else:
        from gptforge.download import download

        text = download("the-verdict").read_text(encoding="utf-8")
        source = "The Verdict"
    split = int(data.train_ratio * len(text))
    train = GPTDataset(text[:split], max_length=context_length, stride=stride,
                       what=f"the training split of {source} (its first {train_pct})", hint=train_hint)
    val = GPTDataset(text[split:], max_length=context_length, stride=context_length,
                     what=f"the validation split of {source} (its last {val_pct})", hint=val_hint) \
        if data.train_ratio < 1 else None
    return train, val


def was_book_exact(run_dir: str | os.PathLike) -> bool:
    """Whether the pretraining run in `run_dir` was started with `book_exact=True`."""
    data = RunMeta.read(run_dir).data
    return bool(isinstance(data, dict) and data.get(BOOK_EXACT_KEY))


BOOK_EXACT_KEY = "book_exact"  # in a run's RunMeta.data, beside the PretrainData fields


def _check_book_exact(model: nn.Module, cfg: TrainConfig, base_model: str | None) -> TrainConfig:
    """Refuse what the book's chapter-5 code cannot do; return `cfg` with its precision fixed
    to float32 (the book trains in float32; "auto" could mean bfloat16 on a GPU)."""
    if not isinstance(model, GPTModel):
        raise BadInputError("book_exact reproduces the book's GPT-2 model; this model is a "
                            f"{type(model).__name__} (--arch {getattr(model.cfg, 'arch', '?')}): leave "
                            "out --arch, or --book-exact")
    if base_model is not None and not base_model.startswith("init:"):
        raise BadInputError(f"book_exact trains a fresh model from the book's initialisation, drawing its "
                            f"weights again; {base_model} is a trained model: leave out --book-exact "
                            f"to continue training it")
    if model.cfg.tie_weights:
        raise BadInputError("book_exact needs the book's untied output head (tie_weights=False, as "
                            "book_config gives); this model ties it to the token embedding")
    if cfg.precision == "bf16":
        raise BadInputError("book_exact trains in float32 as the book does; leave out --precision bf16")
    return replace(cfg, precision="fp32")


@contextmanager
def _explicit_attention(model: GPTModel):
    """Run attention as the book's code: the explicit softmax(QK^T / sqrt(d)) with an
    nn.Dropout on the attention weights, whose mask is drawn as the book's, instead of
    the fused kernel's own dropout. The model's config (and so its checkpoints) keeps
    its kernel; both compute the same attention."""
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    kept = [m.impl for m in layers]
    for m in layers:
        m.impl = "math"
    try:
        yield
    finally:
        for m, impl in zip(layers, kept):
            m.impl = impl


def pretrain(
    model: GPTModel,
    data: PretrainData,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    callbacks: Mapping[str, Callback] | None = None,
    progress: bool = False,
    base_model: str | None = None,
    book_exact: bool = False,
) -> TrainResult:
    """Train `model` on `data`, writing checkpoints, metrics and loss.png to `out_dir`.

    `callbacks` maps trainer events ("on_eval", "on_epoch_end") to functions of the
    trainer. `base_model` records where the weights started (a preset for a fresh
    model, or the checkpoint that training continues).

    `book_exact` makes every random draw as the book's chapter-5 code makes it, so its
    run (`book_config`, The Verdict, the default TrainConfig with grad_clip=None) prints
    the book's losses and samples: the model's weights are drawn again as the book's
    GPTModel draws them after `torch.manual_seed(cfg.seed)` (so give a fresh GPT-2
    model; the weights it has are replaced), attention dropout acts on the attention
    weights, and the trainer shuffles and steps as the book's loop (`Trainer`'s
    `book_exact`). It trains in float32, a little slower than the default path. The
    run records the mode: resume it with book_exact=True, and it continues exactly.
    """
    check_vocabulary(model.cfg, "the model")
    check_language_model(model, f"the model ({base_model})" if base_model else "the model")
    if resume and was_book_exact(out_dir) != book_exact:
        how = "without" if book_exact else "with"
        raise BadInputError(f"{out_dir} was started {how} book_exact: resume it {how} it as well "
                            f"(book_exact={not book_exact}), so that it continues the same run")
    if book_exact:
        cfg = _check_book_exact(model, cfg, base_model)
    train, val = load_datasets(data, model.cfg.context_length)
    meta_data = asdict(data)
    if book_exact:
        meta_data[BOOK_EXACT_KEY] = True
        if not resume:
            torch.manual_seed(cfg.seed)  # as the book seeds right before building its model
            init_like_book(model)
    meta = RunMeta(model=model.cfg, task="lm", data=meta_data, base_model=base_model)
    trainer = Trainer(model, train, val, lm_loss, cfg, out_dir, meta, progress=progress,
                      book_exact=book_exact)
    for event, fn in (callbacks or {}).items():
        trainer.add_callback(event, fn)
    if resume:
        trainer.resume(out_dir)
    with _explicit_attention(model) if book_exact else nullcontext():
        return trainer.fit()
