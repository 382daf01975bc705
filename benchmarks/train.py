"""Training speed: one full step (forward, loss, backward, AdamW) of gptforge vs transformers.

Both train the same random gpt2-small weights (written once with `save_pretrained`)
on batches of 2 x 256 tokens with dropout 0.1. Each measurement runs in its own
process; the engines alternate round by round. Also measures this machine's float32
matmul peak and reports model FLOPs utilisation (MFU) against it.

    python benchmarks/train.py --rounds 3 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import make_gpt2_small_weights, run_worker

BATCH, SEQ = 2, 256


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul throughput of this machine, GFLOP/s (best of several)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def flops_per_token(n_layers: int, emb_dim: int, vocab: int, seq: int) -> float:
    """Forward + backward FLOPs per token: 6 per matmul weight, plus attention scores."""
    matmul_weights = n_layers * 12 * emb_dim * emb_dim + vocab * emb_dim
    return 6 * matmul_weights + 12 * n_layers * seq * emb_dim


def worker(engine: str, weights: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    batches = [torch.randint(0, 50257, (BATCH, SEQ + 1)) for _ in range(steps + 2)]
    if engine == "hf":
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(weights, attn_implementation="sdpa")
        model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.1
        optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

        def loss_of(batch):
            logits = model(batch[:, :-1]).logits
            return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    else:
        from gptforge import load
        from gptforge.model import set_dropout
        from gptforge.runtime import tune_malloc

        tune_malloc()  # part of gptforge's training loop on the CPU
        model = load(weights, for_training=True)
        set_dropout(model, 0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=True)

        def loss_of(batch):
            logits = model(batch[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    model.train()

    def step(batch):
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for batch in batches[:2]:  # warm-up
        step(batch)
    start = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    seconds = time.perf_counter() - start
    return {"engine": engine, "tokens_per_s": steps * BATCH * SEQ / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.steps)))
        return
    peak = matmul_peak()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "gpt2-small-random"
        make_gpt2_small_weights(weights)
        for _ in range(args.rounds):
            for engine in ("hf", "gptforge"):
                rate = run_worker(__file__, engine, weights, "--steps", str(args.steps))["tokens_per_s"]
                results.setdefault(engine, []).append(rate)
                print(f"  {engine:9s} {rate:7.1f} tok/s", file=sys.stderr)
    fpt = flops_per_token(12, 768, 50257, SEQ)
    hf = statistics.median(results["hf"])
    print(f"\ngpt2-small, batch {BATCH} x {SEQ}, dropout 0.1, float32; matmul peak measured "
          f"{peak:.0f} GFLOP/s; {fpt / 1e9:.2f} GFLOP per token\n")
    print("| engine | tokens/s (median) | runs | vs transformers | MFU |")
    print("| --- | --- | --- | --- | --- |")
    for engine, values in results.items():
        med = statistics.median(values)
        print(f"| {engine} | {med:.1f} | {', '.join(f'{v:.0f}' for v in values)} | "
              f"{med / hf:.2f}x | {med * fpt / (peak * 1e9):.0%} |")


if __name__ == "__main__":
    main()
