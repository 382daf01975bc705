"""Serve a model over HTTP: OpenAI-compatible completions and chat, classification, a chat page.

Needs the optional extra: `pip install 'gptforge[serve]'` (FastAPI and uvicorn).
Importing this package loads neither; `create_app` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "SamplingParams", "background_server", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `gptforge --help` (which imports gptforge.cli.serve) never loads FastAPI.
    if name in ("create_app", "background_server"):
        from gptforge.serve import app

        return getattr(app, name)
    if name in ("Engine", "SamplingParams"):
        from gptforge.serve import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'gptforge.serve' has no attribute {name!r}")
