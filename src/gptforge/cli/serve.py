"""`gptforge serve`: run the HTTP server (OpenAI-compatible API and a chat page)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys

from gptforge.cli.common import add_device_arg, add_draft_args
from gptforge.errors import BadInputError, GptforgeError

SERVE_EXTRA_HINT = "pip install 'gptforge[serve]'"


def add_commands(sub) -> None:
    """Add the `serve` subcommand to the `gptforge` command line."""
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a chat page")
    p.add_argument("--model", required=True, help="preset name, run directory or checkpoint to serve")
    p.add_argument("--classifier", default=None, metavar="RUN",
                   help="classifier run directory, served at /v1/classify")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every API request "
                        "(default: $GPTFORGE_API_KEY if set)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="longest a generation or classification may take, queueing included "
                        "(0 = no limit)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N",
                   help="largest request body accepted (bigger ones get 413)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="longest a request body may take to arrive after its headers (then 408)")
    p.add_argument("--max-active", type=int, default=16,
                   help="generations advanced together; more wait in the queue")
    p.add_argument("--max-classify-texts", type=int, default=256, metavar="N",
                   help="most texts in one /v1/classify request (more get 413)")
    p.add_argument("--max-classify-tokens", type=int, default=65536, metavar="N",
                   help="most tokens, all texts together, in one /v1/classify request (more get 413)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="a connection that has not sent a request's headers within S seconds is closed")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                   help="an idle connection is closed after S seconds")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="connections held at once (kept below the file-descriptor limit); when full, "
                        "a new one replaces the oldest still sending its headers")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; '*' for any). "
                        "Loopback names and the address a client connected to are always allowed")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example.com) call the API "
                        "(repeatable; '*' for any)")
    p.add_argument("--model-id", default=None,
                   help="model id clients send (default: the run directory's or preset's name)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="serve int8 weight-only linear layers (CPU; the --draft model's too)")
    add_draft_args(p)
    add_device_arg(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often faster "
                        "on a machine busy with other work)")
    p.set_defaults(func=cmd_serve)


def check_flags(args: argparse.Namespace) -> None:
    """Raise BadInputError naming the first unusable flag, before anything loads."""
    if not 1 <= args.port <= 65535:
        raise BadInputError(f"--port must be 1-65535, got {args.port}")
    if not args.host.strip():
        raise BadInputError("--host must be an address or host name, got an empty one")
    if args.threads is not None and args.threads < 1:
        raise BadInputError(f"--threads must be at least 1, got {args.threads}")
    if not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise BadInputError(f"--timeout must be a number of seconds >= 0 (0: no limit), got {args.timeout}")
    for flag in ("body_timeout", "header_timeout", "keep_alive_timeout"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise BadInputError(f"--{flag.replace('_', '-')} must be a number of seconds > 0, got {value}")
    for flag in ("max_body_bytes", "max_active", "max_classify_texts", "max_classify_tokens",
                 "max_connections"):
        value = getattr(args, flag)
        if value < 1:
            raise BadInputError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def cmd_serve(args: argparse.Namespace) -> int:
    check_flags(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise GptforgeError(f"`gptforge serve` needs FastAPI and uvicorn ({err.name} is missing): "
                            f"{SERVE_EXTRA_HINT}") from None
    from gptforge.serve.app import ConnectionLimits, create_app, serve

    limits = ConnectionLimits(header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                              max_connections=args.max_connections)
    # Clients reach a server bound to a name by that name; an address is allowed anyway.
    hosts = list(args.allow_host) + ([] if _is_loopback(args.host) or _is_address(args.host) else [args.host])
    api_key = args.api_key or os.environ.get("GPTFORGE_API_KEY") or None
    app = create_app(args.model, args.classifier, api_key, timeout=args.timeout or None,
                     max_body_bytes=args.max_body_bytes, device=args.device,
                     max_active=args.max_active, model_id=args.model_id,
                     body_timeout=args.body_timeout, max_classify_texts=args.max_classify_texts,
                     max_classify_tokens=args.max_classify_tokens, allowed_hosts=hosts,
                     cors_origins=args.cors_origin, quantize=args.quantize, draft=args.draft,
                     draft_tokens=args.draft_tokens)
    if not api_key and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this "
              f"machine can use the model", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"gptforge: serving {app.state.served.model_id} at http://{host}:{args.port}/ "
          f"(API at /v1{', API key required' if api_key else ''})", file=sys.stderr)
    serve(app, args.host, args.port, limits, log_level="info" if args.verbose else "warning")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
