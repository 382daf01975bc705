"""`gptforge serve`: run the HTTP server (OpenAI-compatible API and a chat page)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from gptforge.cli.common import add_device_arg
from gptforge.errors import GptforgeError

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
                   help="longest a generation may take, queueing included (0 = no limit)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N",
                   help="largest request body accepted (bigger ones get 413)")
    p.add_argument("--max-active", type=int, default=16,
                   help="generations advanced together; more wait in the queue")
    p.add_argument("--model-id", default=None,
                   help="model id clients send (default: the run directory's or preset's name)")
    add_device_arg(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice; 1 is often faster "
                        "on a machine busy with other work)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise GptforgeError(f"`gptforge serve` needs FastAPI and uvicorn ({err.name} is missing): "
                            f"{SERVE_EXTRA_HINT}") from None
    from gptforge.serve.app import create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("GPTFORGE_API_KEY") or None
    app = create_app(args.model, args.classifier, api_key, timeout=args.timeout or None,
                     max_body_bytes=args.max_body_bytes, device=args.device,
                     max_active=args.max_active, model_id=args.model_id)
    if not api_key and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this "
              f"machine can use the model", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"gptforge: serving {app.state.served.model_id} at http://{host}:{args.port}/ "
          f"(API at /v1{', API key required' if api_key else ''})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port,
                log_level="info" if args.verbose else "warning")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
