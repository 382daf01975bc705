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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print a message, not a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from gptforge.loader import NO_VERIFY_ENV

    saved_verify = os.environ.get(NO_VERIFY_ENV)
    if args.no_verify:
        os.environ[NO_VERIFY_ENV] = "1"
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
    finally:  # a command run from Python (a test, a notebook) leaves the setting as it found it
        if saved_verify is None:
            os.environ.pop(NO_VERIFY_ENV, None)
        else:
            os.environ[NO_VERIFY_ENV] = saved_verify
