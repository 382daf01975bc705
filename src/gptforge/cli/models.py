"""Commands about model files: `info`, `download`, `convert` and `merge-lora`."""

from __future__ import annotations

import argparse

from gptforge.cli.common import check_output_dir


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and memory of a preset or checkpoint")
    p.add_argument("model", help="preset name (gpt2-small, qwen3-0.6b, llama-3.2-1b, gemma-3-270m, ...), "
                                 "Hugging Face model id or model directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download", help="download model weights (GPT-2, Hugging Face Hub) or a data set")
    p.add_argument("name", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl (or 124M...), a Hugging Face "
                                "model (Qwen/Qwen3-0.6B, meta-llama/Llama-3.2-1B, google/gemma-3-270m, or "
                                "a preset such as qwen3-0.6b), or a data set: the-verdict, "
                                "sms-spam-collection, instruction-data, ...")
    p.add_argument("--format", choices=["openai", "hf"], default="openai", help="GPT-2's file format")
    p.add_argument("--revision", default=None, help="a Hub model's branch, tag or commit")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="write a model in gptforge or Hugging Face format, or as a GGUF file")
    p.add_argument("source")
    p.add_argument("out", help="output directory; for --to gguf a .gguf file (or a directory to put "
                               "model-<type>.gguf in)")
    p.add_argument("--to", choices=["gptforge", "hf", "gguf"], default="gptforge",
                   help="gptforge; hf (a directory transformers loads, tokenizer included); gguf (one file "
                        "llama.cpp and Ollama load)")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16",
                   help="how --to gguf stores the weight matrices (norms and biases stay f32); default f16")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge-lora", help="fold a LoRA run's adapters into a plain gptforge model")
    p.add_argument("run", help="LoRA run directory (adapter.safetensors + gptforge.json)")
    p.add_argument("out", help="directory for the merged model")
    p.set_defaults(func=cmd_merge_lora)


def cmd_info(args: argparse.Namespace) -> int:
    from gptforge.info import model_info

    for key, value in model_info(args.model).items():
        print(f"{key:<34} {value}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from gptforge.config import canonical_preset
    from gptforge.download import RESOURCES, download, download_gpt2
    from gptforge.errors import BadInputError
    from gptforge.families import hub_repo
    from gptforge.hub import download_model, looks_like_repo

    if canonical_preset(args.name):
        print(download_gpt2(args.name, fmt=args.format))
    elif args.name in RESOURCES:
        print(download(args.name))
    elif hub_repo(args.name) or looks_like_repo(args.name):
        print(download_model(hub_repo(args.name) or args.name, revision=args.revision))
    else:
        raise BadInputError(f"unknown download {args.name!r}; choose a GPT-2 size (gpt2-small ... "
                            f"gpt2-xl, 124M ... 1558M), a Hugging Face model id (owner/name) or one "
                            f"of: {', '.join(RESOURCES)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gptforge.convert import convert
    from gptforge.errors import BadInputError

    if args.to == "gguf" and args.out.endswith(".gguf"):
        out = Path(args.out)
        if out.is_dir():
            raise BadInputError(f"the output file {out} is a directory; name a .gguf file to write")
        check_output_dir(out.parent, "the output file's directory")
    else:
        check_output_dir(args.out, "the output directory", source=args.source)
    print(convert(args.source, args.out, to=args.to, gguf_type=args.gguf_type))
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from gptforge.convert import convert
    from gptforge.errors import BadInputError
    from gptforge.loader import read_run

    check_output_dir(args.out, "the output directory", source=args.run)
    if not read_run(args.run).adapters_only:
        raise BadInputError(f"{args.run} is not a LoRA run (its gptforge.json names no adapters); "
                            f"it is a full model already")
    print(convert(args.run, args.out))  # the base with the adapters folded in, the run's metadata kept
    return 0
