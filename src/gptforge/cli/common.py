"""What every command group shares: flag types, the sampling and training flags,
settings for a resumed run, run directories, and printing progress lines."""

from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

from gptforge.errors import BadInputError

# ------------------------------------------------------------------------------------
# Flag types: each refuses a bad value with the range it takes, before anything loads.

SEED_MAX = 2**32 - 1  # numpy's RandomState (the classifier's split) takes no more


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _ranged(parse: Callable[[str], Any], ok: Callable[[Any], bool], what: str, name: str):
    """An argparse type: `parse` the text, then refuse a value that is not `ok`, saying `what`."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    check.__name__ = name
    return check


positive_int = _ranged(_whole, lambda v: v >= 1, "a positive integer", "positive_int")
non_negative_int = _ranged(_whole, lambda v: v >= 0, "a whole number of at least 0", "non_negative_int")
seed_int = _ranged(_whole, lambda v: 0 <= v <= SEED_MAX, f"a whole number from 0 to {SEED_MAX}", "seed_int")
positive_float = _ranged(_finite, lambda v: v > 0, "a number above 0", "positive_float")
non_negative_float = _ranged(_finite, lambda v: v >= 0, "a number of at least 0", "non_negative_float")
fraction = _ranged(_finite, lambda v: 0 < v <= 1, "a number in (0, 1]", "fraction")  # a train ratio, top-p


def dropout_rate(text: str) -> float:
    """An argparse type: a dropout probability in [0, 1)."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a dropout rate in [0, 1), got {text}")
    return value


def http_url(text: str) -> str:
    """An argparse type: an http:// or https:// address with a host."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL such as "
                                         f"http://localhost:11434, got {text!r}")
    return text


def _device(text: str, allow_auto: bool) -> str:
    import torch

    choices = ("auto, " if allow_auto else "") + "cpu, cuda, cuda:N or mps"
    if text == "auto" and allow_auto:
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use {choices}") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise argparse.ArgumentTypeError(f"{text!r}: the CPU is one device; use cpu")
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available on this machine (or "
                                             f"this PyTorch was built without CUDA); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} GPU(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if not (mps and mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: Apple's MPS is not available on this machine; "
                                             f"use cpu")
    else:
        raise argparse.ArgumentTypeError(f"{text!r}: gptforge runs on {choices}")
    return text


def device_name(text: str) -> str:
    """An argparse type: cpu, cuda, cuda:N or mps, and present on this machine."""
    return _device(text, allow_auto=False)


def training_device(text: str) -> str:
    """An argparse type: like `device_name`, or "auto" (the best device there is)."""
    return _device(text, allow_auto=True)


def say(text: str) -> None:
    """Print a line without breaking an active progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(text)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda, cuda:N or mps")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 50) -> None:
    """Flags shared by every command that generates text."""
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    # Checked by generate.check_sampling (in sampling_from_args), as for library callers.
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the likeliest tokens that together have probability p, in (0, 1]")
    p.add_argument("--seed", type=seed_int, default=None, help="seed for reproducible sampling")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    """Speculative decoding's flags (generate, chat, serve)."""
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model with the same tokenizer that proposes tokens for --model "
                        "to check in one pass (speculative decoding): the same text, faster when "
                        "the draft often guesses right")
    p.add_argument("--draft-tokens", type=positive_int, default=4,
                   help="tokens the draft proposes per check (default 4)")


def load_draft(args: argparse.Namespace, target, target_tokenizer):
    """The --draft model, loaded like --model and checked against it (None without --draft)."""
    if not args.draft:
        return None
    from gptforge.data import check_language_model
    from gptforge.loader import load, tokenizer_for
    from gptforge.speculative import check_pair, check_tokenizers

    draft = load(args.draft, device=args.device)
    check_language_model(draft, args.draft)
    check_tokenizers(target_tokenizer, tokenizer_for(args.draft))
    check_pair(target, draft)
    return draft


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """generate_stream's sampling keywords from the flags (checked, with a seeded generator)."""
    import torch

    from gptforge.generate import check_sampling

    if not math.isfinite(args.temperature):
        raise BadInputError(f"--temperature must be a finite number >= 0 (0 means greedy), got "
                            f"{args.temperature}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "generator": generator}


# The flag type of each TrainConfig field (TrainConfig checks them again, for library callers).
TRAIN_FLAG_TYPES = {
    **dict.fromkeys(("epochs", "max_steps", "max_tokens", "batch_size", "grad_accum", "eval_every",
                     "eval_batches", "save_every", "stop_after"), positive_int),
    **dict.fromkeys(("warmup_steps", "keep_last", "num_workers"), non_negative_int),
    **dict.fromkeys(("min_lr", "weight_decay", "grad_clip"), non_negative_float),
    "lr": positive_float, "seed": seed_int, "device": training_device,
}


def add_train_args(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """One flag per TrainConfig field (`--batch-size` for batch_size, ...), with the task's
    defaults; the parser remembers them for `train_config`."""
    from gptforge.runtime import PRECISIONS
    from gptforge.training import TrainConfig

    base = {**asdict(TrainConfig()), **defaults}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = base[f.name]
        if f.name == "betas":
            p.add_argument(flag, type=_finite, nargs=2, default=value)
        elif f.name == "precision":
            p.add_argument(flag, choices=PRECISIONS, default=value)
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            fallback = float if isinstance(value, float) else str if isinstance(value, str) else int
            p.add_argument(flag, type=TRAIN_FLAG_TYPES.get(f.name, fallback), default=value)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(_train_defaults=base)


def train_config(args: argparse.Namespace, resume_dir: str | Path | None = None):
    """The TrainConfig of a command: flags over the task's defaults, or, when resuming,
    the flags given now over the run's saved settings over the defaults (so
    `--resume DIR --epochs 20` extends a run and keeps everything else)."""
    from gptforge.errors import CheckpointError
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
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the run's settings are lost: "
                              f"start a new run") from None
    known = {f.name for f in fields(TrainConfig)}
    if not isinstance(saved, dict) or not isinstance(saved.get("betas", ()), (list, tuple)):
        raise CheckpointError(f"{path} does not hold training settings (a JSON object of "
                              f"TrainConfig fields); start a new run")
    saved = {k: v for k, v in saved.items() if k in known}  # settings of a newer gptforge are dropped
    if "betas" in saved:
        saved["betas"] = tuple(saved["betas"])
    defaults = {**args._train_defaults, "betas": tuple(args._train_defaults["betas"])}
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    # A pause point (--stop-after) belongs to the earlier invocation, not to the run.
    try:
        return TrainConfig(**{**saved, "stop_after": None, **changed})
    except BadInputError as err:
        raise BadInputError(f"{path} with the flags given now: {err}") from None


def refuse_on_resume(args: argparse.Namespace, flags: dict[str, str]) -> None:
    """Refuse flags that describe a new run (`flags` maps dest -> flag) when resuming one:
    a resumed run keeps its own model and data, and silently ignoring them would mislead."""
    given = [flag for dest, flag in flags.items() if getattr(args, dest, None) is not None]
    if given:
        raise BadInputError(f"{', '.join(given)} describe{'s' if len(given) == 1 else ''} a new run; "
                            f"--resume {args.resume} continues with the run's own model and data: "
                            f"leave {'it' if len(given) == 1 else 'them'} out, or start a new run "
                            f"with another --out")


def check_new_run_dir(out: Path) -> None:
    """Refuse to start a run in a directory that already holds one."""
    from gptforge.checkpoint import META_NAME
    from gptforge.train_state import STATE_NAME, TRAIN_CONFIG_NAME

    if (out / TRAIN_CONFIG_NAME).exists() or (out / STATE_NAME).exists():
        raise BadInputError(f"{out} already holds a run; continue it with --resume {out} or "
                            f"choose another --out")
    if (out / META_NAME).exists():
        raise BadInputError(f"{out} holds a model already, which the run would overwrite; choose "
                            f"another --out (or start from that model with --model {out})")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} is a file, not a directory; choose another --out")


def check_output_dir(out: str | Path, flag: str = "out", source: str | Path | None = None) -> None:
    """Refuse an output directory that is a file, that lies below a file, or that is the
    model being read (`source`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{flag} {out} is a file, not a directory; give a directory to write to")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInputError(f"{flag} {out} cannot be created: {parent} is a file")
            break
    if source is not None and Path(source).exists() and out.resolve() == Path(source).resolve():
        raise BadInputError(f"{flag} {out} is the model being read; write to another directory")


# ------------------------------------------------------------------------------------
# Memory: refuse a new model too big for the machine before allocating it

TRAIN_BYTES_PER_PARAM = 16  # float32 weights, gradients and AdamW's two moments


def available_memory() -> int | None:
    """Bytes of memory this process can still get (the container's limit included), or None."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:  # cgroup v2: a container may be allowed less than the machine has
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free if free is not None else int(limit), int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


def memory_message(cfg, free: int | None = None, where: str = "this machine") -> str:
    n = cfg.num_parameters()
    shape = (f"n_layers={cfg.n_layers}, emb_dim={cfg.emb_dim}, n_heads={cfg.n_heads}, "
             f"context_length={cfg.context_length}, vocab_size={cfg.vocab_size}")
    has = f", but {where} has {_gib(free)} free" if free is not None else f", more than {where} could give"
    return (f"a model of this shape ({shape}) has {n:,} parameters: it needs {_gib(4 * n)} for its "
            f"float32 weights and about {_gib(TRAIN_BYTES_PER_PARAM * n)} to train with AdamW{has}; "
            f"choose a smaller --n-layers, --emb-dim or --context-length")


def check_model_memory(cfg, device: str = "cpu") -> None:
    """Refuse to build and train a new model of config `cfg` that cannot fit: its weights,
    gradients and optimizer state on `device` (RAM for the CPU; the GPU's free memory
    for CUDA, after the weights are built in RAM)."""
    import torch

    from gptforge.runtime import pick_device

    n = cfg.num_parameters()
    target = pick_device(device)
    free = available_memory()
    host_need = (TRAIN_BYTES_PER_PARAM if target.type == "cpu" else 4) * n
    if free is not None and host_need > free:
        raise BadInputError(memory_message(cfg, free))
    if target.type == "cuda":
        gpu_free, _ = torch.cuda.mem_get_info(target)
        if TRAIN_BYTES_PER_PARAM * n > gpu_free:
            raise BadInputError(memory_message(cfg, gpu_free, f"GPU {target}"))


@contextmanager
def allocation_guard(cfg):
    """Turn the allocator's error while a new model of config `cfg` is built into a
    message that says how much memory the shape needs."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise BadInputError(memory_message(cfg) + f" ({type(err).__name__})") from None
    except RuntimeError as err:
        if "alloc" not in str(err).lower():
            raise
        raise BadInputError(memory_message(cfg)) from None


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
