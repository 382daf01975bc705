"""The book's chapter-5 run, three ways: the book's own code, gptforge --book-exact, gptforge.

The book's code is the `llms_from_scratch` package (`pip install --no-deps llms-from-scratch`),
run with the chapter's settings: GPT-2 small at context 256, dropout 0.1, no QKV bias,
The Verdict split 90/10 into windows of 256 tokens, batch 2, AdamW (lr 4e-4, weight decay
0.1), 10 epochs, evaluation on 5 batches every 5 steps, torch.manual_seed(123) before the
loaders and again before the model. gptforge runs `pretrain(..., book_exact=True)` with the
same settings (and no gradient clipping, as the book), and, for comparison, its default
path with `--grad-clip 0`. Each side runs in a process of its own with the same number of
threads; the table shows the losses every evaluation prints, then each side's samples.

    python benchmarks/book_exact.py --threads 1 --results runs/book_exact
    python benchmarks/book_exact.py --side book --results runs/book_exact   # one side only

A side whose results are in --results already is not run again (delete its JSON to redo it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

SIDES = ("book", "exact", "default")
TITLES = {"book": "book code", "exact": "gptforge --book-exact", "default": "gptforge default"}
SEED = 123


def verdict_text() -> str:
    from gptforge.download import download

    return download("the-verdict").read_text(encoding="utf-8")


def offline_gpt2_encoding():
    """tiktoken's "gpt2" encoding, which the book's code asks tiktoken for, without the
    download tiktoken would make: gptforge's tokenizer, the same BPE with the same ids."""
    import tiktoken.registry

    from gptforge.tokenizer import get_tokenizer

    tiktoken.registry.ENCODINGS.setdefault("gpt2", get_tokenizer())
    return tiktoken.registry.ENCODINGS["gpt2"]


def book_setup(text: str, **model_overrides) -> tuple[torch.nn.Module, DataLoader, DataLoader,
                                                        torch.optim.Optimizer]:
    """The chapter's model, loaders and optimizer, built by the book's own code.

    `text` (The Verdict) split 90/10 into windows of 256 tokens, batch 2 (the training
    loader shuffled); GPT-2 small at context 256, dropout 0.1, no QKV bias, with
    `model_overrides` replacing entries of the book's config dict; AdamW (lr 4e-4,
    weight decay 0.1); torch.manual_seed(SEED) before the loaders and again before the
    model, as the chapter does. Returns (model, train_loader, val_loader, optimizer).
    Shared with tests/test_book_exact.py.
    """
    import torch
    from llms_from_scratch.ch02 import create_dataloader_v1
    from llms_from_scratch.ch04 import GPTModel

    cfg = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
           "drop_rate": 0.1, "qkv_bias": False, **model_overrides}
    split = int(0.90 * len(text))
    torch.manual_seed(SEED)
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=256, stride=256,
                                        drop_last=True, shuffle=True, num_workers=0)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=256, stride=256,
                                      drop_last=False, shuffle=False, num_workers=0)
    torch.manual_seed(SEED)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    return model, train_loader, val_loader, optimizer


def run_book(epochs: int) -> dict:
    """The chapter's training run, in the book's own code."""
    from llms_from_scratch.ch05 import train_model_simple

    tokenizer = offline_gpt2_encoding()
    model, train_loader, val_loader, optimizer = book_setup(verdict_text())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train, val, _ = train_model_simple(model, train_loader, val_loader, optimizer, "cpu",
                                           num_epochs=epochs, eval_freq=5, eval_iter=5,
                                           start_context="Every effort moves you",
                                           tokenizer=tokenizer)
    lines = printed.getvalue().splitlines()
    steps = [int(m.group(1)) + 1 for line in lines if (m := re.search(r"Step (\d+)", line))]
    samples = [line for line in lines if not line.startswith("Ep ")]
    return {"steps": steps, "train": train, "val": val, "samples": samples}


def run_gptforge(epochs: int, book_exact: bool) -> dict:
    """The same run in gptforge: `pretrain(..., book_exact=...)`, with no gradient clipping."""
    import torch

    from gptforge.config import book_config
    from gptforge.generate import generate
    from gptforge.model import GPTModel
    from gptforge.pretrain import SAMPLE_PROMPT, PretrainData, pretrain
    from gptforge.tokenizer import get_tokenizer, text_to_ids
    from gptforge.training import TrainConfig

    tokenizer = get_tokenizer()
    samples: list[str] = []

    def sample(trainer) -> None:
        ids = torch.tensor([text_to_ids(SAMPLE_PROMPT, tokenizer)])
        # As `gptforge pretrain` samples: the book-exact mode without a KV cache, as the book's code.
        out = generate(trainer.model, ids, 50, use_cache=not book_exact)
        samples.append(tokenizer.decode(out[0].tolist()).replace("\n", " "))

    torch.manual_seed(SEED)
    model = GPTModel(book_config("gpt2-small", 256), init="torch")
    cfg = TrainConfig(epochs=epochs, grad_clip=0.0, device="cpu", precision="fp32", seed=SEED)
    with tempfile.TemporaryDirectory() as out:
        result = pretrain(model, PretrainData(), cfg, out, callbacks={"on_epoch_end": sample},
                          base_model="init:gpt2-small", book_exact=book_exact)
    history = result.history
    return {"steps": [r["step"] for r in history], "train": [r["train_loss"] for r in history],
            "val": [r["val_loss"] for r in history], "samples": samples}


def worker(side: str, epochs: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    out = run_book(epochs) if side == "book" else run_gptforge(epochs, book_exact=side == "exact")
    out.update(side=side, epochs=epochs, threads=threads, torch=torch.__version__,
               minutes=(time.perf_counter() - start) / 60)
    print(json.dumps(out))


def run_side(side: str, epochs: int, threads: int, results: Path) -> dict:
    path = results / f"{side}.json"
    if path.is_file():
        return json.loads(path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", side, "--epochs", str(epochs),
                           "--threads", str(threads)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} side failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def report(runs: dict[str, dict]) -> str:
    """The losses of every evaluation side by side (Markdown), then each side's samples."""
    sides = [s for s in SIDES if s in runs]
    head = "| step | " + " | ".join(f"{TITLES[s]} train | {TITLES[s]} val" for s in sides) + " |"
    rows = [head, "|" + "---|" * (1 + 2 * len(sides))]
    all_steps = sorted({step for s in sides for step in runs[s]["steps"]})
    for step in all_steps:
        cells = []
        for s in sides:
            r = runs[s]
            if step in r["steps"]:
                i = r["steps"].index(step)
                cells += [f"{r['train'][i]:.3f}", f"{r['val'][i]:.3f}"]
            else:
                cells += ["", ""]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    lines = rows + [""]
    if "book" in runs and "exact" in runs:
        b, e = runs["book"], runs["exact"]
        same = [f"{x:.3f}" == f"{y:.3f}" for x, y in zip(b["train"] + b["val"], e["train"] + e["val"])]
        lines.append(f"book-exact equals the book's code to 3 decimals at {sum(same)} of {len(same)} "
                     f"printed losses; samples identical: {b['samples'] == e['samples']}")
    for s in sides:
        r = runs[s]
        lines.append(f"{TITLES[s]}: {r['threads']} thread(s), {r['minutes']:.1f} min, torch {r['torch']}")
        lines += [f"  epoch {i + 1}: {text}" for i, text in enumerate(r["samples"])]
    return "\n".join(lines)


def main() -> None:
    import argparse  # only the command line needs it; tests/test_book_exact.py imports this module

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=SIDES + ("all",), default="all")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side's process")
    p.add_argument("--results", type=Path, default=Path("runs/book_exact"),
                   help="directory for each side's JSON (a side found there is not run again)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.epochs, args.threads)
        return
    sides = SIDES if args.side == "all" else (args.side,)
    runs = {s: run_side(s, args.epochs, args.threads, args.results) for s in sides}
    runs.update({s: json.loads((args.results / f"{s}.json").read_text()) for s in SIDES
                 if s not in runs and (args.results / f"{s}.json").is_file()})
    print(report(runs))


if __name__ == "__main__":
    main()
