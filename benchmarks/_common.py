"""Pieces shared by the benchmarks that compare gptforge with transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def make_gpt2_small_weights(directory: Path) -> None:
    """Random gpt2-small weights (seeded), saved by transformers for both engines to load."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(123)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)


def run_worker(script: str, engine: str, weights: Path, *args: str) -> dict:
    """Run `script --worker ENGINE --weights W ARGS` in a fresh process; return its JSON line."""
    out = subprocess.run([sys.executable, script, "--worker", engine, "--weights", str(weights), *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
