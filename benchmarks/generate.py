"""Generation speed: gptforge (KV cache, no cache, int8) against Hugging Face transformers.

Both load the same random gpt2-small weights (written once with `save_pretrained`);
gptforge through its public API only (`gptforge.load` + `gptforge.generate`).
Every measurement runs in its own process, the engines alternate round by round, and
the median tokens/s per engine is reported with its ratio to transformers.

    python benchmarks/generate.py --rounds 3 --tokens 100 [--bandwidth] [--trained-run runs/gpt2-small-verdict]

With --peers (or peer names in --engines), other CPU engines run on the same weights, each
optional and skipped with a message when its package is missing (notes: docs/peers.md):
CTranslate2 ("ct2" float32, "ct2-int8" int8_float32, converted by its TransformersConverter)
and llama.cpp through llama-cpp-python, on GGUF files written by llama.cpp's own
convert_hf_to_gguf.py ("llama.cpp" f32, "llama.cpp-q8_0"; needs --llama-cpp-src, a llama.cpp
source tree) and by `gptforge convert --to gguf` ("llama.cpp-gptforge", "llama.cpp-gptforge-q8_0").
Every engine gets the same prompt ids and, with --threads, the same thread count (default:
PyTorch's own count, which the peers are then given explicitly):

    python benchmarks/generate.py --engines hf gptforge gptforge-int8 --peers --llama-cpp-src DIR \
        --rounds 3 --tokens 100

With --trained-run, also compares int8 and float32 perplexity on The Verdict's
validation text (the last 10%) for a model trained by gptforge: float32, per-channel int8
(`quantize_int8`) and the per-tensor dynamic int8 of `torch.ao.quantization` it replaced.

With --int8, it compares instead float32, that old dynamic int8 and `quantize_int8` in one
process, alternating round by round at the same thread count, on random gpt2-small and
Qwen3-0.6B-shaped models (--int8-layers N keeps the first N blocks of each):

    python benchmarks/generate.py --int8 --rounds 3 --tokens 50 [--int8-layers 8]

With --family, it compares instead gptforge and transformers on random models of the
released shapes of Qwen3 / Llama 3 presets, in each dtype of --dtype:

    python benchmarks/generate.py --family qwen3-0.6b llama-3.2-1b --dtype float32 bfloat16 --rounds 3 --tokens 100

For each (preset, dtype) the weights are written once, by transformers' `save_pretrained`
from a seeded random Qwen3ForCausalLM / LlamaForCausalLM in that dtype (in a process of its
own, into a temporary folder deleted after that preset's rounds), then each round runs
transformers (`from_pretrained(dtype=..., attn_implementation="sdpa")` + `generate(...,
do_sample=False)`) and gptforge (`gptforge.load(dir, dtype=...)` + `gptforge.generate`), each in
a fresh process, batch 1, the same fixed prompt ids. It prints the median tokens/s, the ratio
to transformers, how many greedy tokens agree, each process's peak RSS and its thread count.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    make_family_weights,
    make_gpt2_small_weights,
    make_peer_checkpoint,
    own_peak_rss_mib,
    peak_rss_mib,
    run_json,
    run_worker,
)

PROMPT = "Every effort moves you"


# The prompt of the --family runs: 13 fixed ids, arbitrary but inside every family's
# vocabulary (random weights come with no tokenizer).
FAMILY_PROMPT_IDS = [791, 3925, 315, 279, 3363, 12302, 449, 264, 2678, 17516, 389, 279, 15140]
FAMILY_ENGINES = ["hf", "gptforge"]
FAMILY_NAMES = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]
DTYPES = ["float32", "bfloat16"]

# Other engines on the same gpt2-small weights: engine -> (the Python package it needs, the
# weights' format and converter). Each runs from a file converted once before the rounds.
PEERS = {
    "ct2": ("ctranslate2", "float32, TransformersConverter"),
    "ct2-int8": ("ctranslate2", "int8_float32, TransformersConverter"),
    "llama.cpp": ("llama_cpp", "GGUF f32, llama.cpp's convert_hf_to_gguf.py"),
    "llama.cpp-q8_0": ("llama_cpp", "GGUF q8_0, llama.cpp's convert_hf_to_gguf.py"),
    "llama.cpp-gptforge": ("llama_cpp", "GGUF f32, gptforge convert --to gguf"),
    "llama.cpp-gptforge-q8_0": ("llama_cpp", "GGUF q8_0, gptforge convert --to gguf"),
}


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


def worker(engine: str, weights: str, tokens: int, threads: int | None = None) -> dict:
    """Load, warm up, then time one generation of `tokens` new tokens.

    gptforge runs as a Python API user calls it: `gptforge.load` + `gptforge.generate`,
    nothing else. "gptforge-batch8" generates for all of BATCH_PROMPTS in one call,
    "gptforge-seq8" for each of them in turn; both report new tokens per second.
    `threads` (--threads) sets torch's thread count; without it, PyTorch's own.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
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
        elif engine == "gptforge-int8-dynamic":
            model = dynamic_int8(model)
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


def peer_worker(engine: str, artifact: str, tokens: int, threads: int, prompt_ids: list[int]) -> dict:
    """One peer measurement: load the converted weights `artifact`, warm up, then time one
    greedy generation of exactly `tokens` new tokens after `prompt_ids`, on `threads` threads.

    Two figures: `tokens_per_s`, new tokens over the whole call (the prompt's pass included,
    as for the hf and gptforge engines), and `decode_tokens_per_s`, the tokens after the first
    over the time after the first token came (the prompt excluded).

    - CTranslate2: `Generator(intra_threads=threads, inter_threads=1)` with the compute type
      of the conversion, `generate_tokens(max_length=min_length=tokens, sampling_topk=1)`;
      like transformers' `min_new_tokens`, `min_length` masks the end token until then.
    - llama.cpp: `Llama(n_threads=n_threads_batch=threads)`, a float32 KV cache (as gptforge's),
      the prompt evaluated in one batch, then one token at a time; each next token is the
      argmax of the last logits (gptforge's greedy rule, no end token).
    """
    import numpy as np

    start = time.perf_counter()
    if engine.startswith("ct2"):
        import ctranslate2

        version = f"ctranslate2 {ctranslate2.__version__}"
        compute_type = "int8_float32" if engine == "ct2-int8" else "float32"
        generator = ctranslate2.Generator(artifact, device="cpu", compute_type=compute_type,
                                          intra_threads=threads, inter_threads=1)
        vocab = json.loads((Path(artifact) / "vocabulary.json").read_text())
        prompt = [vocab[i] for i in prompt_ids]

        def steps(n):
            for step in generator.generate_tokens(prompt, max_length=n, min_length=n, sampling_topk=1):
                yield step.token_id
    else:
        import llama_cpp

        version = f"llama-cpp-python {llama_cpp.__version__}"
        llm = llama_cpp.Llama(artifact, n_threads=threads, n_threads_batch=threads,
                              n_ctx=len(prompt_ids) + max(tokens, 5) + 1, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
        n_vocab = llm.n_vocab()

        def argmax() -> int:
            logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

        def steps(n):
            llm.reset()
            llm.eval(prompt_ids)
            token = argmax()
            yield token
            for _ in range(n - 1):
                llm.eval([token])
                token = argmax()
                yield token
    load_s = time.perf_counter() - start
    list(steps(5))  # warm-up: first-call allocations, kernel selection

    start = time.perf_counter()
    new, first = [], None
    for token in steps(tokens):
        new.append(token)
        first = first or time.perf_counter()
    end = time.perf_counter()
    assert len(new) == tokens, (engine, len(new))
    return {"engine": engine, "version": version, "tokens_per_s": tokens / (end - start),
            "decode_tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 else None,
            "new_ids": [new], "threads": threads, "peak_rss_mib": own_peak_rss_mib(), "load_s": load_s,
            "artifact_mib": size_mib(Path(artifact))}


def size_mib(path: Path) -> float:
    """The size of a file, or of every file in a folder, in MiB."""
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 2**20


def prepare_peers(engines: list[str], weights: Path, tmp: Path, llama_cpp_src: str | None) -> dict[str, Path]:
    """Convert `weights` once for each peer engine asked for; returns engine -> converted file.

    An engine whose package (or, for llama.cpp's own converter, --llama-cpp-src) is missing is
    left out with a message on stderr saying what to install.
    """
    peers = [e for e in engines if e in PEERS]
    missing = {pkg for pkg in {PEERS[e][0] for e in peers} if importlib.util.find_spec(pkg) is None}
    install = {"ctranslate2": "pip install ctranslate2",
               "llama_cpp": "pip install llama-cpp-python (builds llama.cpp; see docs/peers.md)"}
    converter = Path(llama_cpp_src or "") / "convert_hf_to_gguf.py"
    ready: dict[str, Path] = {}
    checkpoint = None
    for engine in peers:
        package = PEERS[engine][0]
        if package in missing:
            print(f"skipping {engine}: the {package} package is not installed ({install[package]})", file=sys.stderr)
            continue
        if engine in ("llama.cpp", "llama.cpp-q8_0") and not (llama_cpp_src and converter.is_file()):
            print(f"skipping {engine}: it needs llama.cpp's convert_hf_to_gguf.py; pass --llama-cpp-src, a llama.cpp "
                  "source tree (e.g. vendor/llama.cpp of the llama-cpp-python sdist)"
                  + (f"; {converter} does not exist" if llama_cpp_src else ""), file=sys.stderr)
            continue
        if checkpoint is None and "gptforge" not in engine:  # gptforge converts `weights` as they are
            checkpoint = make_peer_checkpoint(weights, tmp / "gpt2-small-peer")
        start = time.perf_counter()
        if engine.startswith("ct2"):
            from ctranslate2.converters import TransformersConverter

            out = tmp / engine
            quantization = "int8_float32" if engine == "ct2-int8" else "float32"
            TransformersConverter(str(checkpoint)).convert(str(out), quantization=quantization, force=True)
        else:
            gguf_type = "q8_0" if engine.endswith("q8_0") else "f32"
            out = tmp / f"{engine}.gguf"
            if "gptforge" in engine:
                command = ["-m", "gptforge.cli", "convert", str(weights), str(out), "--to", "gguf",
                           "--gguf-type", gguf_type]
            else:
                command = [str(converter), str(checkpoint), "--outfile", str(out), "--outtype", gguf_type]
            done = subprocess.run([sys.executable, *command], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
        print(f"  {engine}: converted in {time.perf_counter() - start:.0f} s ({PEERS[engine][1]})", file=sys.stderr)
        ready[engine] = out
    return ready


def family_worker(engine: str, weights: str, tokens: int, dtype_name: str, threads: int | None) -> dict:
    """One --family measurement: load the random weights in `dtype_name`, warm up, time one
    greedy generation of `tokens` new tokens at batch 1. gptforge runs `load` + `generate`
    only; transformers runs `from_pretrained` (sdpa attention) + `generate`."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    ids = torch.tensor([FAMILY_PROMPT_IDS])
    start = time.perf_counter()
    if engine == "hf":
        import transformers
        from transformers import AutoModelForCausalLM

        version = f"transformers {transformers.__version__}"
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa").eval()
        mask = torch.ones_like(ids)

        def run(n):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False)[0, ids.shape[1]:].tolist()
    elif engine == "gptforge":
        import gptforge

        version = f"gptforge {getattr(gptforge, '__version__', '')}".strip()
        model = gptforge.load(weights, dtype=dtype)

        def run(n):
            return gptforge.generate(model, ids, n)[0, ids.shape[1]:].tolist()
    else:
        raise SystemExit(f"unknown --family engine {engine!r}; choose from {', '.join(FAMILY_ENGINES)}")
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    run(5)  # warm-up: first-call allocations, kernel selection, gptforge's decode layout
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    new = run(tokens)
    seconds = time.perf_counter() - start
    assert len(new) == tokens, (engine, len(new))
    return {"engine": engine, "version": version, "torch": torch.__version__, "tokens_per_s": tokens / seconds,
            "new_ids": [new], "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib(),
            "load_s": load_s, "warmup_s": warmup_s, "generate_s": seconds}


def family_benchmark(script: str, names: list[str], dtypes: list[str], rounds: int, tokens: int,
                     threads: int | None) -> None:
    """The --family comparison: for each preset and dtype, write the weights once, then
    alternate the engines round by round, each run in a fresh process; print a table each."""
    extra = ["--tokens", str(tokens)] + (["--threads", str(threads)] if threads else [])
    for name in names:
        for dtype in dtypes:
            warn_if_short_of_memory(name, dtype)
            with tempfile.TemporaryDirectory(prefix=f"gptforge-bench-{name}-{dtype}-") as tmp:
                weights = Path(tmp) / f"{name}-random-{dtype}"
                start = time.perf_counter()
                made = run_json(script, "--write-weights", name, "--weights", str(weights), "--dtype", dtype)
                print(f"{name} {dtype}: wrote {made['parameters'] / 1e9:.2f}B random parameters "
                      f"({made['bytes'] / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s, "
                      f"writer peak RSS {made['peak_rss_mib'] / 1024:.2f} GiB", file=sys.stderr)
                records: dict[str, list[dict]] = {}
                for _ in range(rounds):
                    for engine in FAMILY_ENGINES:
                        start = time.perf_counter()
                        record = run_worker(script, engine, weights, "--worker-dtype", dtype, *extra)
                        record["wall_s"] = time.perf_counter() - start
                        records.setdefault(engine, []).append(record)
                        print(f"  {name} {dtype} {engine:9s} {record['tokens_per_s']:7.2f} tok/s  "
                              f"peak RSS {record['peak_rss_mib'] / 1024:5.2f} GiB  {record['threads']} threads  "
                              f"load {record['load_s']:.1f} s, warm-up {record['warmup_s']:.1f} s, "
                              f"generate {record['generate_s']:.1f} s, process {record['wall_s']:.0f} s",
                              file=sys.stderr)
            print_family_table(name, dtype, tokens, made, records)


def warn_if_short_of_memory(name: str, dtype: str) -> None:
    """A warning where a run may not fit: on 2026-12-02 gptforge's float32 process peaked at about
    3x the weights' size (its decode layout), transformers' and the writer's at about 1.1-1.4x."""
    from gptforge.families import DecoderConfig

    size = DecoderConfig.from_name(name).num_parameters() * (4 if dtype == "float32" else 2)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 3 * size > 0.9 * total:
        print(f"warning: {name} in {dtype} holds {size / 2**30:.1f} GiB of weights; a run may need about "
              f"{3 * size / 2**30:.0f} GiB of this machine's {total / 2**30:.0f} GiB", file=sys.stderr)


def print_family_table(name: str, dtype: str, tokens: int, made: dict, records: dict[str, list[dict]]) -> None:
    hf = statistics.median(r["tokens_per_s"] for r in records["hf"])
    print(f"\n{name} shape, random weights ({made['parameters'] / 1e9:.2f}B parameters), {dtype}; batch 1, "
          f"prompt of {len(FAMILY_PROMPT_IDS)} ids, {tokens} new tokens, greedy; torch {records['hf'][0]['torch']}; "
          f"median of {len(records['hf'])} rounds, each run in its own process\n")
    print("| engine | tokens/s (median) | runs | vs transformers | peak RSS (max of runs) | threads |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for engine, runs in records.items():
        speeds = [r["tokens_per_s"] for r in runs]
        med = statistics.median(speeds)
        label = runs[0]["version"] + (" (sdpa)" if engine == "hf" else ", load + generate")
        threads = "/".join(sorted({str(r["threads"]) for r in runs}))
        rss = max(r["peak_rss_mib"] for r in runs) / 1024
        print(f"| {label} | {med:.2f} | {', '.join(f'{v:.1f}' for v in speeds)} | {med / hf:.2f}x | "
              f"{rss:.2f} GiB | {threads} |")
    reference = records["hf"][0]["new_ids"][0]
    for engine, runs in records.items():
        if len({json.dumps(r["new_ids"]) for r in runs}) > 1:
            print(f"{engine}: greedy tokens DIFFER between its own rounds")
        if engine == "hf":
            continue
        mine = runs[0]["new_ids"][0]
        same = sum(a == b for a, b in zip(mine, reference))
        diverge = next((i for i, (a, b) in enumerate(zip(mine, reference)) if a != b), None)
        where = "identical" if diverge is None else f"first difference at new token {diverge + 1}"
        print(f"{engine}: {same} of {len(mine)} greedy tokens equal transformers' ({where}; "
              f"{len(set(mine))} distinct)")


def dynamic_int8(model):
    """gptforge's int8 before `quantize_int8` (kept here as the reference it replaced): PyTorch's
    deprecated dynamic quantization, one scale per weight tensor, activations quantized per call."""
    import copy
    import warnings

    import torch
    from torch import nn

    from gptforge.generate import plain_linears

    copied = plain_linears(copy.deepcopy(model.to("cpu").eval()))  # it swaps exact nn.Linear only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copied, {nn.Linear}, dtype=torch.qint8, inplace=True)


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
    dynamic = evaluate_string(dynamic_int8(model), val)["perplexity"]
    return {"fp32_ppl": fp32, "int8_ppl": int8, "relative_change": int8 / fp32 - 1,
            "dynamic_int8_ppl": dynamic, "dynamic_relative_change": dynamic / fp32 - 1}


def int8_benchmark(rounds: int, tokens: int, layers: int | None) -> None:
    """--int8: float32, the old dynamic int8 and `quantize_int8` on random models, in this one
    process, alternating round by round; prints tokens/s ratios to float32 and greedy agreement."""
    import torch

    import gptforge
    from gptforge import GPTConfig, GPTModel
    from gptforge.decoder import DecoderModel
    from gptforge.families import DecoderConfig
    from gptforge.quantize import quantize_int8

    extra = {} if layers is None else {"n_layers": layers}
    shapes = [("gpt2-small", lambda: GPTModel(GPTConfig.from_name("gpt2-small", drop_rate=0.0, **extra))),
              ("qwen3-0.6b", lambda: DecoderModel(DecoderConfig.from_name("qwen3-0.6b", **extra)))]
    ids = torch.tensor([FAMILY_PROMPT_IDS])
    for name, build in shapes:
        torch.manual_seed(0)
        base = build().eval()
        models = {"float32": base, "int8 dynamic (old)": dynamic_int8(base), "int8 per-channel": quantize_int8(base)}
        speeds: dict[str, list[float]] = {k: [] for k in models}
        new_ids = {}
        for label, model in models.items():
            gptforge.generate(model, ids, 5)  # warm-up: the decode layout, kernel selection
        for _ in range(rounds):
            for label, model in models.items():
                start = time.perf_counter()
                out = gptforge.generate(model, ids, tokens)[0, ids.shape[1]:].tolist()
                speeds[label].append(tokens / (time.perf_counter() - start))
                new_ids[label] = out
        n_layers = base.cfg.n_layers
        print(f"\n{name} shape, random weights, {n_layers} layers; batch 1, {len(FAMILY_PROMPT_IDS)} prompt ids, "
              f"{tokens} new tokens, greedy; {torch.get_num_threads()} threads; one process, {rounds} "
              f"alternating rounds; ratios of median tokens/s\n")
        print("| weights | vs float32 | vs old int8 | greedy tokens equal to float32 |")
        print("| --- | ---: | ---: | ---: |")
        f32, old = statistics.median(speeds["float32"]), statistics.median(speeds["int8 dynamic (old)"])
        for label in models:
            med = statistics.median(speeds[label])
            same = sum(a == b for a, b in zip(new_ids[label], new_ids["float32"]))
            print(f"| {label} | {med / f32:.2f}x | {med / old:.2f}x | {same} of {tokens} |")
        del models, base


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
    p.add_argument("--family", nargs="+", choices=FAMILY_NAMES, default=None, metavar="PRESET",
                   help="compare on random models of these presets' shapes instead of gpt2-small "
                        f"(choices: {', '.join(FAMILY_NAMES)})")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bfloat16"],
                   help="with --family: the dtypes to write and load the weights in (default: bfloat16)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in every run, and the peers' thread count (default: PyTorch's own)")
    p.add_argument("--peers", action="store_true",
                   help=f"also run the other engines: {', '.join(PEERS)} (see docs/peers.md)")
    p.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"), metavar="DIR",
                   help="a llama.cpp source tree holding convert_hf_to_gguf.py, for the llama.cpp and "
                        "llama.cpp-q8_0 engines (default: $LLAMA_CPP_SRC)")
    p.add_argument("--int8", action="store_true",
                   help="compare float32, the old dynamic int8 and quantize_int8 in one process instead")
    p.add_argument("--int8-layers", type=int, default=None,
                   help="with --int8: keep this many blocks of each model (default: all)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_weights:
        print(json.dumps(make_family_weights(Path(args.weights), args.write_weights, args.dtype[0])))
        return
    if args.worker and args.worker_dtype:
        print(json.dumps(family_worker(args.worker, args.weights, args.tokens, args.worker_dtype, args.threads)))
        return
    if args.worker in PEERS:
        prompt_ids = [int(i) for i in args.prompt_ids.split(",")]
        print(json.dumps(peer_worker(args.worker, args.weights, args.tokens, args.threads, prompt_ids)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.tokens, args.threads)))
        return
    if args.int8:
        int8_benchmark(args.rounds, args.tokens, args.int8_layers)
        return
    if args.family:
        family_benchmark(__file__, args.family, args.dtype, args.rounds, args.tokens, args.threads)
        return

    engines = args.engines + [e for e in PEERS if args.peers and e not in args.engines]
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        from gptforge.tokenizer import get_tokenizer

        weights = Path(tmp) / "gpt2-small-random"
        make_gpt2_small_weights(weights)
        artifacts = prepare_peers(engines, weights, Path(tmp), args.llama_cpp_src)
        engines = [e for e in engines if e not in PEERS or e in artifacts]
        # The peers get what the torch engines use: the same prompt ids and thread count.
        prompt_ids = ",".join(map(str, get_tokenizer().encode(PROMPT)))
        peer_args = ["--threads", str(args.threads or torch.get_num_threads()), "--prompt-ids", prompt_ids]
        torch_args = ["--threads", str(args.threads)] if args.threads else []
        results: dict[str, list[float]] = {}
        new_ids: dict[str, list[int]] = {}  # each engine's greedy continuation
        peer_records: dict[str, list[dict]] = {}
        threads: dict[str, set[int]] = {}
        schedule = [e for _ in range(args.rounds) for e in engines]
        schedule += ["gptforge-nocache"] * args.nocache_rounds
        for engine in schedule:
            extra = peer_args if engine in PEERS else torch_args
            record = run_worker(__file__, engine, artifacts.get(engine, weights), "--tokens", str(args.tokens), *extra)
            results.setdefault(engine, []).append(record["tokens_per_s"])
            new_ids.setdefault(engine, record["new_ids"])
            threads.setdefault(engine, set()).add(record["threads"])
            if engine in PEERS:
                peer_records.setdefault(engine, []).append(record)
            print(f"  {engine:18s} {record['tokens_per_s']:6.2f} tok/s  {record['threads']} threads", file=sys.stderr)
    hf = statistics.median(results["hf"]) if "hf" in results else None
    if results:
        print_table(results, hf, args.tokens)
    if "hf" in new_ids:
        for engine, rows in new_ids.items():
            if engine != "hf" and len(rows) == 1:
                same = sum(a == b for a, b in zip(rows[0], new_ids["hf"][0]))
                print(f"{engine}: {same} of {len(rows[0])} greedy tokens equal transformers' "
                      f"({len(set(rows[0]))} distinct)")
    if peer_records:
        print_peer_table(peer_records, new_ids.get("gptforge"), args.tokens, int(peer_args[1]),
                         len(prompt_ids.split(",")))
        if len(set().union(*threads.values())) > 1:
            print("thread counts DIFFER between engines: "
                  + ", ".join(f"{e} {'/'.join(map(str, sorted(t)))}" for e, t in threads.items()))
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


def print_peer_table(records: dict[str, list[dict]], gptforge_ids: list[list[int]] | None, tokens: int,
                     threads: int, n_prompt: int) -> None:
    """The peers' own table: both speeds, the converted file, and greedy agreement with gptforge."""
    print(f"\nOther engines, the same weights converted once each; batch 1, {n_prompt} prompt ids, {tokens} new "
          f"tokens, greedy; {threads} thread(s) each; 'whole call' counts the prompt's pass as the table above "
          f"does, 'decode' the {tokens - 1} tokens after the first over the time after it came\n")
    print("| engine | weights | tokens/s whole call (median) | decode tokens/s (median) | file | peak RSS "
          "| greedy tokens equal gptforge's |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for engine, runs in records.items():
        whole = statistics.median(r["tokens_per_s"] for r in runs)
        decode = [r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"]]
        decode_text = f"{statistics.median(decode):.2f}" if decode else "n/a"
        mine = runs[0]["new_ids"][0]
        if gptforge_ids is None:
            agree = "n/a (run the gptforge engine too)"
        else:
            same = sum(a == b for a, b in zip(mine, gptforge_ids[0]))
            diverge = next((i for i, (a, b) in enumerate(zip(mine, gptforge_ids[0])) if a != b), None)
            agree = f"{same} of {len(mine)}" + ("" if diverge is None else f", first difference at token {diverge + 1}")
        print(f"| {engine} ({runs[0]['version']}) | {PEERS[engine][1]} | {whole:.2f} | {decode_text} | "
              f"{runs[0]['artifact_mib']:.0f} MiB | {max(r['peak_rss_mib'] for r in runs):.0f} MiB | {agree} |")
        if len({json.dumps(r["new_ids"]) for r in runs}) > 1:
            print(f"{engine}: greedy tokens DIFFER between its own rounds")


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
