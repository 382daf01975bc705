"""`gptforge generate`: continue a prompt, streaming the text as it comes."""

from __future__ import annotations

import argparse
import sys

from gptforge.cli.common import add_device_arg, add_draft_args, add_sampling_args, load_draft, sampling_from_args
from gptforge.errors import BadInputError


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model, streaming the text")
    p.add_argument("--model", required=True,
                   help="preset name, run directory or checkpoint (an instruction run's text ends "
                        "where its prompt template ends an answer)")
    p.add_argument("--prompt", required=True)
    add_sampling_args(p)
    p.add_argument("--no-cache", action="store_true", help="recompute every position (slow)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only linear layers (CPU; the --draft model's too)")
    add_draft_args(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_generate)


def _instruction_stops(source: str, tokenizer) -> dict:
    """For an instruction run (its gptforge.json names its prompt template): stream_text's
    stop settings that end the text where the template ends an answer, as `ask` does.
    Other models stop at their tokenizer's end tokens only (an empty dict)."""
    from gptforge.finetune.instruct import end_ids, template_of
    from gptforge.loader import read_run

    meta = read_run(source)
    if not meta.template:
        return {}
    template = template_of(meta, tokenizer=tokenizer)
    return {"stop_ids": end_ids(tokenizer, template), "stop_texts": template.end_markers}


def cmd_generate(args: argparse.Namespace) -> int:
    from gptforge.data import check_language_model
    from gptforge.generate import stream_text
    from gptforge.loader import load, tokenizer_for

    if args.quantize and args.device != "cpu":
        raise BadInputError(f"--quantize int8 runs on the CPU only; leave out --device {args.device} "
                            f"or the quantization")
    sampling = sampling_from_args(args)
    model = load(args.model, device=args.device)
    check_language_model(model, args.model)
    tokenizer = tokenizer_for(args.model)  # GPT-2's BPE, or the model's own tokenizer.json
    draft = load_draft(args, model, tokenizer)
    if args.quantize:
        from gptforge.quantize import quantize_int8

        model = quantize_int8(model)
        draft = quantize_int8(draft) if draft is not None else None
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    stops = _instruction_stops(args.model, tokenizer)
    for piece in stream_text(model, args.prompt, args.max_new_tokens, tokenizer, use_cache=not args.no_cache,
                             draft=draft, draft_tokens=args.draft_tokens, **stops, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
