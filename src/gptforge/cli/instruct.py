"""Commands for instruction-following models: `finetune instruct`, `chat`, `ask` and
`evaluate-responses`. Each parses its flags and calls into gptforge.finetune.instruct / judge."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gptforge.cli.common import (
    add_device_arg,
    add_draft_args,
    add_sampling_args,
    add_train_args,
    allocation_guard,
    check_model_memory,
    check_new_run_dir,
    dropout_rate,
    finetune_group,
    http_url,
    load_draft,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print_eval,
    print_finish,
    refuse_on_resume,
    sampling_from_args,
    say,
    seed_int,
    train_config,
)
from gptforge.errors import BadInputError, NotFoundError

# The book's chapter-7 settings.
TRAIN_DEFAULTS = dict(lr=5e-5, weight_decay=0.1, epochs=2, batch_size=8, eval_every=5, eval_batches=5)
TEMPLATE_NAMES = ("alpaca", "phi3", "chat")  # chat: the model's own chat template


def add_commands(sub) -> None:
    """Register this module's subcommands on the top-level subparsers."""
    _add_finetune_instruct(finetune_group(sub))
    _add_chat(sub)
    _add_ask(sub)
    _add_evaluate_responses(sub)


def _load_model(source: str, device: str = "cpu"):
    """(model, run metadata, tokenizer) for a run directory (full or LoRA), a checkpoint or a
    preset; a classifier is refused, as it has no next-token predictions to answer or score with."""
    from gptforge.data import check_language_model
    from gptforge.loader import load, read_run, tokenizer_for

    model = load(source, device=device)
    check_language_model(model, str(source))
    return model, read_run(source), tokenizer_for(source)


def _template(name: str | None, meta, tokenizer):
    from gptforge.finetune.instruct import template_of

    return template_of(meta, name, tokenizer) if not name else template_of(None, name, tokenizer)


# ------------------------------------------------------------------------------------
# finetune instruct

def _add_finetune_instruct(tasks) -> None:
    p = tasks.add_parser("instruct", help="fine-tune a model to follow instructions (the book's chapter 7)")
    p.add_argument("--model", default=None,
                   help="model to start from: preset (downloads GPT-2; default gpt2-medium), "
                        "checkpoint or run directory")
    p.add_argument("--init", default=None, metavar="PRESET|MODEL",
                   help="start from a fresh, untrained model of this preset, or of this model's "
                        "architecture (a checkpoint or model directory; its tokenizer too), "
                        "instead of --model")
    p.add_argument("--context-length", type=positive_int, default=None,
                   help="context length of an --init preset model (default 256)")
    for flag in ("--n-layers", "--emb-dim", "--n-heads"):
        p.add_argument(flag, type=positive_int, default=None, help="shape of an --init preset model")
    p.add_argument("--data", default=None,
                   help="JSON or JSONL file of instruction/input/output entries "
                        "(default: the book's instruction-data.json)")
    p.add_argument("--template", choices=TEMPLATE_NAMES, default=None, help="prompt template (default alpaca)")
    p.add_argument("--mask-prompt", action="store_true", default=None,
                   help="train only on the responses (prompt targets are ignored)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate examples to this many tokens (default 1024; capped at the context length)")
    p.add_argument("--lora-rank", type=positive_int, default=None,
                   help="train LoRA adapters of this rank instead of all weights")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA scale (default: the rank)")
    p.add_argument("--dropout", type=dropout_rate, default=None,
                   help="dropout rate in [0, 1) (default: the model's)")
    p.add_argument("--max-test", type=non_negative_int, default=None,
                   help="answer only the first N test entries (0: none; default: all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="longest test-set response in tokens")
    p.add_argument("--gen-batch-size", type=positive_int, default=8,
                   help="test prompts of equal length answered together")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>-instruct)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    add_train_args(p, **TRAIN_DEFAULTS)
    p.set_defaults(func=cmd_finetune_instruct)


# Flags that describe a new run: refused with --resume, which keeps the run's own.
NEW_RUN_FLAGS = {"model": "--model", "init": "--init", "context_length": "--context-length",
                 "n_layers": "--n-layers", "emb_dim": "--emb-dim", "n_heads": "--n-heads",
                 "data": "--data", "template": "--template",
                 "mask_prompt": "--mask-prompt", "max_length": "--max-length",
                 "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha", "out": "--out"}


def _initial_model(args: argparse.Namespace):
    """(model, base) that a new run starts from: --model's weights, or a fresh model of
    --init's preset or of the architecture of the model it names (base "init:...")."""
    from gptforge.config import book_config, canonical_preset
    from gptforge.loader import load, read_run
    from gptforge.pretrain import fresh_model

    shape = {k: getattr(args, k) for k in ("n_layers", "emb_dim", "n_heads") if getattr(args, k)}
    if not args.init:
        if shape or args.context_length is not None:
            raise BadInputError("--n-layers/--emb-dim/--n-heads/--context-length shape a fresh model; "
                                "use them with --init")
        source = args.model or "gpt2-medium"
        return load(source, for_training=True), source
    if args.model is not None:
        raise BadInputError("give --model (a trained model to start from) or --init (a fresh "
                            "model of a preset or of a model's architecture), not both")
    if canonical_preset(args.init) is not None and not Path(args.init).exists():
        cfg = book_config(args.init, args.context_length or 256, **shape)
        base = f"init:{canonical_preset(args.init)}"
    elif Path(args.init).exists():
        if shape or args.context_length is not None:
            raise BadInputError(f"--n-layers/--emb-dim/--n-heads/--context-length shape a fresh preset "
                                f"model; --init {args.init} takes the shape of that model: leave them out")
        cfg = read_run(args.init).model
        base = f"init:{Path(args.init).resolve()}"
    else:
        raise NotFoundError(f"--init {args.init} is neither a preset nor an existing model directory "
                            f"or checkpoint; give a preset such as gpt2-small or a model's path")
    check_model_memory(cfg, args.device)
    with allocation_guard(cfg):
        return fresh_model(cfg), base


def cmd_finetune_instruct(args: argparse.Namespace) -> int:
    import torch

    from gptforge.checkpoint import default_run_dir
    from gptforge.data import check_language_model
    from gptforge.finetune.instruct import InstructOptions, finetune_instruct, load_run_for_resume

    if args.resume:
        refuse_on_resume(args, NEW_RUN_FLAGS)
        out = Path(args.resume)
        cfg = train_config(args, out)
        model, base, options = load_run_for_resume(out)
        options.max_test, options.max_new_tokens = args.max_test, args.max_new_tokens
        options.gen_batch_size = args.gen_batch_size
    else:
        if args.lora_alpha is not None and args.lora_rank is None:
            raise BadInputError("--lora-alpha needs --lora-rank")
        cfg = train_config(args)
        source = args.init or args.model or "gpt2-medium"
        options = InstructOptions(data=args.data, template=args.template,
                                  mask_prompt=bool(args.mask_prompt),
                                  max_length=args.max_length or 1024, lora_rank=args.lora_rank,
                                  lora_alpha=args.lora_alpha, max_test=args.max_test,
                                  max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size)
        suffix = f"-lora{args.lora_rank}" if args.lora_rank else ""
        out = Path(args.out) if args.out else default_run_dir(f"{Path(source).name}-instruct{suffix}")
        check_new_run_dir(out)
        torch.manual_seed(cfg.seed)  # LoRA's A matrices (and a fresh model) are drawn at random
        model, base = _initial_model(args)
        check_language_model(model, source)
    if args.dropout is not None:
        from gptforge.model import set_dropout

        set_dropout(model, args.dropout)

    bar = None

    def on_response(n: int) -> None:
        nonlocal bar
        if bar is None and not args.no_progress:
            from tqdm.auto import tqdm

            test = json.loads((out / "test.json").read_text())
            total = len(test) if options.max_test is None else min(options.max_test, len(test))
            bar = tqdm(total=total, unit="response", desc="answering the test set")
        if bar is not None:
            bar.update(n)

    start = time.perf_counter()
    result = finetune_instruct(model, base, options, cfg, out, resume=bool(args.resume),
                               callbacks={"on_eval": print_eval}, on_response_progress=on_response,
                               progress=not args.no_progress)
    if bar is not None:
        bar.close()
    print_finish(result, (time.perf_counter() - start) / 60, out)
    if result.responses:
        say(f"Test-set responses: {result.responses}")
    return 0


# ------------------------------------------------------------------------------------
# chat and ask

def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to an instruction-tuned model in the terminal")
    p.add_argument("--model", required=True, help="run directory, checkpoint or preset")
    p.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                   help="prompt template (default: the run's, else alpaca)")
    p.add_argument("--history", type=non_negative_int, default=3,
                   help="earlier exchanges shown to the model (0: none)")
    add_device_arg(p)
    add_sampling_args(p, max_new_tokens=256)
    add_draft_args(p)
    p.set_defaults(func=cmd_chat)


CHAT_HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer."


def cmd_chat(args: argparse.Namespace) -> int:
    import importlib

    from gptforge.finetune.instruct import chat_prompt, end_ids

    # The module, looked up at run time (`gptforge.generate` the attribute is a function).
    gen = importlib.import_module("gptforge.generate")
    sampling = sampling_from_args(args)
    model, meta, tokenizer = _load_model(args.model, args.device)
    draft = load_draft(args, model, tokenizer)
    template = _template(args.template, meta, tokenizer)
    stops = end_ids(tokenizer, template)
    ctx = model.cfg.context_length
    budget = max(ctx - args.max_new_tokens, ctx // 2)  # prompt tokens, leaving room to answer
    history: list[dict] = []
    out = sys.stdout
    print(f"Chatting with {args.model} ({template.name} prompts). {CHAT_HELP}", file=sys.stderr)
    while True:
        out.write(">>> ")
        out.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            out.write("\n(use /exit or Ctrl-D to quit)\n")
            continue
        if not line:  # end of input
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text}; {CHAT_HELP}\n")
            continue
        try:
            prompt = chat_prompt(history, text, template, tokenizer, budget)
        except ValueError as err:
            out.write(f"error: {err}\n")
            continue
        pieces: list[str] = []
        try:
            for piece in gen.stream_text(model, prompt, args.max_new_tokens, tokenizer, stop_ids=stops,
                                         stop_texts=template.end_markers, draft=draft,
                                         draft_tokens=args.draft_tokens, **sampling):
                if not pieces:
                    piece = piece.lstrip()  # the answer starts at its first visible character
                    if not piece:
                        continue
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        history += [{"role": "user", "content": text},
                    {"role": "assistant", "content": "".join(pieces).strip()}]
        history = history[-2 * args.history:] if args.history > 0 else []
    return 0


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer one instruction and print only the answer")
    p.add_argument("instruction")
    p.add_argument("--input", default="", help="the entry's input, if the task has one")
    p.add_argument("--model", required=True, help="run directory, checkpoint or preset")
    p.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                   help="prompt template (default: the run's, else alpaca)")
    add_device_arg(p)
    add_sampling_args(p, max_new_tokens=256)
    p.set_defaults(func=cmd_ask)


def cmd_ask(args: argparse.Namespace) -> int:
    from gptforge.finetune.instruct import answer

    if not args.instruction.strip():
        raise BadInputError("the instruction is empty; say what the model should do")
    sampling = sampling_from_args(args)
    model, meta, tokenizer = _load_model(args.model, args.device)
    template = _template(args.template, meta, tokenizer)
    entry = {"instruction": args.instruction, "input": args.input}
    print(answer(model, entry, template, args.max_new_tokens, tokenizer, **sampling))
    return 0


# ------------------------------------------------------------------------------------
# evaluate-responses

def _add_evaluate_responses(sub) -> None:
    p = sub.add_parser("evaluate-responses",
                       help="score responses.json: ROUGE-L, exact match, model loss, an LLM judge")
    p.add_argument("responses", help="JSON list of entries with 'output' and the model's response")
    p.add_argument("--response-key", default="model_response")
    p.add_argument("--model", default=None,
                   help="also report this model's loss on the reference responses")
    p.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                   help="template for --model (default: the run's, else alpaca)")
    p.add_argument("--judge-url", type=http_url, default=None,
                   help="judge server, e.g. http://localhost:11434 (Ollama) or an OpenAI-compatible base URL")
    p.add_argument("--judge-model", default=None, help="judge model name, e.g. llama3")
    p.add_argument("--judge-api", choices=["openai", "ollama"], default="openai")
    p.add_argument("--judge-cache", default=None,
                   help="cache of judge replies (default: judge_cache.json beside the responses)")
    p.add_argument("--judge-timeout", type=positive_float, default=60.0, help="seconds per request")
    p.add_argument("--judge-retries", type=non_negative_int, default=3)
    p.add_argument("--judge-backoff", type=non_negative_float, default=1.0,
                   help="first wait between retries (s)")
    p.add_argument("--judge-seed", type=seed_int, default=123)
    p.add_argument("--out", default=None, help="report file (default: report.json beside the responses)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    add_device_arg(p)
    p.set_defaults(func=cmd_evaluate_responses)


def _read_responses(path: Path, key: str) -> list[dict]:
    """The entries of a responses file, each checked to hold an instruction, its reference
    ("output") and a response (`key`)."""
    from gptforge.data import read_text_file
    from gptforge.finetune.instruct import kind_of

    try:
        entries = json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise BadInputError(f"{path} is not valid JSON ({err}); give the responses.json that "
                            f"`gptforge finetune instruct` wrote") from None
    if not isinstance(entries, list):
        raise BadInputError(f"{path} must hold a JSON list of entries, not {kind_of(entries)}")
    if not entries:
        raise BadInputError(f"{path} holds no entries; there is nothing to evaluate")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadInputError(f"{path}: entry {i} is {kind_of(entry)}, not an object with "
                                f"'instruction', 'output' and {key!r}")
        for name in ("instruction", "output", key):
            if name not in entry:
                hint = " (name the response key with --response-key)" if name == key else ""
                raise BadInputError(f"{path}: entry {i} has no {name!r} key{hint}; evaluate a "
                                    f"responses.json written by `gptforge finetune instruct`")
    return entries


def cmd_evaluate_responses(args: argparse.Namespace) -> int:
    from gptforge.finetune.judge import JudgeClient, evaluate_responses, summary_lines, write_report

    path = Path(args.responses)
    if not path.is_file():
        raise NotFoundError(f"no responses file at {path}")
    entries = _read_responses(path, args.response_key)
    if args.out:
        from gptforge.data import check_output_file

        check_output_file(args.out, "--out")
    model, template, tokenizer = None, "alpaca", None
    if args.model:
        model, meta, tokenizer = _load_model(args.model, args.device)
        template = _template(args.template, meta, tokenizer)
    judge = None
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise BadInputError("a judge needs both --judge-url and --judge-model")
        cache = args.judge_cache or path.with_name("judge_cache.json")
        judge = JudgeClient(args.judge_url, args.judge_model, args.judge_api, args.judge_timeout,
                            args.judge_retries, args.judge_backoff, args.judge_seed, cache)
    bar = None
    if judge is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), unit="response", desc="judging", file=sys.stderr)
    try:
        report = evaluate_responses(entries, args.response_key, model, template, judge,
                                    on_judged=bar.update if bar else None,
                                    batch_size=args.batch_size, seed=args.judge_seed, tokenizer=tokenizer)
    finally:
        if bar is not None:
            bar.close()
    out = write_report(report, args.out or path.with_name("report.json"))
    for line in summary_lines(report):
        print(line)
    print(f"report: {out}")
    return 0
