"""`gptforge prepare` (a corpus into a token file) and `gptforge evaluate` (loss and bits per byte on a text)."""

from __future__ import annotations

import argparse
import json

from gptforge.cli.common import add_device_arg, positive_int


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize texts into a uint16 token file for --data")
    p.add_argument("text", nargs="+", help="files, directories or globs")
    p.add_argument("--out", required=True, help="the token file to write (its summary goes to OUT.json)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="tokenizer threads (default: every core)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("evaluate", help="cross-entropy, perplexity and bits per byte of a model on a text")
    p.add_argument("--model", required=True)
    p.add_argument("--text", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--context-length", type=positive_int, default=None,
                   help="window length, at most the model's context length (default: that)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    add_device_arg(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_prepare(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from gptforge.data import check_output_file, expand_paths, prepare_token_file

    check_output_file(args.out, "--out")
    total = sum(f.stat().st_size for f in expand_paths(args.text))
    bar = None

    def progress(n_bytes: int) -> None:
        nonlocal bar  # opened at the first progress, so that an error in the inputs prints alone
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing")
        bar.update(n_bytes)

    try:
        summary = prepare_token_file(args.text, args.out, args.threads, on_progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {summary['tokens']} tokens from {len(summary['files'])} file(s) to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gptforge.evaluate import evaluate_text
    from gptforge.loader import load, tokenizer_for

    model = load(args.model, device=args.device)
    result = evaluate_text(model, args.text, args.context_length, args.batch_size, progress=True,
                           tokenizer=tokenizer_for(args.model))
    print(json.dumps(result, indent=2))
    return 0
