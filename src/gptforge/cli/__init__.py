"""The `gptforge` command line: one subcommand per user task, each a call into the library.

Each module of this package adds one group of commands with `add_commands(sub)`.
Heavy imports happen inside the command that needs them, so `gptforge --help` is
quick. Library errors (`GptforgeError`) print as one line and exit with status 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from gptforge.errors import GptforgeError

COMMAND_MODULES: tuple[str, ...] = (
    "gptforge.cli.pretrain",
    "gptforge.cli.generate",
    "gptforge.cli.models",
    "gptforge.cli.data",
    "gptforge.cli.classify",
    "gptforge.cli.instruct",
    "gptforge.cli.serve",
    "gptforge.cli.eval",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptforge", description="Build, train, load, fine-tune and run GPT-2-style language models.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and show the traceback of an error")
    parser.add_argument("--no-verify", action="store_true",
                        help="load weights without checking them (sha256, NaN/inf, CRC-32C): faster, "
                             "for files you trust")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    _add_threads(parser)
    return parser


# Commands that only move files or print what is stored take no --threads.
NO_COMPUTE: frozenset[str] = frozenset({"download", "info", "report"})


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """Give every command that computes a `--threads` flag (nested ones such as
    `finetune classify` too), unless the command defines its own."""
    from gptforge.cli.common import positive_int

    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, command in action.choices.items():
            if any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
                _add_threads(command)
            elif name not in NO_COMPUTE and "--threads" not in command._option_string_actions:
                command.add_argument("--threads", type=positive_int, default=None,
                                     help="CPU threads for PyTorch (default: PyTorch's choice, "
                                          "one per core)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print a message, not a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from gptforge.loader import NO_VERIFY_ENV

    saved_verify = os.environ.get(NO_VERIFY_ENV)
    if args.no_verify:
        os.environ[NO_VERIFY_ENV] = "1"
    saved_threads = _set_threads(getattr(args, "threads", None))
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except GptforgeError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # a command run from Python (a test, a notebook) leaves the settings as it found them
        _set_threads(saved_threads)
        if saved_verify is None:
            os.environ.pop(NO_VERIFY_ENV, None)
        else:
            os.environ[NO_VERIFY_ENV] = saved_verify


def _set_threads(threads: int | None) -> int | None:
    """Set PyTorch's CPU thread count when `threads` is given; return the count it replaced."""
    if not threads:
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous
