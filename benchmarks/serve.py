"""Benchmark `gptforge serve`: requests/s and time to first token at 1, 4 and 16 concurrent clients.

Starts `gptforge serve` in its own process on 127.0.0.1 (so the clients here do not
share its interpreter), sends a fixed number of streamed completion requests at
each concurrency level, prints a Markdown table and stops the server. With
--options it does that once per server setting, a fresh server each: "plain",
"int8" (--quantize int8), "draft" (--draft MODEL) and "int8+draft".

    PYTHONPATH=src python benchmarks/serve.py                    # a small random model
    PYTHONPATH=src python benchmarks/serve.py --model gpt2-small --requests 32 --max-tokens 64
    PYTHONPATH=src python benchmarks/serve.py --model RUN --draft DRAFT_RUN --options plain int8 draft int8+draft

Without --model it builds a small random GPT (4 layers, 256 wide, 256 positions)
in a temporary directory; the numbers measure serving, not the text's quality.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def build_small_model(out: Path) -> Path:
    import torch

    from gptforge.checkpoint import save_model
    from gptforge.config import GPTConfig
    from gptforge.model import GPTModel

    torch.manual_seed(0)
    cfg = GPTConfig(context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0)
    return save_model(GPTModel(cfg), out / "small-random", task="lm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPTIONS = {"plain": [], "int8": ["--quantize", "int8"], "draft": ["draft"],
           "int8+draft": ["--quantize", "int8", "draft"]}


def start_server(model: str, port: int, device: str, max_active: int,
                 threads: int | None, extra: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "gptforge.cli", "serve", "--model", model, "--port", str(port),
           "--device", device, "--max-active", str(max_active), "--timeout", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd + list(extra), env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not start within 180 s")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


async def run_level(base: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    prompts = [f"Request {i}: the history of the printing press began" for i in range(n_requests)]
    pending = list(reversed(prompts))
    results: list[dict] = []

    async with httpx.AsyncClient(base_url=base, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker() -> None:
            while pending:
                results.append(await one_request(client, pending.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
        "latency_p50_ms": 1000 * statistics.median(r["latency"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model to serve (default: a small random GPT)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="the server's PyTorch CPU threads")
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), default=["plain"],
                   help="server settings to compare, a fresh server each (default: plain)")
    p.add_argument("--draft", default=None, help="the draft model of the 'draft' options")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if any("draft" in o for o in args.options) and not args.draft:
        p.error("the draft options need --draft MODEL")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_small_model(Path(tmp)))
        for option in args.options:
            extra = [x for flag in OPTIONS[option] for x in (["--draft", args.draft] if flag == "draft" else [flag])]
            port = free_port()
            server = start_server(model, port, args.device, max(args.concurrency), args.threads, extra)
            base = f"http://127.0.0.1:{port}"
            try:
                asyncio.run(run_level(base, 1, 2, args.max_tokens))  # warm-up
                rows += [{"option": option, **asyncio.run(run_level(base, c, args.requests, args.max_tokens))}
                         for c in args.concurrency]
            finally:
                server.terminate()
                server.wait(timeout=30)

    threads = args.threads or "PyTorch's default"
    print(f"\nmodel: {args.model or 'small random GPT (4 layers, 256 wide)'}, draft: {args.draft}, "
          f"device: {args.device}, server threads: {threads}, {args.requests} streamed requests x "
          f"{args.max_tokens} tokens per level, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| server | clients | requests/s | tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | latency p50 (ms) |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['option']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['latency_p50_ms']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
