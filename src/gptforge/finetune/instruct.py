"""Instruction fine-tuning (the book's chapter 7): data, split, batching, training, responses.

An instruction entry is a dict with "instruction", "output" and an optional "input".
A prompt template (Alpaca by default) turns it into text; training teaches the model
to continue `template.prompt(entry)` with the entry's output and then end-of-text.
Training itself is the shared loop in `gptforge.training`; this module supplies the
data, the collate function and the loss, and afterwards answers the test set.

Padding and sorting. A training batch is padded to its own longest example, as in
the book; its composition is what the shuffled sampler gives, so nothing is sorted
there (sorting would change which examples share a step). Where only the sum over
examples matters, batches are built from examples sorted by length, which cuts the
padding without changing the result: the model's loss on reference responses
(`response_loss`) and greedy generation (`generate_responses`, which batches only
prompts of equal length, since the model has no padding mask).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from gptforge.checkpoint import RunMeta
from gptforge.data import check_language_model, check_vocabulary, read_text_file
from gptforge.errors import BadInputError, NotFoundError
from gptforge.fileio import atomic_write_bytes
from gptforge.finetune.lora import apply_lora, has_lora
from gptforge.finetune.templates import ChatTemplate, PromptTemplate, default_template, get_template
from gptforge.loader import load, read_run, tokenizer_for
from gptforge.tokenizer import EOT_ID, get_tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_DATA = "instruction-data"
RESPONSE_KEY = "model_response"
RESPONSES_NAME = "responses.json"
SPLIT_NAMES = ("train", "val", "test")
REQUIRED_KEYS = ("instruction", "output")


# ------------------------------------------------------------------------------------
# data

def kind_of(value: Any) -> str:
    """The Python type of a JSON value with its article ("a list", "an int"), for messages."""
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def check_entries(entries: Any, source: str = "the data") -> list[dict]:
    """Check that `entries` is a list of instruction entries; return them with "input" filled in.

    Every entry needs a string "instruction" and "output"; "input" may be missing or
    empty. The error names the first bad entry and what it lacks.
    """
    if not isinstance(entries, list):
        raise BadInputError(f"{source}: expected a list of entries (JSON objects), got "
                         f"{type(entries).__name__}")
    checked = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadInputError(f"{source}: entry {i} is {kind_of(entry)}, not an object with "
                             f"'instruction', 'input' and 'output'")
        for key in REQUIRED_KEYS:
            if key not in entry:
                raise BadInputError(f"{source}: entry {i} has no {key!r} key (it has: "
                                 f"{', '.join(map(repr, entry)) or 'none'}); every entry needs "
                                 f"'instruction' and 'output', and may have 'input'")
        for key in ("instruction", "input", "output"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise BadInputError(f"{source}: entry {i} has {kind_of(entry[key])} under "
                                 f"{key!r}; it must be text")
        checked.append({**entry, "input": entry.get("input") or ""})
    return checked


def load_instruction_data(source: str | os.PathLike | None = None) -> list[dict]:
    """Read instruction entries from a JSON list or a JSONL file (one object per line).

    `source` None (or "instruction-data") is the book's 1100-entry instruction-data.json,
    fetched through `gptforge.download`.
    """
    if source is None or str(source) == DEFAULT_DATA:
        from gptforge.download import download

        path = Path(download(DEFAULT_DATA))
    else:
        path = Path(source)
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; give a JSON or JSONL file whose entries have "
                            f"'instruction', 'input' and 'output'")
    if not path.is_file():
        raise NotFoundError(f"no instruction data at {path}: give a JSON or JSONL file whose "
                                f"entries have 'instruction', 'input' and 'output'")
    text = read_text_file(path)
    if path.suffix.lower() == ".jsonl":
        entries = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BadInputError(f"{path}, line {n}: not valid JSON ({err.msg})") from None
    else:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadInputError(f"{path}: not valid JSON ({err}); for one entry per line name the "
                             f"file .jsonl") from None
    if isinstance(entries, list) and not entries:
        raise BadInputError(f"{path} holds no entries; give instruction entries with 'instruction', "
                            f"'input' and 'output'")
    return check_entries(entries, str(path))


@dataclass
class Splits:
    """Training, validation and test entries."""

    train: list[dict]
    val: list[dict]
    test: list[dict]


def split_data(entries: Sequence[dict], train_frac: float = 0.85, test_frac: float = 0.1) -> Splits:
    """The book's split, in file order (no shuffling): 85% train, then 10% test, then the rest.

    For the 1100 entries of instruction-data.json that is 935 / 110 / 55
    (train / test / validation).
    """
    n_train, n_test = int(len(entries) * train_frac), int(len(entries) * test_frac)
    entries = list(entries)
    return Splits(train=entries[:n_train], test=entries[n_train:n_train + n_test],
                  val=entries[n_train + n_test:])


def write_splits(splits: Splits, out_dir: str | os.PathLike) -> None:
    """Write train.json, val.json and test.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES:
        data = json.dumps(getattr(splits, name), indent=1, ensure_ascii=False) + "\n"
        atomic_write_bytes(out / f"{name}.json", data.encode("utf-8"))


def read_splits(run_dir: str | os.PathLike) -> Splits:
    """Read the splits `write_splits` wrote."""
    run = Path(run_dir)
    missing = [n for n in SPLIT_NAMES if not (run / f"{n}.json").is_file()]
    if missing:
        raise NotFoundError(f"{run} has no {', '.join(m + '.json' for m in missing)}; "
                                f"it is not an instruction fine-tuning run")
    parts = []
    for name in SPLIT_NAMES:
        path = run / f"{name}.json"
        try:
            parts.append(check_entries(json.loads(read_text_file(path)), str(path)))
        except json.JSONDecodeError as err:
            raise BadInputError(f"{path} is not valid JSON ({err}); the run's data split is damaged: "
                                f"start a new run") from None
    return Splits(*parts)


# ------------------------------------------------------------------------------------
# tokens and batches

def encode_template_text(text: str, template: PromptTemplate | ChatTemplate, tokenizer) -> list[int]:
    """Token ids of a prompt (or prompt + answer) that `template` wrote.

    A model's chat template writes its special tokens (role headers, the BOS) as text,
    so they are encoded as those tokens. The Alpaca and Phi-3 templates are plain text:
    encoded as ordinary text, after the model's BOS if its tokenizer puts one first.
    """
    if isinstance(template, ChatTemplate):
        return tokenizer.encode(text, allowed_special="all")
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + tokenizer.encode_ordinary(text)


def encode_entry(entry: Mapping[str, str], template: PromptTemplate, tokenizer=None) -> tuple[list[int], int]:
    """Token ids of `template.full(entry)` and how many of them belong to the prompt.

    Text is encoded as ordinary text, so a literal "<|endoftext|>" inside the data
    cannot end an example early; the end-of-text token is added by the collate.
    """
    tokenizer = tokenizer or get_tokenizer()
    ids = encode_template_text(template.full(entry), template, tokenizer)
    prompt = encode_template_text(template.prompt(entry), template, tokenizer)
    # BPE may merge across the prompt/answer boundary; count only the shared prefix.
    n = 0
    for a, b in zip(prompt, ids):
        if a != b:
            break
        n += 1
    return ids, n


class InstructionDataset(Dataset):
    """Instruction entries, tokenized once: item i is (token ids, prompt length)."""

    def __init__(self, entries: Sequence[Mapping[str, str]], template: PromptTemplate | str = "alpaca",
                 tokenizer=None) -> None:
        template = get_template(template) if isinstance(template, str) else template
        tokenizer = tokenizer or get_tokenizer()
        self.entries = list(entries)
        self.items = [encode_entry(e, template, tokenizer) for e in self.entries]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.items[i]


def collate_instructions(
    batch: Sequence[Sequence[int] | tuple[Sequence[int], int]],
    pad_id: int = EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    max_length: int | None = None,
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's custom collate: (inputs, targets), both (B, T) long tensors.

    Each example gets an end-of-text token, and the batch is padded with `pad_id`
    (end-of-text) to its longest example. Inputs are the sequence without its last
    token, targets the sequence shifted left by one. In the targets, the padding
    after the first end-of-text becomes `ignore_index`, so the model learns to stop
    but not to babble padding; with `mask_prompt` the positions that predict prompt
    tokens are ignored too. `max_length` then truncates both to that many positions.
    Items are token id lists, or (ids, prompt length) pairs as InstructionDataset gives.
    """
    items = [(list(x[0]), int(x[1])) if isinstance(x, tuple) else (list(x), 0) for x in batch]
    longest = max(len(ids) for ids, _ in items) + 1  # + the end-of-text
    inputs = torch.full((len(items), longest - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(items), longest - 1), ignore_index, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(items):
        seq = torch.tensor(ids + [pad_id], dtype=torch.long)  # (n + 1,)
        n = len(ids)
        inputs[row, :n] = seq[:-1]
        targets[row, :n] = seq[1:]  # the last kept target is the end-of-text
        if mask_prompt and prompt_len > 1:
            targets[row, :prompt_len - 1] = ignore_index  # these predict prompt tokens 1..p-1
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


def instruction_collate(max_length: int | None = None, mask_prompt: bool = False,
                        pad_id: int = EOT_ID) -> Callable:
    """`collate_instructions` with its settings bound (a picklable partial, for DataLoaders)."""
    return partial(collate_instructions, pad_id=pad_id, max_length=max_length, mask_prompt=mask_prompt)


def length_sorted_batches(lengths: Sequence[int], batch_size: int,
                          same_length: bool = False) -> list[list[int]]:
    """Indices grouped into batches of similar length (shortest first).

    With `same_length`, a batch only holds items of exactly equal length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or (same_length and lengths[last[0]] != lengths[i]):
            batches.append([i])
        else:
            last.append(i)
    return batches


# ------------------------------------------------------------------------------------
# models

def template_of(meta: RunMeta | None, default: str | None = None,
                tokenizer=None) -> PromptTemplate | ChatTemplate:
    """The prompt template a run was trained with (from its metadata), else `default`, else
    the model's own chat template if its tokenizer has one, else alpaca."""
    name = (meta.template if meta is not None else None) or default or default_template(tokenizer)
    return get_template(name, tokenizer)


def end_ids(tokenizer, template: PromptTemplate | ChatTemplate) -> list[int]:
    """The ids at which an answer ends, the first being the one training appends: GPT-2's
    end-of-text, or for a model's chat template its end-of-turn marker and its eos ids."""
    ids: list[int] = []
    if isinstance(template, ChatTemplate) and template.end_marker:
        marker = tokenizer.encode(template.end_marker, allowed_special="all")
        bos = getattr(tokenizer, "bos_id", None)
        marker = [t for t in marker if t != bos] if len(marker) > 1 else marker
        if len(marker) == 1:
            ids.append(marker[0])
    ids += [i for i in sorted(getattr(tokenizer, "eos_ids", None) or ()) if i not in ids]
    return ids or [EOT_ID]


@torch.no_grad()
def response_loss(model: nn.Module, entries: Sequence[Mapping[str, str]],
                  template: PromptTemplate | str = "alpaca", batch_size: int = 8,
                  response_key: str = "output", tokenizer=None) -> dict[str, float]:
    """The model's mean cross-entropy on the responses in `entries` (default: the references).

    Only response tokens and the closing end-of-text count (prompt targets are
    masked), averaged per token over all entries. Batches are built by sorted
    length; that removes padding but does not change the result.
    """
    template = get_template(template) if isinstance(template, str) else template
    tokenizer = tokenizer or get_tokenizer()
    entries = [{**e, "output": e[response_key]} for e in entries]
    items = [encode_entry(e, template, tokenizer) for e in entries]
    ctx = model.cfg.context_length
    end = end_ids(tokenizer, template)[0]  # what training appends to each answer
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for idx in length_sorted_batches([len(ids) for ids, _ in items], batch_size):
        inputs, targets = collate_instructions([items[i] for i in idx], pad_id=end, max_length=ctx,
                                               mask_prompt=True)
        logits = model(inputs.to(device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((targets != IGNORE_INDEX).sum())
    mean = total / max(count, 1)
    return {"mean_loss": mean, "perplexity": float(torch.exp(torch.tensor(mean))), "tokens": count}


def generate_responses(
    model: nn.Module,
    entries: Sequence[Mapping[str, str]],
    template: PromptTemplate | str = "alpaca",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    tokenizer=None,
    on_progress: Callable[[int], None] | None = None,
    **sampling: Any,
) -> list[dict]:
    """Answer every entry; return copies of the entries with "model_response" added.

    Greedy by default (`sampling` takes generate_stream's temperature, top_k, ...).
    An answer ends at the template's end ids (`end_ids`) or its end-of-response
    texts (`template.end_markers`, such as Alpaca's next "### " section), neither of
    which it keeps; a batch stops once all its answers have ended. Prompts are
    answered together in batches of up to `batch_size` (of any lengths: each row has
    its own positions in the KV cache; sorting by length only keeps the padding of
    the first step small).
    `batch_size=1` answers one at a time; greedy answers are the same either way.
    `on_progress(n)` is called with the number of entries just finished.
    """
    from gptforge.generate import TextStream, generate_stream

    tokenizer = tokenizer or get_tokenizer()
    template = get_template(template, tokenizer) if isinstance(template, str) else template
    ctx = model.cfg.context_length
    stops, markers = set(end_ids(tokenizer, template)), template.end_markers
    prompts = [encode_template_text(template.prompt(e), template, tokenizer) for e in entries]
    for i, ids in enumerate(prompts):
        if len(ids) > ctx:
            log.warning("prompt %d has %d tokens; the model sees only the last %d", i, len(ids), ctx)
            prompts[i] = ids[-ctx:]
    answers: list[str] = [""] * len(prompts)
    for idx in length_sorted_batches([len(p) for p in prompts], batch_size):
        texts = [TextStream(tokenizer, markers) for _ in idx]
        pieces: list[list[str]] = [[] for _ in idx]
        running = set(range(len(idx)))  # rows whose answer has not ended
        steps = generate_stream(model, [prompts[i] for i in idx], max_new_tokens, eos_id=stops, **sampling)
        try:
            for next_ids in steps:
                for row, token in enumerate(next_ids.tolist()):
                    if row not in running:
                        continue
                    if token in stops:
                        piece, ended = texts[row].finish(), True
                    else:
                        piece, ended = texts[row].push(token)
                    pieces[row].append(piece)
                    if ended:
                        running.discard(row)
                if not running:
                    break
        finally:
            steps.close()
        for row, i in enumerate(idx):
            if row in running:  # ran out of tokens: what was held back is part of the answer
                pieces[row].append(texts[row].finish())
            answers[i] = "".join(pieces[row]).strip()
        if on_progress:
            on_progress(len(idx))
    return [{**e, RESPONSE_KEY: a} for e, a in zip(entries, answers)]


def answer(model: nn.Module, entry: Mapping[str, str], template: PromptTemplate | str = "alpaca",
           max_new_tokens: int = 256, tokenizer=None, **sampling: Any) -> str:
    """One answer to one instruction entry ({"instruction": ..., "input": ...})."""
    return generate_responses(model, [entry], template, max_new_tokens, 1, tokenizer,
                              **sampling)[0][RESPONSE_KEY]


def chat_prompt(history: Sequence[Mapping[str, str]], message: str,
                template: PromptTemplate | str = "alpaca", tokenizer=None,
                max_tokens: int | None = None) -> str:
    """The prompt for `message` after the conversation `history` (role/content messages).

    Rendered with `render_chat`; the oldest exchanges are dropped until the prompt
    has at most `max_tokens` tokens. Raises ValueError if the message alone is too long.
    """
    from gptforge.finetune.templates import render_chat

    tokenizer = tokenizer or get_tokenizer()
    template = get_template(template, tokenizer) if isinstance(template, str) else template
    history = list(history)
    while True:
        prompt = render_chat(history + [{"role": "user", "content": message}], template)
        n = len(encode_template_text(prompt, template, tokenizer))
        if max_tokens is None or n <= max_tokens:
            return prompt
        if not history:
            raise BadInputError(f"the message makes a prompt of {n} tokens, but there is room for "
                             f"{max_tokens}; shorten it (or lower --max-new-tokens)")
        history = history[2:]  # forget the oldest exchange


def write_responses(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write entries with their responses as a JSON list (the book's format)."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(list(entries), indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------
# training

@dataclass
class InstructOptions:
    """What instruction fine-tuning trains on and how (the optimizer lives in TrainConfig)."""

    data: str | None = None  # JSON / JSONL file; None = the book's instruction-data.json
    template: str | None = None  # None: the model's own chat template if it has one, else alpaca
    mask_prompt: bool = False
    max_length: int | None = 1024  # capped at the model's context length
    lora_rank: int | None = None  # None = full fine-tuning
    lora_alpha: float | None = None  # None = the rank
    max_test: int | None = None  # answer only the first N test entries; 0 = none
    max_new_tokens: int = 256
    gen_batch_size: int = 8


@dataclass
class InstructResult:
    """What a fine-tuning run did, and where its test-set responses are (None if not written)."""

    out_dir: Path
    step: int
    tokens_seen: int
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False
    responses: Path | None = None


def finetune_instruct(
    model: nn.Module,
    base_model: str,
    options: InstructOptions,
    cfg,
    out_dir: str | os.PathLike,
    resume: bool = False,
    callbacks: Mapping[str, Callable] | None = None,
    on_response_progress: Callable[[int], None] | None = None,
    progress: bool = False,
) -> InstructResult:
    """Fine-tune `model` to follow instructions; then answer the test set into responses.json.

    `base_model` names where the model came from (stored in the run; a LoRA run
    needs it to rebuild itself); "init:PRESET" or "init:PATH" is a fresh model of that
    preset's or that model's architecture, whose tokenizer files (if it has its own) are
    copied into the run, since nothing else of that model is kept. With `options.lora_rank` only LoRA adapters are
    trained and saved. `cfg` is a TrainConfig; `callbacks` maps trainer events to
    functions of the trainer. With `resume`, `model` must already hold the run's
    weights (`load_run_for_resume`), and the run's saved splits are used.
    """
    from gptforge.training import Trainer, lm_loss

    check_language_model(model, f"the model ({base_model})")
    out = Path(out_dir)
    tokenizer = tokenizer_for(out if resume else base_model.removeprefix("init:"))
    if tokenizer.n_vocab == EOT_ID + 1:  # GPT-2's BPE
        check_vocabulary(model.cfg)
    options = replace(options, template=options.template or default_template(tokenizer))
    template = get_template(options.template, tokenizer)
    ends = end_ids(tokenizer, template)
    if resume:
        splits = read_splits(out)
    else:
        entries = load_instruction_data(options.data)
        splits = split_data(entries)
        if not splits.train:
            raise BadInputError(f"{options.data or DEFAULT_DATA} has {len(entries)} entr"
                                f"{'y' if len(entries) == 1 else 'ies'}; its training split (the first "
                                f"85%) is empty: give at least 2 entries")
        write_splits(splits, out)
        if base_model.startswith("init:"):
            from gptforge.hf_tokenizer import save_tokenizer_files

            save_tokenizer_files(tokenizer, out)  # GPT-2's BPE needs none
    ctx = model.cfg.context_length
    max_length = min(options.max_length or ctx, ctx)
    if options.lora_rank and not has_lora(model):
        apply_lora(model, rank=options.lora_rank, alpha=options.lora_alpha or float(options.lora_rank))
    settings = {**asdict(options), "max_length": max_length}
    if options.lora_rank:
        settings["lora_alpha"] = options.lora_alpha or float(options.lora_rank)
    if not base_model.startswith("init:") and Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    meta = RunMeta(model=model.cfg, task="instruct", template=options.template, instruct=settings,
                   base_model=base_model)
    # With the model's own chat template only the answers are learned (its prompts hold
    # role headers and special tokens that the model should not be trained to write).
    mask_prompt = options.mask_prompt or isinstance(template, ChatTemplate)
    trainer = Trainer(
        model, InstructionDataset(splits.train, template, tokenizer),
        InstructionDataset(splits.val, template, tokenizer) if splits.val else None,
        lm_loss, cfg, out, meta, collate_fn=instruction_collate(max_length, mask_prompt, ends[0]),
        progress=progress,
    )
    for event, fn in (callbacks or {}).items():
        trainer.add_callback(event, fn)
    if resume:
        trainer.resume(out)
    result = trainer.fit()
    responses = None
    if not result.interrupted and options.max_test != 0:
        test = splits.test if options.max_test is None else splits.test[:options.max_test]
        answered = generate_responses(trainer.model, test, template, options.max_new_tokens,
                                      options.gen_batch_size, tokenizer, on_response_progress)
        responses = write_responses(answered, out / RESPONSES_NAME)
    return InstructResult(out, result.step, result.tokens_seen, result.history, result.interrupted,
                          responses)


def load_run_for_resume(run_dir: str | os.PathLike) -> tuple[nn.Module, str, InstructOptions]:
    """The model (with trainable adapters if it is a LoRA run), base source and options of a run."""
    meta = read_run(run_dir)
    if meta.task != "instruct" or meta.instruct is None:
        raise BadInputError(f"{run_dir} is not an instruction fine-tuning run")
    known = {f for f in InstructOptions.__dataclass_fields__}
    options = InstructOptions(**{k: v for k, v in meta.instruct.items() if k in known})
    model = load(run_dir, for_training=True)
    return model, meta.base_model or str(run_dir), options
