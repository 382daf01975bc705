"""What every command group shares: flag types, the sampling and training flags,
settings for a resumed run, run directories, and printing progress lines."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from gptforge.errors import BadInputError


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def say(text: str) -> None:
    """Print a line without breaking an active progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 50) -> None:
    """Flags shared by every command that generates text."""
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """generate_stream's sampling keywords from the flags (checked, with a seeded generator)."""
    import torch

    from gptforge.generate import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "generator": generator}


def add_train_args(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """One flag per TrainConfig field (`--batch-size` for batch_size, ...), with the task's
    defaults; the parser remembers them for `train_config`."""
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
    p.set_defaults(_train_defaults=base)


def train_config(args: argparse.Namespace, resume_dir: str | Path | None = None):
    """The TrainConfig of a command: flags over the task's defaults, or, when resuming,
    the flags given now over the run's saved settings over the defaults (so
    `--resume DIR --epochs 20` extends a run and keeps everything else)."""
    from gptforge.train_state import TRAIN_CONFIG_NAME
    from gptforge.training import TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    given["betas"] = tuple(given["betas"])
    if resume_dir is None:
        return TrainConfig(**given)
    path = Path(resume_dir) / TRAIN_CONFIG_NAME
    if not path.is_file():
        raise BadInputError(f"{resume_dir} holds no {TRAIN_CONFIG_NAME}: it is not a training run "
                            f"that can be resumed")
    saved = json.loads(path.read_text())
    saved["betas"] = tuple(saved["betas"])
    defaults = {**args._train_defaults, "betas": tuple(args._train_defaults["betas"])}
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    # A pause point (--stop-after) belongs to the earlier invocation, not to the run.
    return TrainConfig(**{**saved, "stop_after": None, **changed})


def check_new_run_dir(out: Path) -> None:
    """Refuse to start a run in a directory that already holds one."""
    from gptforge.train_state import STATE_NAME

    if (out / STATE_NAME).exists():
        raise BadInputError(f"{out} already holds a run; continue it with --resume {out} or "
                            f"choose another --out")


def print_eval(trainer) -> None:
    """The trainer's on_eval callback of every training command: one line per evaluation."""
    r = trainer.history[-1]
    val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "n/a"
    say(f"Ep {r['epoch']} (Step {r['step']:06d}): Train loss {r['train_loss']:.3f}, "
        f"Val loss {val}, {r['tokens_per_s']:.0f} tok/s")


def print_finish(result, minutes: float, out: Path) -> None:
    state = "paused" if result.interrupted else "finished"
    say(f"Training {state} after {result.step} steps, {result.tokens_seen} tokens, in "
        f"{minutes:.2f} minutes. Run directory: {out}")


def finetune_group(sub) -> argparse._SubParsersAction:
    """The subcommands of `gptforge finetune`, shared by every fine-tuning task module."""
    parser = sub.choices.get("finetune")
    if parser is None:
        parser = sub.add_parser("finetune", help="fine-tune a model for a task (classify, instruct)")
        parser._gptforge_sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    return parser._gptforge_sub
