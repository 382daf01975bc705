"""`gptforge prepare` (a corpus into a token file) and `gptforge evaluate` (loss on a text)."""

from __future__ import annotations

import argparse
import json

from gptforge.cli.common import add_device_arg, positive_int


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize texts into a uint16 token file for --data")
    p.add_argument("text", nargs="+", help="files, directories or globs")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("evaluate", help="cross-entropy and perplexity of a model on a text")
    p.add_argument("--model", required=True)
    p.add_argument("--text", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--context-length", type=int, default=None,
                   help="window length (default: the model's context length)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    add_device_arg(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_prepare(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from gptforge.data import expand_paths, prepare_token_file

    total = sum(f.stat().st_size for f in expand_paths(args.text))
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
        summary = prepare_token_file(args.text, args.out, args.threads, on_progress=bar.update)
    print(f"wrote {summary['tokens']} tokens from {len(summary['files'])} file(s) to {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gptforge.evaluate import evaluate_text
    from gptforge.loader import load

    model = load(args.model, device=args.device)
    result = evaluate_text(model, args.text, args.context_length, args.batch_size, progress=True)
    print(json.dumps(result, indent=2))
    return 0
