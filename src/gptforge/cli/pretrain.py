"""`gptforge pretrain`: next-token pretraining (default: the book's Verdict run)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gptforge.cli.common import (
    add_train_args,
    check_new_run_dir,
    positive_int,
    print_eval,
    print_finish,
    say,
    train_config,
)

# The book's chapter-5 settings are TrainConfig's defaults; gptforge adds gradient clipping,
# which keeps the short Verdict run from the loss spikes it otherwise sometimes shows
# (`--grad-clip 0` turns it off).
PRETRAIN_DEFAULTS = dict(grad_clip=1.0)


def add_commands(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a GPT model (default: the book's Verdict run)")
    p.add_argument("--model", default="gpt2-small",
                   help="preset to train from scratch, or a checkpoint to continue from")
    p.add_argument("--context-length", type=positive_int, default=256)
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (preset default 0.1)")
    for flag in ("--n-layers", "--emb-dim", "--n-heads"):
        p.add_argument(flag, type=positive_int, default=None,
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
    import torch

    from gptforge.checkpoint import default_run_dir
    from gptforge.config import canonical_preset
    from gptforge.loader import load, read_run
    from gptforge.pretrain import PretrainData, build_or_load_model, pretrain
    from gptforge.tokenizer import get_tokenizer, text_to_ids

    if args.resume:
        out = Path(args.resume)
        meta = read_run(out)
        data = PretrainData(**(meta.data or {}))
        cfg = train_config(args, out)
        model = load(out, for_training=True)
        base = meta.base_model
    else:
        # Absolute paths, so `--resume` finds the data from any working directory.
        data = PretrainData(text=[str(Path(t).absolute()) for t in args.text] if args.text else None,
                            data=str(Path(args.data).absolute()) if args.data else None,
                            train_ratio=args.train_ratio, stride=args.stride)
        cfg = train_config(args)
        torch.manual_seed(cfg.seed)
        shape = {k: getattr(args, k) for k in ("n_layers", "emb_dim", "n_heads")
                 if getattr(args, k) is not None}
        model = build_or_load_model(args.model, args.context_length, args.dropout, **shape)
        fresh = canonical_preset(args.model) is not None and not Path(args.model).exists()
        base = f"init:{canonical_preset(args.model)}" if fresh else str(Path(args.model).absolute())
        name = Path(args.data).stem if args.data else (Path(args.text[0]).stem if args.text else "verdict")
        out = Path(args.out) if args.out else default_run_dir(f"{Path(args.model).name}-{name}")
        check_new_run_dir(out)
    tokenizer = get_tokenizer()

    def sample(trainer) -> None:
        from gptforge.generate import generate

        model = trainer.model
        ids = torch.tensor([text_to_ids(args.sample_prompt, tokenizer)], device=model.emb.tok.weight.device)
        say(tokenizer.decode(generate(model, ids, 50)[0].tolist()).replace("\n", " "))

    start = time.perf_counter()
    result = pretrain(model, data, cfg, out, resume=bool(args.resume),
                      callbacks={"on_eval": print_eval, "on_epoch_end": sample},
                      progress=not args.no_progress, base_model=base)
    print_finish(result, (time.perf_counter() - start) / 60, out)
    return 0
