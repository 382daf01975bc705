"""`gptforge eval` (benchmarks: a report card in eval.json / eval.md) and `gptforge report` (runs side by side)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gptforge.cli.common import add_device_arg, check_output_dir, positive_int, say

_DTYPES = ("float32", "bfloat16", "float16")


def _shots(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, not {text!r}")
    return value


def add_commands(sub) -> None:
    from gptforge.evaluation.tasks import TASK_NAMES

    p = sub.add_parser("eval", help="benchmark a model (HellaSwag, ARC, PIQA, Winogrande, LAMBADA, MMLU, "
                                    "or a .jsonl of your own); writes eval.json and eval.md")
    p.add_argument("--model", required=True, help="a run, checkpoint, preset or Hugging Face model")
    p.add_argument("--tasks", required=True,
                   help=f"comma-separated: {', '.join(TASK_NAMES)}, or paths to .jsonl files of "
                        '{"query": str, "choices": [str, ...], "gold": int} lines')
    p.add_argument("--shots", type=_shots, default=0, help="solved examples before each question (default 0)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate only the first N items of each task (of each MMLU subject)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="continuations scored per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws (default 1234, as lm-eval)")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="weights' dtype (default: as `gptforge.load` gives them)")
    p.add_argument("--out", default=None,
                   help="folder for eval.json and eval.md (default: the model's folder when it is one, "
                        "else eval/<model name>)")
    add_device_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="several runs' eval.json side by side, and a bar chart (PNG)")
    p.add_argument("runs", nargs="+", help="run folders (or eval.json files)")
    p.add_argument("--plot", default="eval-report.png", help="the PNG to write (default eval-report.png)")
    p.set_defaults(func=cmd_report)


def default_out(model: str) -> Path:
    """Where eval.json goes without --out: the model's own folder, or eval/<name> for a
    preset or Hub id (slashes become '--', as the Hub's cache names repositories)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    return Path("eval") / re.sub(r"[^\w.-]+", "--", model)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from gptforge.evaluation import evaluate_tasks, write_eval
    from gptforge.evaluation.tasks import check_task
    from gptforge.loader import load, tokenizer_for

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = Path(args.out) if args.out else default_out(args.model)
    check_output_dir(out, "--out")
    for name in tasks:  # an unknown name or a bad file fails before the model is loaded
        check_task(name)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load(args.model, device=args.device, dtype=dtype)
    tokenizer = tokenizer_for(args.model)
    bars: dict[str, tqdm] = {}

    def on_task(name: str, n_requests: int) -> None:
        for bar in bars.values():
            bar.close()
        bars[name] = tqdm(total=n_requests, unit="req", desc=name)

    def on_progress(name: str, n_requests: int, n_tokens: int, rate: float) -> None:
        bars[name].update(n_requests)
        bars[name].set_postfix_str(f"{rate:,.0f} tok/s")

    try:
        run = evaluate_tasks(model, tokenizer, tasks, args.shots, args.limit, batch_size=args.batch_size,
                             seed=args.seed, on_progress=on_progress, on_task=on_task)
    finally:
        for bar in bars.values():
            bar.close()
    settings = {"limit": args.limit, "batch_size": args.batch_size, "seed": args.seed, "device": args.device,
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "tokens": run.tokens, "tokens_per_s": round(run.tokens_per_second, 1)}
    path = write_eval(out, str(args.model), run.results, settings)
    from gptforge.evaluation.report import eval_markdown, read_eval

    say(eval_markdown(read_eval(path)))
    say(f"{run.tokens} tokens in {run.seconds:.1f} s ({run.tokens_per_second:,.0f} tokens/s); wrote {path} "
        f"and {path.with_name('eval.md')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gptforge.evaluation import compare_table, format_table, plot_report

    labels, rows, _ = compare_table(args.runs)
    print(format_table(labels, rows))
    path = plot_report(args.runs, args.plot)
    print(f"chart: {path}")
    return 0
