"""Text classification: `gptforge finetune classify` and `gptforge classify`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gptforge.cli.common import (
    add_device_arg,
    add_train_args,
    allocation_guard,
    check_model_memory,
    check_new_run_dir,
    dropout_rate,
    finetune_group,
    positive_float,
    positive_int,
    print_eval,
    refuse_on_resume,
    say,
    seed_int,
    train_config,
)
from gptforge.errors import BadInputError

# The book's chapter-6 settings, where they differ from TrainConfig's defaults.
TRAIN_DEFAULTS = dict(epochs=5, batch_size=8, lr=5e-5, weight_decay=0.1, eval_every=50, eval_batches=5)


def add_commands(sub) -> None:
    _add_finetune_classify(finetune_group(sub))
    _add_classify(sub)


# ------------------------------------------------------------------------------------
# gptforge finetune classify

def _add_finetune_classify(tasks) -> None:
    from gptforge.finetune.classify import POOLINGS, TRAINABLE

    p = tasks.add_parser(
        "classify", help="fine-tune a classifier (default: the book's spam classifier)",
        description="Replace the model's output head with a class head and fine-tune it on "
                    "labelled texts. Without data flags: the SMS Spam Collection, balanced "
                    "and split as in the book.")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help="model to start from: preset (downloads GPT-2; default gpt2-small), "
                            "checkpoint or run directory")
    model.add_argument("--init", default=None, metavar="PRESET",
                       help="start from a fresh, untrained model of this preset instead of --model")
    model.add_argument("--context-length", type=positive_int, default=None,
                       help="context length of an --init model (default 256)")
    for flag in ("--n-layers", "--emb-dim", "--n-heads"):
        model.add_argument(flag, type=positive_int, default=None, help="shape of an --init model")
    model.add_argument("--dropout", type=dropout_rate, default=0.0, help="dropout rate in [0, 1) (book: 0.0)")
    model.add_argument("--trainable", choices=TRAINABLE, default="last-block",
                       help="what trains: the last block + final norm + head (book), all, "
                            "the head only, or LoRA adapters + head")
    model.add_argument("--lora-rank", type=positive_int, default=16)
    model.add_argument("--lora-alpha", type=positive_float, default=16.0, help="LoRA scale, above 0")
    model.add_argument("--pooling", choices=POOLINGS, default="last-token",
                       help="which outputs classify a text: its last real token, the last "
                            "position (the book; padding included), or the mean over its tokens")
    model.add_argument("--max-length", type=positive_int, default=None,
                       help="cut texts to this many tokens (default: the longest training text)")

    data = p.add_argument_group("data (default: SMS Spam Collection)")
    data.add_argument("--data", default=None, metavar="FILE",
                      help="one CSV/TSV file, shuffled and split 70/10/20")
    data.add_argument("--train", default=None, metavar="FILE", help="training CSV/TSV")
    data.add_argument("--val", default=None, metavar="FILE", help="validation CSV/TSV")
    data.add_argument("--test", default=None, metavar="FILE", help="test CSV/TSV")
    data.add_argument("--text-column", default="Text")
    data.add_argument("--label-column", default="Label")
    data.add_argument("--split-seed", type=seed_int, default=123, help="seed of the balancing and split")
    data.add_argument("--book-quoting", action="store_true",
                      help="read the spam file as the book's pandas code does (quotes glue a few "
                           "lines together), to get exactly the book's split")

    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>-classifier)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    add_train_args(p, **TRAIN_DEFAULTS)
    p.set_defaults(func=cmd_finetune_classify)


# Flags that describe a new run: refused with --resume, which keeps the run's own.
NEW_RUN_FLAGS = {"model": "--model", "init": "--init", "context_length": "--context-length",
                 "n_layers": "--n-layers", "emb_dim": "--emb-dim", "n_heads": "--n-heads",
                 "max_length": "--max-length", "data": "--data", "train": "--train", "val": "--val",
                 "test": "--test", "out": "--out"}


def _load_splits(args: argparse.Namespace):
    from gptforge.finetune.classify import TextSplits, read_examples, shuffle_split, sms_spam_splits

    columns = dict(text_column=args.text_column, label_column=args.label_column)
    if args.text_column == args.label_column:
        raise BadInputError(f"--text-column and --label-column both name {args.text_column!r}; the "
                            f"texts and their labels must be in different columns")
    if args.data and args.train:
        raise BadInputError("give either --data (split 70/10/20) or --train/--val/--test, not both")
    if (args.val or args.test) and not args.train:
        raise BadInputError("--val and --test need --train")
    if args.train:
        return TextSplits(read_examples(args.train, **columns),
                          read_examples(args.val, **columns) if args.val else [],
                          read_examples(args.test, **columns) if args.test else []), Path(args.train).stem
    if args.data:
        return shuffle_split(read_examples(args.data, **columns), seed=args.split_seed), Path(args.data).stem
    return sms_spam_splits(seed=args.split_seed, book_quoting=args.book_quoting), "sms-spam"


def _build_model(args: argparse.Namespace):
    from gptforge.config import book_config
    from gptforge.loader import load
    from gptforge.model import GPTModel, set_dropout

    shape = {k: getattr(args, k) for k in ("n_layers", "emb_dim", "n_heads") if getattr(args, k)}
    if args.init:
        if args.model is not None:
            raise BadInputError("give --model (a trained model to start from) or --init (a fresh "
                                "model of a preset), not both")
        cfg = book_config(args.init, args.context_length or 256, drop_rate=args.dropout, **shape)
        check_model_memory(cfg, args.device)
        with allocation_guard(cfg):
            return GPTModel(cfg)
    if shape or args.context_length is not None:
        raise BadInputError("--n-layers/--emb-dim/--n-heads/--context-length shape a fresh model; use "
                            "them with --init")
    model = load(args.model or "gpt2-small", for_training=True)
    set_dropout(model, args.dropout)
    return model


def cmd_finetune_classify(args: argparse.Namespace) -> int:
    import torch

    from gptforge.checkpoint import default_run_dir
    from gptforge.finetune.classify import (
        TextSplits,
        format_report,
        load_for_training,
        prepare_classifier,
        read_classifier_meta,
        train_classifier,
    )
    from gptforge.finetune.lora import count_trainable

    if args.resume:
        refuse_on_resume(args, NEW_RUN_FLAGS)
        out = Path(args.resume)
        meta = read_classifier_meta(out)
        cfg = train_config(args, out)
        model = load_for_training(out)
        splits = TextSplits.load(out)
        settings = meta.classifier
        labels, pooling, max_length = settings.labels, settings.pooling, settings.max_length
        base, data_name = meta.base_model, meta.data
    else:
        cfg = train_config(args)
        splits, data_name = _load_splits(args)
        try:
            labels = splits.label_names()
        except BadInputError as err:
            raise BadInputError(f"{args.train or args.data or 'the SMS Spam Collection'}: {err}") from None
        out = Path(args.out) if args.out else default_run_dir(
            f"{Path(args.init or args.model or 'gpt2-small').name}-{data_name}-classifier")
        check_new_run_dir(out)
        torch.manual_seed(cfg.seed)
        model = prepare_classifier(_build_model(args), len(labels), args.trainable,
                                   args.lora_rank, args.lora_alpha)
        pooling, max_length = args.pooling, args.max_length
        base = f"init:{args.init}" if args.init else _absolute(args.model or "gpt2-small")
    trainable, total = count_trainable(model)
    say(f"Classes: {', '.join(labels)}. Examples: {len(splits.train)} train, {len(splits.val)} "
        f"validation, {len(splits.test)} test. Trainable parameters: {trainable:,} of {total:,}.")

    def on_epoch_end(trainer) -> None:
        n = trainer.cfg.eval_batches
        train = trainer.evaluate(trainer.train_eval_loader, n).get("accuracy")
        val = trainer.evaluate(trainer.val_loader, n).get("accuracy")
        shown = f"{val * 100:.2f}%" if val is not None else "n/a"
        say(f"Training accuracy: {train * 100:.2f}% | Validation accuracy: {shown}")

    start = time.perf_counter()
    run = train_classifier(model, splits, cfg, out, labels=labels, pooling=pooling,
                           max_length=max_length, resume=bool(args.resume),
                           callbacks={"on_eval": print_eval, "on_epoch_end": on_epoch_end},
                           progress=not args.no_progress, base_model=base, data_name=data_name)
    minutes = (time.perf_counter() - start) / 60
    if run.metrics is None:
        say(f"Training paused after {run.result.step} steps ({minutes:.2f} minutes); continue "
            f"with --resume {out}")
        return 0
    say(f"Training completed in {minutes:.2f} minutes.")
    for split, name in (("train", "Training"), ("val", "Validation"), ("test", "Test")):
        if f"{split}_accuracy" in run.metrics:
            say(f"{name} accuracy: {run.metrics[f'{split}_accuracy'] * 100:.2f}%")
    if "test" in run.metrics:
        say(format_report(run.metrics["test"]))
    say(f"Classifier saved to {out}; try: gptforge classify --model {out} \"some text\"")
    return 0


def _absolute(source: str) -> str:
    """A path made absolute (so the run finds it from anywhere); a preset name as it is."""
    return str(Path(source).resolve()) if Path(source).exists() else source


# ------------------------------------------------------------------------------------
# gptforge classify

def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--model", required=True, help="run directory of `gptforge finetune classify`")
    p.add_argument("--file", default=None, help="CSV/TSV file of texts to classify")
    p.add_argument("--text-column", default="Text", help="column of --file that holds the texts")
    p.add_argument("--out", default=None,
                   help="CSV to write --file's rows to, with predicted_label and probability added")
    p.add_argument("--batch-size", type=positive_int, default=8)
    add_device_arg(p)
    p.set_defaults(func=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> int:
    import csv

    from tqdm.auto import tqdm

    from gptforge.data import check_output_file
    from gptforge.fileio import atomic_write
    from gptforge.finetune.classify import TextClassifier, read_table, require_columns

    if not args.texts and not args.file:
        raise BadInputError("nothing to classify: give texts as arguments or a file with --file")
    if args.out and not args.file:
        raise BadInputError("--out writes the rows of --file; give --file too")
    if args.out:
        check_output_file(args.out, "--out")
        if args.file and Path(args.out).resolve() == Path(args.file).resolve():
            raise BadInputError(f"--out {args.out} is the --file being read; write to another file")
    for n, text in enumerate(args.texts, 1):
        if not text.strip():
            raise BadInputError(f"text {n} is empty; there is nothing to classify")
    rows, columns = [], []
    if args.file:
        columns, rows = read_table(args.file)
        require_columns(args.file, columns, [args.text_column], "choose it with --text-column")
        for n, row in enumerate(rows, 1):
            if not (row.get(args.text_column) or "").strip():
                raise BadInputError(f"{args.file}: row {n} has an empty text in column "
                                 f"{args.text_column!r}; fill it in or remove the row")
    classifier = TextClassifier.load(args.model, args.device)

    for (label, prob), text in zip(classifier.predict(args.texts, args.batch_size), args.texts):
        print(f"{label}\t{prob:.4f}\t{text}")
    if not args.file:
        return 0
    texts = [row[args.text_column] for row in rows]
    with tqdm(total=len(texts), unit="text", desc="classifying", dynamic_ncols=True) as bar:
        predictions = classifier.predict(texts, args.batch_size, on_batch=bar.update)
    if not args.out:
        for (label, prob), text in zip(predictions, texts):
            print(f"{label}\t{prob:.4f}\t{text}")
        return 0
    out = Path(args.out)
    fields = columns + [c for c in ("predicted_label", "probability") if c not in columns]
    with atomic_write(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row, (label, prob) in zip(rows, predictions):
            kept = {k: v for k, v in row.items() if k is not None}  # None: cells past the header
            writer.writerow({**kept, "predicted_label": label, "probability": f"{prob:.6f}"})
    say(f"wrote {len(rows)} predictions to {out}")
    return 0
