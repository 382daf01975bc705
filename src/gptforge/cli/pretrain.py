"""`gptforge pretrain`: next-token pretraining (default: the book's Verdict run)."""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

from gptforge.cli.common import (
    add_train_args,
    allocation_guard,
    check_model_memory,
    check_new_run_dir,
    dropout_rate,
    fraction,
    positive_int,
    print_eval,
    print_finish,
    refuse_on_resume,
    say,
    train_config,
)
from gptforge.errors import BadInputError

# The book's chapter-5 settings are TrainConfig's defaults; gptforge adds gradient clipping,
# which keeps the short Verdict run from the loss spikes it otherwise sometimes shows
# (`--grad-clip 0` turns it off). --book-exact trains without it, as the book does.
GRAD_CLIP = 1.0
# The parser's default is None ("not given"), so that --book-exact can tell an explicit
# --grad-clip from the default; cmd_pretrain puts the default in.
PRETRAIN_DEFAULTS = dict(grad_clip=None)
BOOK_EXACT_HELP = (
    "draw every random number as the book's chapter-5 code does (weight init order, dropout "
    "on the attention weights, the DataLoader shuffles under torch.manual_seed, AdamW on every "
    "parameter, no gradient clipping unless --grad-clip is given, float32), so the default "
    "Verdict run prints the book's losses and samples, lines in the book's format; somewhat "
    "slower. Needs a fresh GPT-2 model (no --arch, no checkpoint as --model); no --compile or "
    "torchrun. A run started with it resumes with it, exactly")


def add_commands(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a GPT model (default: the book's Verdict run)")
    p.add_argument("--model", default=None,
                   help="preset to train from scratch (default gpt2-small), or a checkpoint to "
                        "continue from")
    p.add_argument("--arch", choices=["gpt2", "llama3", "qwen3", "gemma3"], default=None,
                   help="train a new model of this family (GPT-2-small-sized unless --n-layers, "
                        "--emb-dim, --n-heads say otherwise; GPT-2's tokenizer)")
    p.add_argument("--context-length", type=positive_int, default=None,
                   help="context length of a new model (default 256)")
    p.add_argument("--dropout", type=dropout_rate, default=None,
                   help="dropout rate in [0, 1) (preset default 0.1)")
    for flag in ("--n-layers", "--emb-dim", "--n-heads", "--n-kv-heads"):
        p.add_argument(flag, type=positive_int, default=None,
                       help="change the preset's shape (a smaller model trains faster)")
    p.add_argument("--text", nargs="+", default=None,
                   help="text files, directories or globs (default: The Verdict)")
    p.add_argument("--data", default=None, help="token file made by `gptforge prepare`")
    p.add_argument("--train-ratio", type=fraction, default=None,
                   help="share of the text to train on, in (0, 1]; the rest validates (default 0.9)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="tokens between window starts (default: the context length)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-<data>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--sample-prompt", default="Every effort moves you")
    p.add_argument("--book-exact", action="store_true", help=BOOK_EXACT_HELP)
    add_train_args(p, **PRETRAIN_DEFAULTS)
    p.set_defaults(func=cmd_pretrain)


# Flags that describe a new run: refused with --resume, which keeps the run's own.
NEW_RUN_FLAGS = {"model": "--model", "arch": "--arch", "n_kv_heads": "--n-kv-heads",
                 "context_length": "--context-length", "dropout": "--dropout",
                 "n_layers": "--n-layers", "emb_dim": "--emb-dim", "n_heads": "--n-heads",
                 "text": "--text", "data": "--data", "train_ratio": "--train-ratio",
                 "stride": "--stride", "out": "--out"}


def cmd_pretrain(args: argparse.Namespace) -> int:
    import torch

    from gptforge.checkpoint import default_run_dir
    from gptforge.config import canonical_preset
    from gptforge.loader import load, read_run
    from gptforge.pretrain import (
        BOOK_EXACT_KEY,
        PretrainData,
        build_or_load_model,
        initial_model,
        new_model_config,
        pretrain,
    )
    from gptforge.tokenizer import get_tokenizer, text_to_ids
    from gptforge.train_state import has_checkpoint

    if not args.sample_prompt.strip():
        raise BadInputError("--sample-prompt is empty; give a few words for the samples to continue")
    resume = bool(args.resume)
    if args.resume:
        refuse_on_resume(args, NEW_RUN_FLAGS)
        out = Path(args.resume)
        meta = read_run(out)
        saved = dict(meta.data or {})
        book_exact = bool(saved.pop(BOOK_EXACT_KEY, False))
        if args.book_exact and not book_exact:
            raise BadInputError(f"{out} was started without --book-exact; a run cannot switch to it "
                                f"half-way: resume it without the flag, or start a new run with it")
        if book_exact:
            say(f"{out} is a --book-exact run: it continues with the book's random draws")
        data = PretrainData(**saved)
        cfg = train_config(args, out)
        base = meta.base_model
        if has_checkpoint(out):
            say(f"Resuming from {out / (meta.checkpoint or '')} (step {meta.step})")
            model = load(out, for_training=True)
        else:  # stopped before its first checkpoint: the same start again
            say(f"{out} was stopped before its first checkpoint: starting it over with its settings")
            torch.manual_seed(cfg.seed)
            model, resume = initial_model(meta), False
    else:
        if args.arch not in (None, "gpt2") and args.model:
            raise BadInputError(f"--arch {args.arch} builds a new model; --model {args.model} names another "
                                f"one: give one of the two")
        if args.n_kv_heads is not None and args.arch in (None, "gpt2"):
            raise BadInputError("--n-kv-heads is for --arch llama3, qwen3 or gemma3 (GPT-2 has one "
                                "key/value head per query head)")
        arch = None if args.arch in (None, "gpt2") else args.arch
        source = args.model or arch or "gpt2-small"
        # Absolute paths, so `--resume` finds the data from any working directory.
        data = PretrainData(text=[str(Path(t).absolute()) for t in args.text] if args.text else None,
                            data=str(Path(args.data).absolute()) if args.data else None,
                            train_ratio=0.9 if args.train_ratio is None else args.train_ratio,
                            stride=args.stride)
        book_exact = args.book_exact
        if book_exact and (arch is not None or (args.model and canonical_preset(args.model) is None)):
            raise BadInputError("--book-exact trains the book's fresh GPT-2 model; leave out --arch and "
                                "give --model only as a preset (gpt2-small, ...), or leave out --book-exact")
        if args.grad_clip is None:
            args.grad_clip = 0.0 if book_exact else GRAD_CLIP
        cfg = train_config(args)
        name = Path(args.data).stem if args.data else (Path(args.text[0]).stem if args.text else "verdict")
        out = Path(args.out) if args.out else default_run_dir(f"{Path(source).name}-{name}")
        check_new_run_dir(out)
        torch.manual_seed(cfg.seed)
        shape = {k: getattr(args, k) for k in ("n_layers", "emb_dim", "n_heads", "n_kv_heads")
                 if getattr(args, k) is not None}
        new_cfg = new_model_config(source, args.context_length, args.dropout, arch, **shape)
        if new_cfg is not None:
            check_model_memory(new_cfg, cfg.device)
        with allocation_guard(new_cfg) if new_cfg is not None else nullcontext():
            model = build_or_load_model(source, args.context_length, args.dropout, arch, **shape)
        fresh = new_cfg is not None
        base = f"init:{arch or canonical_preset(source)}" if fresh else str(Path(source).absolute())
    tokenizer = get_tokenizer()
    n_prompt = len(text_to_ids(args.sample_prompt, tokenizer))
    if n_prompt > model.cfg.context_length:
        raise BadInputError(f"--sample-prompt has {n_prompt} tokens, more than the model's context "
                            f"length ({model.cfg.context_length}); shorten it")

    def sample(trainer) -> None:
        from gptforge.generate import generate

        model = trainer.model
        ids = torch.tensor([text_to_ids(args.sample_prompt, tokenizer)], device=model.emb.tok.weight.device)
        # Book-exact: without a KV cache, every token from a whole forward pass, as the book's.
        out_ids = generate(model, ids, 50, use_cache=not book_exact)
        say(tokenizer.decode(out_ids[0].tolist()).replace("\n", " "))

    start = time.perf_counter()
    result = pretrain(model, data, cfg, out, resume=resume,
                      callbacks={"on_eval": print_book_eval if book_exact else print_eval,
                                 "on_epoch_end": sample},
                      progress=not args.no_progress, base_model=base, book_exact=book_exact)
    print_finish(result, (time.perf_counter() - start) / 60, out)
    return 0


def print_book_eval(trainer) -> None:
    """An evaluation line as the book's train_model_simple prints it: its step counter
    starts at 0 (ours counts steps done), and no speed."""
    r = trainer.history[-1]
    say(f"Ep {r['epoch']} (Step {r['step'] - 1:06d}): Train loss {r['train_loss']:.3f}, "
        f"Val loss {r['val_loss']:.3f}")
