"""Text classification: a GPT whose language-model head is swapped for a small class head.

The book's chapter 6 in library form. The model reads a text left to right and its
new head turns the hidden state into one score per class; by default the scores of
the last real token are used, the only position that has seen the whole text
(padding sits on the right, and causal attention keeps real tokens from looking at
it). Training runs through the shared `Trainer`: a classifier differs from
pretraining only by its data, its head and its loss.

Data are (text, label name) pairs. Label names are sorted and numbered 0..n-1, so
the SMS Spam Collection gets ham = 0 and spam = 1, as in the book.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gptforge.checkpoint import ClassifierSettings, RunMeta, is_gptforge_dir
from gptforge.data import check_vocabulary, read_text_file
from gptforge.errors import BadInputError, NotFoundError
from gptforge.fileio import atomic_write, atomic_write_json
from gptforge.finetune.lora import LoRALinear, apply_lora
from gptforge.loader import load, read_run, tokenizer_for
from gptforge.model import GPTModel
from gptforge.tokenizer import EOT_ID, get_tokenizer
from gptforge.training import Callback, TrainConfig, Trainer, TrainResult

TASK = "classifier"
POOLINGS = ("last-token", "last", "mean")
TRAINABLE = ("last-block", "all", "head", "lora")
SPLIT_FILES = {"train": "train.csv", "val": "validation.csv", "test": "test.csv"}
METRICS_NAME = "test_metrics.json"

Example = tuple[str, str]  # (text, label name)


# ------------------------------------------------------------------------------------
# Data: CSV/TSV files, the SMS Spam Collection, the book's balancing and split

def read_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The column names and rows of a CSV or TSV file that starts with a header line.

    Tabs separate the columns of a .tsv/.tab file, or of any file whose header line
    holds a tab but no comma; commas otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"no table at {path}: give a CSV or TSV file with a header line")
    text = read_text_file(path).removeprefix("\ufeff")  # a byte-order mark is not part of the header
    header = text.split("\n", 1)[0]
    tabbed = path.suffix.lower() in (".tsv", ".tab") or ("\t" in header and "," not in header)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tabbed else ",")
    try:
        rows = list(reader)
    except csv.Error as err:
        raise BadInputError(f"{path}, line {reader.line_num}: not a valid CSV/TSV row ({err})") from None
    columns = list(reader.fieldnames or [])
    return columns, rows


def require_columns(path: str | os.PathLike, columns: Sequence[str], wanted: Sequence[str],
                    hint: str = "name the right ones with --text-column and --label-column") -> None:
    """Raise a ValueError naming the first of `wanted` that is not among `columns`."""
    if not columns:
        raise BadInputError(f"{path} is empty: a CSV/TSV file needs a header line naming its columns "
                            f"(such as {', '.join(map(repr, wanted))})")
    for name in wanted:
        if name not in columns:
            found = ", ".join(repr(c) for c in columns) or "none"
            raise BadInputError(f"{path} has no column {name!r} (columns found: {found}); {hint}")


def read_examples(path: str | os.PathLike, text_column: str = "Text",
                  label_column: str = "Label") -> list[Example]:
    """(text, label) pairs from a CSV/TSV file with a header line naming both columns."""
    columns, rows = read_table(path)
    require_columns(path, columns, [text_column, label_column])
    if not rows:
        raise BadInputError(f"{path} has a header but no rows")
    examples = []
    for n, row in enumerate(rows, start=1):
        text, label = row.get(text_column) or "", (row.get(label_column) or "").strip()
        if not text.strip():
            raise BadInputError(f"{path}: row {n} has an empty text in column {text_column!r}; "
                             f"fill it in or remove the row")
        if not label:
            raise BadInputError(f"{path}: row {n} has an empty label in column {label_column!r}")
        examples.append((text, label))
    return examples


def write_examples(path: str | os.PathLike, examples: Sequence[Example]) -> None:
    """Write (text, label) pairs as a CSV with the book's columns, Label and Text."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Label", "Text"])
        writer.writerows((label, text) for text, label in examples)


def label_names(labels: Iterable[str]) -> list[str]:
    """The distinct labels in a fixed order: numerically if all are integers, else sorted."""
    names = set(labels)
    try:
        return sorted(names, key=int)  # "2" before "10"
    except ValueError:
        return sorted(names)


@dataclass
class TextSplits:
    """Labelled texts for training, validation and testing: lists of (text, label name)."""

    train: list[Example]
    val: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def label_names(self) -> list[str]:
        """The classes, from the training split; at least two, or a ValueError."""
        names = label_names(label for _, label in self.train)
        if len(names) < 2:
            only = repr(names[0]) if names else "none"
            raise BadInputError(f"the training data has only one class ({only}); a classifier needs "
                             f"examples of at least two labels")
        return names

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write train.csv, validation.csv and test.csv (columns Label, Text) to `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for split, name in SPLIT_FILES.items():
            write_examples(out / name, getattr(self, split))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TextSplits":
        """Read the files `save` wrote (an empty or missing split is an empty list)."""
        parts = {}
        for split, name in SPLIT_FILES.items():
            path = Path(directory) / name
            columns, rows = read_table(path) if path.is_file() else ([], [])
            if rows:
                require_columns(path, columns, ["Text", "Label"])
            parts[split] = [(r["Text"], r["Label"]) for r in rows]
        return cls(**parts)


def pandas_sample(n: int, size: int, seed: int) -> np.ndarray:
    """The positions pandas' `DataFrame.sample(size, random_state=seed)` picks from n rows,
    in the order it returns them: it draws `RandomState(seed).choice(n, size, replace=False)`."""
    return np.random.RandomState(seed).choice(n, size=size, replace=False)


def shuffle_split(examples: Sequence[Example], train_frac: float = 0.7, val_frac: float = 0.1,
                  seed: int = 123) -> TextSplits:
    """The book's `random_split`: shuffle (as pandas' `sample(frac=1, random_state=seed)`),
    then the first `train_frac` for training, the next `val_frac` for validation, the
    rest for testing (sizes rounded down, so the test split gets the remainder)."""
    if not 0 < train_frac <= 1 or not 0 <= val_frac or train_frac + val_frac > 1:
        raise BadInputError(f"fractions must satisfy 0 < train ({train_frac}) and train + val "
                         f"({train_frac + val_frac}) <= 1")
    shuffled = [examples[i] for i in pandas_sample(len(examples), len(examples), seed)]
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * val_frac)
    return TextSplits(shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:])


def read_sms_spam(path: str | os.PathLike | None = None, book_quoting: bool = False) -> list[Example]:
    """The UCI SMS Spam Collection as (text, "ham" | "spam") pairs, in file order.

    `path` defaults to the verified download. Each line is one message,
    `label<TAB>text`, 5574 in all (747 spam). `book_quoting=True` instead reads it
    as the book's `pd.read_csv(sep="\\t")` does, treating `"` as a quote character:
    that glues a few lines together into 5572 rows (4825 ham), and reproduces the
    book's balanced sample and split exactly.
    """
    if path is None:
        from gptforge.download import extract_member

        path = extract_member("sms-spam-collection")
    with open(path, encoding="utf-8", newline="") as f:
        if book_quoting:
            rows = [row for row in csv.reader(f, delimiter="\t") if row]
        else:
            rows = [line.rstrip("\r\n").split("\t", 1) for line in f if line.strip()]
    bad = next((n for n, row in enumerate(rows, 1) if len(row) != 2), None)
    if bad is not None:
        raise BadInputError(f"{path}: line {bad} is not 'label<TAB>text'")
    return [(text, label) for label, text in rows]


def balance_classes(examples: Sequence[Example], majority: str = "ham", seed: int = 123) -> list[Example]:
    """The book's `create_balanced_dataset`: as many randomly chosen `majority` examples
    as there are of the other classes (pandas' `sample(n, random_state=seed)`), followed
    by all the others in their original order."""
    many = [e for e in examples if e[1] == majority]
    rest = [e for e in examples if e[1] != majority]
    if len(rest) > len(many):
        raise BadInputError(f"{majority!r} has {len(many)} examples, fewer than the {len(rest)} others")
    return [many[i] for i in pandas_sample(len(many), len(rest), seed)] + rest


def sms_spam_splits(path: str | os.PathLike | None = None, seed: int = 123,
                    book_quoting: bool = False) -> TextSplits:
    """The book's spam data: 747 ham + 747 spam, shuffled, split 70/10/20 (1045/149/300)."""
    return shuffle_split(balance_classes(read_sms_spam(path, book_quoting), "ham", seed), 0.7, 0.1, seed)


# ------------------------------------------------------------------------------------
# Dataset and batches

class ClassificationDataset(Dataset):
    """Token ids of labelled texts, cut to `max_length` tokens; items are (ids, label index).

    `max_length=None` takes the longest text's length, capped at `context_length`.
    Texts stay unpadded here; `pad_batch` pads them when batching.
    """

    def __init__(self, examples: Sequence[Example], labels: Sequence[str], max_length: int | None = None,
                 context_length: int | None = None, tokenizer=None, what: str = "the data") -> None:
        index = {name: i for i, name in enumerate(labels)}
        unknown = label_names({label for _, label in examples} - set(index))
        if unknown:
            raise BadInputError(f"{what} has label(s) {', '.join(map(repr, unknown))} that the training "
                             f"data does not have (labels: {', '.join(map(repr, labels))})")
        tokenizer = tokenizer or get_tokenizer()
        # "Ordinary" encoding: a literal "<|endoftext|>" in a message is just text.
        encoded = tokenizer.encode_ordinary_batch([text for text, _ in examples])
        empty = next((n for n, ids in enumerate(encoded, 1) if not ids), None)
        if empty is not None:
            raise BadInputError(f"{what}: example {empty} has an empty text")
        if max_length is None:
            max_length = max(map(len, encoded), default=1)
            if context_length:
                max_length = min(max_length, context_length)
        elif max_length < 1 or (context_length and max_length > context_length):
            raise BadInputError(f"max_length must be between 1 and the model's context length "
                             f"({context_length}), not {max_length}")
        self.max_length = max_length
        self.ids = [torch.tensor(ids[:max_length], dtype=torch.long) for ids in encoded]
        self.labels = torch.tensor([index[label] for _, label in examples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[i], self.labels[i]


def pad_batch(items: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int = EOT_ID,
              pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token ids with `pad_id` to `pad_to` (or the batch's longest text).

    Returns ids (B, T), real lengths (B,) and labels (B,).
    """
    lengths = torch.tensor([len(ids) for ids, _ in items], dtype=torch.long)
    width = pad_to or int(lengths.max())
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    for row, (seq, _) in enumerate(items):
        ids[row, :len(seq)] = seq
    labels = torch.stack([torch.as_tensor(label) for _, label in items])
    return ids, lengths, labels


def make_collate(pooling: str, max_length: int) -> Callable:
    """The collate for `pooling`: "last" reads the last position, so like the book it pads
    every text to `max_length`; the other poolings read only real tokens, so each batch is
    padded just to its longest text (same result, less work)."""
    check_pooling(pooling)
    return partial(pad_batch, pad_to=max_length if pooling == "last" else None)


# ------------------------------------------------------------------------------------
# Model: new head, what trains, pooling, loss

def check_pooling(pooling: str) -> None:
    """Raise a ValueError unless `pooling` is one of POOLINGS."""
    if pooling not in POOLINGS:
        raise BadInputError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")


def replace_head(model: GPTModel, num_classes: int) -> GPTModel:
    """Swap the language-model head for a fresh nn.Linear(emb_dim, num_classes), as the book.

    Changes the model in place (an output head tied to the token embedding comes
    untied) and returns it.
    """
    if num_classes < 2:
        raise BadInputError(f"a classifier needs at least two classes, not {num_classes}")
    weight = model.out_head.weight
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, device=weight.device, dtype=weight.dtype)
    return model


def set_trainable(model: GPTModel, mode: str = "last-block", lora_rank: int = 16,
                  lora_alpha: float = 16.0) -> GPTModel:
    """Choose which parameters train; everything else is frozen.

    "last-block" (the book's choice): the last transformer block, the final norm and
    the head. "head": only the head. "all": everything. "lora": low-rank adapters on
    every linear layer plus the whole head (see `gptforge.finetune.lora`).
    """
    if mode not in TRAINABLE:
        raise BadInputError(f"trainable must be one of {', '.join(TRAINABLE)}, not {mode!r}")
    if mode == "lora":
        return apply_lora(model, lora_rank, lora_alpha, train_also=[model.out_head])
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    parts = {"all": [], "head": [model.out_head],
             "last-block": [model.blocks[-1], model.final_norm, model.out_head]}[mode]
    for module in parts:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def prepare_classifier(model: GPTModel, num_classes: int, trainable: str = "last-block",
                       lora_rank: int = 16, lora_alpha: float = 16.0) -> GPTModel:
    """`replace_head`, then `set_trainable`: a language model ready to fine-tune as a classifier."""
    return set_trainable(replace_head(model, num_classes), trainable, lora_rank, lora_alpha)


def pool_logits(logits: torch.Tensor, lengths: torch.Tensor, pooling: str = "last-token") -> torch.Tensor:
    """Class scores (B, C) for each text from the per-position scores (B, T, C).

    "last-token": the last real token (position length - 1); "last": the last
    position, padding or not (the book); "mean": the average over real tokens.
    """
    check_pooling(pooling)
    B, T, _ = logits.shape
    if pooling == "last-token":
        return logits[torch.arange(B, device=logits.device), lengths - 1]
    if pooling == "last":
        return logits[:, -1]
    real = torch.arange(T, device=logits.device)[None, :] < lengths[:, None]  # (B, T)
    total = (logits * real[..., None].to(logits.dtype)).sum(dim=1)  # (B, C)
    return total / lengths[:, None].to(logits.dtype)


def class_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor,
                 pooling: str = "last-token") -> torch.Tensor:
    """Run the model on padded ids (B, T) and pool its per-position outputs into (B, C)."""
    return pool_logits(model(ids), lengths, pooling)


class ClassificationLoss:
    """The Trainer's loss: cross-entropy of the pooled class scores."""

    def __init__(self, pooling: str = "last-token") -> None:
        check_pooling(pooling)
        self.pooling = pooling

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, lengths, labels = batch
        return F.cross_entropy(class_logits(model, ids, lengths, self.pooling).float(), labels)


class Accuracy:
    """The Trainer's accuracy metric: (correct predictions, texts) in a batch."""

    def __init__(self, pooling: str = "last-token") -> None:
        check_pooling(pooling)
        self.pooling = pooling

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[float, int]:
        ids, lengths, labels = batch
        predicted = class_logits(model, ids, lengths, self.pooling).argmax(dim=-1)
        return float((predicted == labels).sum()), len(labels)


def trainable_mode(model: GPTModel) -> str:
    """Which `set_trainable` mode the model is in, saved with a classifier so that training
    can continue with the same parameters trainable."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        return "lora"
    if all(p.requires_grad for p in model.parameters()):
        return "all"
    head = {id(p) for p in model.out_head.parameters()}
    others = [p for p in model.parameters() if id(p) not in head]
    return "head" if not any(p.requires_grad for p in others) else "last-block"


# ------------------------------------------------------------------------------------
# Runs on disk

def read_classifier_meta(path: str | os.PathLike) -> RunMeta:
    """The RunMeta of a classifier directory; BadInputError for anything else."""
    if not is_gptforge_dir(path):
        raise BadInputError(f"{path} is not a classifier directory (no gptforge.json); give the run "
                            f"directory that `gptforge finetune classify` wrote")
    meta = read_run(path)
    if meta.task != TASK or meta.classifier is None:
        raise BadInputError(f"{path} holds a model for task {meta.task!r}, not a classifier; "
                            f"train one with `gptforge finetune classify`")
    return meta


def load_for_training(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """Load a classifier run's model with the same parameters trainable as when it was saved
    (a LoRA run's adapters and head trainable, its base frozen), to continue training it."""
    meta = read_classifier_meta(run_dir)
    model = load(run_dir, device=device, for_training=True)
    mode = meta.classifier.trainable
    return model if mode == "lora" else set_trainable(model, mode)


# ------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: ClassificationDataset, pooling: str = "last-token",
                    batch_size: int = 8, on_batch: Callable[[int], None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (N, C) for every text of `dataset`, and its labels (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=make_collate(pooling, dataset.max_length))
    probs = []
    for ids, lengths, _ in loader:
        logits = class_logits(model, ids.to(device), lengths.to(device), pooling)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        if on_batch:
            on_batch(len(ids))
    model.train(was_training)
    return torch.cat(probs), dataset.labels


def classification_report(y_true: Sequence[int] | torch.Tensor, y_pred: Sequence[int] | torch.Tensor,
                          labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix.

    The confusion matrix has a row per true class and a column per predicted class.
    With two classes the second (e.g. "spam") is the positive class, and its
    precision, recall and F1 are also given at the top level.
    """
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(n), where=both > 0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                        "f1": float(f1[i]), "support": int(actual[i])}
                 for i, name in enumerate(labels)}
    report: dict[str, Any] = {
        "accuracy": float(tp.sum() / max(len(t), 1)), "n": int(len(t)), "labels": list(labels),
        "per_class": per_class,
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                  "f1": float(f1.mean())},
        "confusion_matrix": confusion.tolist(),
    }
    if n == 2:
        report["positive_class"] = labels[1]
        report.update({k: per_class[labels[1]][k] for k in ("precision", "recall", "f1")})
    return report


def format_report(report: dict[str, Any]) -> str:
    """A classification report as a small text table, then the confusion matrix."""
    labels = report["labels"]
    width = max(9, *(len(name) for name in labels))
    lines = [f"{'':<{width}}  precision  recall     f1  support"]
    for name in labels:
        c = report["per_class"][name]
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:5.4f}"
                     f"  {c['support']:7d}")
    m = report["macro"]
    lines.append(f"{'macro avg':<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:5.4f}"
                 f"  {report['n']:7d}")
    lines.append(f"accuracy: {report['accuracy'] * 100:.2f}%")
    lines.append("confusion matrix (rows: true label, columns: predicted):")
    cell = max(6, *(len(name) for name in labels))
    lines.append(" " * width + "".join(f"  {name:>{cell}}" for name in labels))
    for name, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"  {v:>{cell}d}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------
# Training

@dataclass
class ClassifierRun:
    """What `train_classifier` returns: the Trainer's result and, when the run finished,
    the accuracies on the whole train/validation/test splits and the test report."""

    result: TrainResult
    metrics: dict[str, Any] | None


def train_classifier(
    model: GPTModel,
    splits: TextSplits,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    pooling: str = "last-token",
    max_length: int | None = None,
    resume: bool = False,
    callbacks: Mapping[str, Callback] | None = None,
    progress: bool = False,
    base_model: str | None = None,
    data_name: str | None = None,
    tokenizer=None,
) -> ClassifierRun:
    """Fine-tune a model prepared by `prepare_classifier` on `splits`, in `out_dir`.

    Writes the splits as CSV files, metrics.jsonl, loss.png and accuracy.png, the
    classifier (weights or LoRA adapters + head, config, label names, pooling,
    max_length) and, at the end, the test report to test_metrics.json.
    `resume=True` continues the run saved in `out_dir` (the model must be its
    `load_for_training`). `callbacks` maps trainer events to functions of the
    trainer; `base_model` names the model the classifier starts from. `tokenizer` is
    the model's (default: the base model's own, found by `loader.tokenizer_for`).
    """
    if tokenizer is None:
        tokenizer = tokenizer_for(base_model) if base_model else get_tokenizer()
    if not hasattr(tokenizer, "eos_ids"):  # GPT-2's BPE
        check_vocabulary(model.cfg)
    labels = list(labels) if labels is not None else splits.label_names()
    context = model.cfg.context_length
    train = ClassificationDataset(splits.train, labels, max_length, context, tokenizer, what="the training data")
    length = train.max_length
    val = ClassificationDataset(splits.val, labels, length, context, tokenizer, what="the validation data") \
        if splits.val else None
    test = ClassificationDataset(splits.test, labels, length, context, tokenizer, what="the test data") \
        if splits.test else None
    out = Path(out_dir)
    if not resume:
        splits.save(out)
    settings = ClassifierSettings(labels=labels, pooling=pooling, max_length=length, pad_id=EOT_ID,
                                  trainable=trainable_mode(model))
    meta = RunMeta(model=model.cfg, task=TASK, classifier=settings, base_model=base_model,
                   data=data_name)
    trainer = Trainer(model, train, val, ClassificationLoss(pooling), cfg, out, meta,
                      collate_fn=make_collate(pooling, length), metrics={"accuracy": Accuracy(pooling)},
                      progress=progress)
    for event, fn in (callbacks or {}).items():
        trainer.add_callback(event, fn)
    if resume:
        trainer.resume(out)
    result = trainer.fit()
    if result.interrupted or trainer.rank != 0:
        return ClassifierRun(result, None)

    metrics: dict[str, Any] = {}
    for name, data in (("train", train), ("val", val), ("test", test)):
        if data is None:
            continue
        probs, truth = predict_dataset(model, data, pooling, cfg.batch_size)
        report = classification_report(truth, probs.argmax(dim=-1), labels)
        metrics[f"{name}_accuracy"] = report["accuracy"]
        if name == "test":
            metrics["test"] = report
    metrics["step"] = result.step
    atomic_write_json(out / METRICS_NAME, metrics)
    return ClassifierRun(result, metrics)


# ------------------------------------------------------------------------------------
# Inference

class TextClassifier:
    """A trained classifier with what it needs to read text: label names, pooling, length.

    `TextClassifier.load(run_dir)` rebuilds it from a directory that
    `gptforge finetune classify` wrote.
    """

    def __init__(self, model: GPTModel, labels: Sequence[str], pooling: str = "last-token",
                 max_length: int | None = None, tokenizer=None) -> None:
        check_pooling(pooling)
        if model.out_head.out_features != len(labels):
            raise BadInputError(f"the model has {model.out_head.out_features} outputs but "
                             f"{len(labels)} label names were given")
        self.model, self.labels, self.pooling = model.eval(), list(labels), pooling
        self.max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
        self.tokenizer = tokenizer or get_tokenizer()

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "TextClassifier":
        settings = read_classifier_meta(path).classifier
        return cls(load(path, device=device), settings.labels, settings.pooling, settings.max_length,
                   tokenizer_for(path))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 8,
                      on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Class probabilities (N, C), one row per text; texts longer than max_length are cut."""
        for n, text in enumerate(texts, 1):
            if not text or not text.strip():
                raise BadInputError(f"text {n} is empty; there is nothing to classify")
        if not texts:
            return torch.empty(0, len(self.labels))
        examples = [(text, self.labels[0]) for text in texts]
        data = ClassificationDataset(examples, self.labels, self.max_length, self.model.cfg.context_length,
                                     self.tokenizer)
        return predict_dataset(self.model, data, self.pooling, batch_size, on_batch)[0]

    def predict(self, texts: Sequence[str], batch_size: int = 8,
                on_batch: Callable[[int], None] | None = None) -> list[tuple[str, float]]:
        """(label, probability of that label) for each text."""
        probs = self.predict_proba(texts, batch_size, on_batch)
        best, index = probs.max(dim=-1)
        return [(self.labels[i], float(p)) for p, i in zip(best.tolist(), index.tolist())]
