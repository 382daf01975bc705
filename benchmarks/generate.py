"""Generation speed: gptforge (KV cache, no cache, int8) against Hugging Face transformers.

Both load the same random gpt2-small weights (written once with `save_pretrained`);
gptforge through its public API only (`gptforge.load` + `gptforge.generate`).
Every measurement runs in its own process, the engines alternate round by round, and
the median tokens/s per engine is reported with its ratio to transformers.

    python benchmarks/generate.py --rounds 3 --tokens 100 [--bandwidth] [--trained-run runs/gpt2-small-verdict]

With --trained-run, also compares int8 and float32 perplexity on The Verdict's
validation text (the last 10%) for a model trained by gptforge.
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

PROMPT = "Every effort moves you"


# Eight prompts of different lengths for the batched-generation comparison.
BATCH_PROMPTS = [
    "Every effort moves you",
    "I had always thought Jack Gisburn rather a cheap genius",
    "The",
    "It was no great surprise to me to hear that, in the height of his glory, he had dropped his painting",
    "Mrs. Gisburn",
    "She glanced out almost",
    "Poor Stroud! He had been the most",
    "And then the light",
]


def worker(engine: str, weights: str, tokens: int) -> dict:
    """Load, warm up, then time one generation of `tokens` new tokens.

    gptforge runs as a Python API user calls it: `gptforge.load` + `gptforge.generate`,
    nothing else. "gptforge-batch8" generates for all of BATCH_PROMPTS in one call,
    "gptforge-seq8" for each of them in turn; both report new tokens per second.
    """
    import torch

    torch.manual_seed(0)
    from gptforge.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = torch.tensor([tok.encode(PROMPT)])
    if engine == "hf":
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(weights, attn_implementation="sdpa").eval()

        def run(n):
            with torch.inference_mode():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      use_cache=True, pad_token_id=50256)[0, ids.shape[1]:].tolist()
    else:
        from gptforge import generate, load

        model = load(weights)
        if engine == "gptforge-int8":
            from gptforge.quantize import quantize_int8

            model = quantize_int8(model)
        prompts = [tok.encode(p) for p in BATCH_PROMPTS]

        def run(n):
            if engine == "gptforge-batch8":
                return [row[len(p):] for row, p in zip(generate(model, prompts, n), prompts)]
            if engine == "gptforge-seq8":
                return [generate(model, torch.tensor([p]), n)[0, len(p):].tolist() for p in prompts]
            return generate(model, ids, n, use_cache=engine != "gptforge-nocache")[0, ids.shape[1]:].tolist()
    run(5)  # warm-up: first-call allocations, kernel selection, the decode layout
    start = time.perf_counter()
    new = run(tokens)
    seconds = time.perf_counter() - start
    rows = new if isinstance(new[0], list) else [new]
    assert all(len(r) == tokens for r in rows)
    return {"engine": engine, "tokens_per_s": sum(map(len, rows)) / seconds, "new_ids": rows,
            "threads": torch.get_num_threads()}


def perplexity_check(run_dir: str) -> dict:
    from gptforge import load
    from gptforge.download import download
    from gptforge.evaluate import evaluate_string
    from gptforge.quantize import quantize_int8

    text = download("the-verdict").read_text(encoding="utf-8")
    val = text[int(0.9 * len(text)):]
    model = load(run_dir)
    fp32 = evaluate_string(model, val)["perplexity"]
    int8 = evaluate_string(quantize_int8(model), val)["perplexity"]
    return {"fp32_ppl": fp32, "int8_ppl": int8, "relative_change": int8 / fp32 - 1}


def bandwidth() -> None:
    """GB/s of weights read by one token's products through gpt2-small's 48 block layers,
    computed three ways: as nn.Linear stores them, input-major, and as DecodeLinear does."""
    import torch
    from torch import nn

    from gptforge.generate import DecodeLinear

    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
    plain = [nn.Linear(i, o) for i, o in shapes]
    layers = {
        "nn.Linear": plain,
        "input-major, one product": [DecodeLinear(nn.Linear(i, o), parts=1) for i, o in shapes],
        f"DecodeLinear, {torch.get_num_threads()} parts": [DecodeLinear(nn.Linear(i, o), torch.get_num_threads())
                                                         for i, o in shapes],
    }
    inputs = [torch.randn(1, 1, i) for i, _ in shapes]
    n_bytes = sum(layer.weight.numel() + layer.bias.numel() for layer in plain) * 4
    print(f"\none token through the 48 linear layers of gpt2-small's blocks ({n_bytes / 1e6:.0f} MB):")
    with torch.no_grad():
        for name, stack in layers.items():
            times = []
            for _ in range(21):
                start = time.perf_counter()
                for layer, x in zip(stack, inputs):
                    layer(x)
                times.append(time.perf_counter() - start)
            median = statistics.median(times[1:])
            print(f"  {name:28s} {median * 1e3:6.2f} ms  {n_bytes / median / 1e9:5.1f} GB/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--engines", nargs="+",
                   default=["hf", "gptforge", "gptforge-int8", "gptforge-batch8", "gptforge-seq8"])
    p.add_argument("--nocache-rounds", type=int, default=1, help="gptforge without cache (slow)")
    p.add_argument("--trained-run", default=None)
    p.add_argument("--bandwidth", action="store_true", help="also time the layers' products alone")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.tokens)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "gpt2-small-random"
        make_gpt2_small_weights(weights)
        results: dict[str, list[float]] = {}
        new_ids: dict[str, list[int]] = {}  # each engine's greedy continuation
        schedule = [e for _ in range(args.rounds) for e in args.engines]
        schedule += ["gptforge-nocache"] * args.nocache_rounds
        for engine in schedule:
            record = run_worker(__file__, engine, weights, "--tokens", str(args.tokens))
            results.setdefault(engine, []).append(record["tokens_per_s"])
            new_ids.setdefault(engine, record["new_ids"])
            print(f"  {engine:18s} {record['tokens_per_s']:6.2f} tok/s", file=sys.stderr)
    hf = statistics.median(results["hf"]) if "hf" in results else None
    if results:
        print_table(results, hf, args.tokens)
    if "hf" in new_ids:
        for engine, rows in new_ids.items():
            if engine != "hf" and len(rows) == 1:
                same = sum(a == b for a, b in zip(rows[0], new_ids["hf"][0]))
                print(f"{engine}: {same} of {len(rows[0])} greedy tokens equal transformers' "
                      f"({len(set(rows[0]))} distinct)")
    if "gptforge-batch8" in new_ids and "gptforge-seq8" in new_ids:
        same = new_ids["gptforge-batch8"] == new_ids["gptforge-seq8"]
        ratio = statistics.median(results["gptforge-batch8"]) / statistics.median(results["gptforge-seq8"])
        print(f"8 prompts of {min(map(len, BATCH_PROMPTS))}-{max(map(len, BATCH_PROMPTS))} characters: "
              f"one batched call {ratio:.2f}x the tokens/s of one call per prompt; "
              f"greedy tokens {'identical' if same else 'DIFFERENT'}")
    if args.bandwidth:
        bandwidth()
    if args.trained_run:
        print("\nint8 vs float32 perplexity on The Verdict's validation text:")
        print(json.dumps(perplexity_check(args.trained_run), indent=2))


def print_table(results: dict[str, list[float]], hf: float | None, tokens: int) -> None:
    print(f"\n{tokens} new tokens per prompt, gpt2-small float32 weights, median of runs "
          f"(batch 1 unless named batch8/seq8)\n")
    print("| engine | tokens/s (median) | runs | vs transformers |")
    print("| --- | --- | --- | --- |")
    for engine, values in results.items():
        med = statistics.median(values)
        ratio = f"{med / hf:.2f}x" if hf else "n/a"
        print(f"| {engine} | {med:.2f} | {', '.join(f'{v:.1f}' for v in values)} | {ratio} |")


if __name__ == "__main__":
    main()
