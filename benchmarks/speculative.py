"""Speculative decoding against plain decoding, on a target and a draft trained here.

Both models are pretrained by `gptforge pretrain` on the same text (The Verdict by
default) with GPT-2's tokenizer: the target at GPT-2 small's shape (12 blocks of 768),
the draft at 2 blocks of 256. Existing runs can be given instead (--target, --draft).
Each round runs, each in a fresh process with the same thread count, plain greedy
decoding of the target (`gptforge.generate`) and speculative decoding with the draft
(`gptforge.speculative.speculative_generate`) on the same prompts, alternating; it
prints the median tokens/s of each, the speed-up, the share of draft tokens kept and
whether the tokens are identical (they must be).

    python benchmarks/speculative.py --rounds 3 --tokens 100 --threads 2 [--target RUN --draft RUN]

The prompts are the first words of paragraphs of the training text's validation part
(its last 10%): a model trained on a short text has seen its style, not these lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import peak_rss_mib, run_json

ENGINES = ["plain", "speculative"]


def prompts(n: int = 4, words: int = 8) -> list[str]:
    """The first `words` words of the first n paragraphs of The Verdict's last 10%."""
    from gptforge.download import download

    text = download("the-verdict", progress=False).read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9):]
    paragraphs = [p.split() for p in tail.split("\n\n") if len(p.split()) >= words]
    return [" ".join(p[:words]) for p in paragraphs[:n]]


def worker(engine: str, target: str, draft: str, tokens: int, draft_tokens: int, threads: int) -> dict:
    import time

    import torch

    torch.set_num_threads(threads)
    import gptforge
    from gptforge.speculative import SpeculationStats, speculative_generate
    from gptforge.tokenizer import get_tokenizer

    tok = get_tokenizer()
    big = gptforge.load(target)
    small = gptforge.load(draft) if engine == "speculative" else None
    stats = SpeculationStats()

    def run(ids: list[int], n: int) -> list[int]:
        if small is None:
            return gptforge.generate(big, [ids], n)[0]
        return speculative_generate(big, small, ids, n, draft_tokens=draft_tokens, stats=stats)

    run(tok.encode("Warm up"), 8)
    stats = SpeculationStats()
    outputs, elapsed, new = [], 0.0, 0
    for text in prompts():
        ids = tok.encode(text)
        start = time.perf_counter()
        out = run(ids, tokens)
        elapsed += time.perf_counter() - start
        new += len(out) - len(ids)
        outputs.append(out)
    return {"tokens_per_s": new / elapsed, "outputs": outputs, "acceptance": stats.acceptance,
            "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}


def train(out: Path, *shape: str) -> None:
    """Pretrain a model of `shape` (gptforge pretrain flags) on The Verdict into `out`."""
    from gptforge.cli import main

    if (out / "gptforge.json").is_file():
        return
    if main(["pretrain", "--out", str(out), *shape, "--no-progress"]):
        raise SystemExit(f"pretraining {out} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", help="a trained run (default: train runs/bench-spec-target)")
    parser.add_argument("--draft", help="a trained run (default: train runs/bench-spec-draft)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.target, args.draft, args.tokens, args.draft_tokens,
                                args.threads)))
        return
    target = Path(args.target or "runs/bench-spec-target")
    draft = Path(args.draft or "runs/bench-spec-draft")
    if not args.target:
        train(target, "--epochs", "10")  # the book's run: gpt2-small, context 256
    if not args.draft:
        train(draft, "--n-layers", "2", "--emb-dim", "256", "--n-heads", "4", "--epochs", "10")
    results: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:
            res = run_json(__file__, "--worker", engine, "--target", str(target), "--draft", str(draft),
                           "--tokens", str(args.tokens), "--draft-tokens", str(args.draft_tokens),
                           "--threads", str(args.threads))
            results[engine].append(res)
            print(f"round {r + 1} {engine:12s} {res['tokens_per_s']:7.2f} tokens/s", file=sys.stderr)
    plain = statistics.median(x["tokens_per_s"] for x in results["plain"])
    spec = statistics.median(x["tokens_per_s"] for x in results["speculative"])
    same = all(a["outputs"] == b["outputs"] for a, b in zip(results["plain"], results["speculative"]))
    print(f"target {target}, draft {draft}, {args.tokens} new tokens x {len(prompts())} prompts, "
          f"greedy, draft_tokens {args.draft_tokens}, {args.threads} threads each, "
          f"median of {args.rounds} rounds")
    print(f"plain        {plain:7.2f} tokens/s  peak RSS {results['plain'][0]['peak_rss_mib']:.0f} MiB")
    print(f"speculative  {spec:7.2f} tokens/s  peak RSS {results['speculative'][0]['peak_rss_mib']:.0f} MiB"
          f"  ({spec / plain:.2f}x; draft tokens kept: "
          f"{statistics.median(x['acceptance'] for x in results['speculative']):.0%})")
    print(f"identical tokens: {same}")


if __name__ == "__main__":
    main()
