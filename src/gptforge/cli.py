"""The `gptforge` command line: one subcommand per user task, each a call into the library.

Heavy imports happen inside the command that needs them, so `gptforge --help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Sequence

# Modules that add their own subcommands with `add_commands(subparsers)`.
_COMMAND_MODULES: list[str] = [
    "gptforge.finetune.classify_cli",
    "gptforge.finetune.instruct_cli",
    "gptforge.serve.cli",
]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 50) -> None:
    """Flags shared by every command that generates text."""
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def add_train_args(p: argparse.ArgumentParser, **defaults) -> None:
    """One flag per TrainConfig field (`--batch-size` for batch_size, ...), with task defaults."""
    from gptforge.training import TrainConfig

    base = {**asdict(TrainConfig()), **defaults}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = base[f.name]
        if f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=value)
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            kind = {"lr": float, "min_lr": float, "weight_decay": float, "grad_clip": float,
                    "device": str, "precision": str}.get(f.name, int)
            p.add_argument(flag, type=kind, default=value)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace):
    from gptforge.training import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["betas"] = tuple(values["betas"])
    return TrainConfig(**values)


def load_model_arg(source: str, device: str = "cpu"):
    """Load a model named on the command line: preset, run directory or checkpoint."""
    from gptforge.pretrained import load_pretrained

    return load_pretrained(source, device=device)


def default_run_dir(name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... if taken, so no earlier run is overwritten."""
    base = Path("runs") / name
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def finetune_group(sub) -> argparse._SubParsersAction:
    """The subcommands of `gptforge finetune`, shared by every fine-tuning task module."""
    parser = sub.choices.get("finetune")
    if parser is None:
        parser = sub.add_parser("finetune", help="fine-tune a model for a task (classify, instruct)")
        parser._gptforge_sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    return parser._gptforge_sub


def _say(text: str) -> None:
    """Print a line without breaking an active progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text)


# ------------------------------------------------------------------------------------
# pretrain

# The book's chapter-5 settings are TrainConfig's defaults; gptforge adds gradient clipping,
# which keeps the short Verdict run from the loss spikes it otherwise sometimes shows
# (`--grad-clip 0` turns it off).
PRETRAIN_DEFAULTS = dict(grad_clip=1.0)


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a GPT model (default: the book's Verdict run)")
    p.add_argument("--model", default="gpt2-small",
                   help="preset to train from scratch, or a checkpoint to continue from")
    p.add_argument("--context-length", type=_positive_int, default=256)
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (preset default 0.1)")
    for flag in ("--n-layers", "--emb-dim", "--n-heads"):
        p.add_argument(flag, type=_positive_int, default=None,
                       help="change the preset's shape (a smaller model trains faster)")
    p.add_argument("--text", nargs="+", default=None,
                   help="text files, directories or globs (default: The Verdict)")
    p.add_argument("--data", default=None, help="token file made by `gptforge prepare`")
    p.add_argument("--train-ratio", type=float, default=0.9)
    p.add_argument("--stride", type=int, default=None, help="window stride (default: context length)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--sample-prompt", default="Every effort moves you")
    add_train_args(p, **PRETRAIN_DEFAULTS)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    import time

    import torch

    from gptforge.checkpoint import load_model, read_meta
    from gptforge.pretrain import PretrainData, build_or_load_model, pretrain
    from gptforge.tokenizer import get_tokenizer, text_to_ids

    if args.resume:
        out = Path(args.resume)
        meta = read_meta(out)
        data = PretrainData(**meta.get("data", {}))
        saved = json.loads((out / "train_config.json").read_text())
        cfg = train_config_from_args(args)
        # A pause point (--stop-after) belongs to the earlier invocation, not to the run.
        cfg = type(cfg)(**{**saved, "betas": tuple(saved["betas"]), "stop_after": None,
                           **_explicit_train_flags(cfg, PRETRAIN_DEFAULTS)})
        model = load_model(out)
    else:
        # Absolute paths, so `--resume` finds the data from any working directory.
        data = PretrainData(text=[str(Path(t).absolute()) for t in args.text] if args.text else None,
                            data=str(Path(args.data).absolute()) if args.data else None,
                            train_ratio=args.train_ratio, stride=args.stride)
        cfg = train_config_from_args(args)
        torch.manual_seed(cfg.seed)
        shape = {k: getattr(args, k) for k in ("n_layers", "emb_dim", "n_heads")
                 if getattr(args, k) is not None}
        model = build_or_load_model(args.model, args.context_length, args.dropout, **shape)
        name = Path(args.data).stem if args.data else (Path(args.text[0]).stem if args.text else "verdict")
        out = Path(args.out) if args.out else default_run_dir(f"{Path(args.model).name}-{name}")
        if args.out and (out / "training_state.pt").exists():
            raise SystemExit(f"error: {out} already holds a run; continue it with --resume {out} "
                             f"or choose another --out")
    tokenizer = get_tokenizer()

    def on_eval(r: dict) -> None:
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "n/a"
        _say(f"Ep {r['epoch']} (Step {r['step']:06d}): Train loss {r['train_loss']:.3f}, "
             f"Val loss {val}, {r['tokens_per_s']:.0f} tok/s")

    def on_epoch_end(m, epoch: int) -> None:
        from gptforge.generate import generate

        ids = torch.tensor([text_to_ids(args.sample_prompt, tokenizer)], device=m.emb.tok.weight.device)
        out_ids = generate(m, ids, 50, use_cache=True)
        _say(tokenizer.decode(out_ids[0].tolist()).replace("\n", " "))
        m.train()

    model_meta = {"data": asdict(data)}
    start = time.perf_counter()
    result = pretrain(model, data, cfg, out, resume=bool(args.resume), on_eval=on_eval,
                      on_epoch_end=on_epoch_end, progress=not args.no_progress, meta=model_meta)
    minutes = (time.perf_counter() - start) / 60
    state = "paused" if result.interrupted else "finished"
    _say(f"Training {state} after {result.step} steps, {result.tokens_seen} tokens, "
         f"in {minutes:.2f} minutes. Run directory: {out}")
    return 0


def _explicit_train_flags(parsed, task_defaults: dict) -> dict:
    """TrainConfig values given on the command line that differ from the command's defaults
    (so `--resume DIR --epochs 20` extends a run while keeping its other settings)."""
    from gptforge.training import TrainConfig

    default = {**asdict(TrainConfig()), **task_defaults}
    return {k: v for k, v in asdict(parsed).items() if v != default[k] and k != "betas"}


# ------------------------------------------------------------------------------------
# generate, info, prepare, evaluate, download, convert

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model, streaming the text")
    p.add_argument("--model", required=True, help="preset name, run directory or checkpoint")
    p.add_argument("--prompt", required=True)
    add_sampling_args(p)
    p.add_argument("--no-cache", action="store_true", help="recompute every position (slow)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only linear layers (CPU)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from gptforge.generate import check_sampling, stream_text, use_decode_layout

    check_sampling(args.temperature, args.top_k, args.top_p)
    model = load_model_arg(args.model, args.device)
    if args.quantize:
        from gptforge.quantize import quantize_int8

        model = quantize_int8(model)
    else:
        use_decode_layout(model)
    generator = torch.Generator(device=args.device).manual_seed(args.seed) if args.seed is not None else None
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache,
                             generator=generator):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and memory of a preset or checkpoint")
    p.add_argument("model", help="preset name or model directory")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from gptforge.info import model_info

    for key, value in model_info(args.model).items():
        print(f"{key:<34} {value}")
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize texts into a uint16 token file for --data")
    p.add_argument("text", nargs="+", help="files, directories or globs")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from gptforge.data import expand_paths, prepare_token_file

    total = sum(f.stat().st_size for f in expand_paths(args.text))
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
        summary = prepare_token_file(args.text, args.out, args.threads, on_progress=bar.update)
    print(f"wrote {summary['tokens']} tokens from {len(summary['files'])} file(s) to {args.out}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="cross-entropy and perplexity of a model on a text")
    p.add_argument("--model", required=True)
    p.add_argument("--text", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--context-length", type=int, default=None,
                   help="window length (default: the model's context length)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gptforge.evaluate import evaluate_text

    model = load_model_arg(args.model, args.device)
    result = evaluate_text(model, args.text, args.context_length, args.batch_size, progress=True)
    print(json.dumps(result, indent=2))
    return 0


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="download OpenAI's GPT-2 weights or a data set")
    p.add_argument("name", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl (or 124M...), or a "
                                "data set: the-verdict, sms-spam-collection, instruction-data, ...")
    p.add_argument("--format", choices=["openai", "hf"], default="openai")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    from gptforge.config import canonical_preset
    from gptforge.download import RESOURCES, download, download_gpt2

    if canonical_preset(args.name):
        print(download_gpt2(args.name, fmt=args.format))
    elif args.name in RESOURCES:
        print(download(args.name))
    else:
        raise SystemExit(f"error: unknown download {args.name!r}; choose a GPT-2 size "
                         f"(gpt2-small ... gpt2-xl, 124M ... 1558M) or one of: {', '.join(RESOURCES)}")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a model in gptforge or Hugging Face format")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--to", choices=["gptforge", "hf"], default="gptforge")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from gptforge.pretrained.convert import convert

    print(convert(args.source, args.out, to=args.to))
    return 0


_CORE_COMMANDS: list[Callable] = [_add_pretrain, _add_generate, _add_info, _add_prepare,
                                  _add_evaluate, _add_download, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptforge", description="Build, train, load, fine-tune and run GPT-2-style language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _CORE_COMMANDS:
        add(sub)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print a message, not a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
