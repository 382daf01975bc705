"""Fault injection for gptforge's crash tests; does nothing unless GPTFORGE_FAULT is set.

`GPTFORGE_FAULT=POINT[:N[:SIGNAL]]` makes this process send itself SIGNAL (default
KILL; also INT or TERM) the N-th time (default 1) it reaches POINT. The points are
named where they are reached: `write:FILENAME` inside every file write (the data
written, not yet flushed or renamed), `checkpoint:written` (a checkpoint directory
complete but not yet current), `checkpoint:current` (made current, older ones not
yet removed), `step` (after an optimizer step), `eval` (at the start of an
evaluation), `epoch_end` (before the end-of-epoch callbacks). The tests use it to
kill or interrupt a run at each of these moments and check that it resumes exactly.
"""

from __future__ import annotations

import os
import signal

ENV = "GPTFORGE_FAULT"
_hits: dict[str, int] = {}


def reach(point: str) -> None:
    """Mark that `point` was reached; fire the configured signal if this is the moment."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split(":")  # point names hold colons themselves: read N and SIGNAL from the end
    sig = parts.pop() if parts[-1] in ("KILL", "INT", "TERM") else "KILL"
    count = int(parts.pop()) if parts[-1].isdigit() else 1
    if ":".join(parts) != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == count:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
