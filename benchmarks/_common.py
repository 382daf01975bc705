"""Pieces shared by the benchmarks that compare gptforge with transformers."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# The decoder families the generation benchmark writes random weights for:
# gptforge arch -> (transformers config class, transformers model class).
FAMILY_CLASSES = {"llama3": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def make_gpt2_small_weights(directory: Path) -> None:
    """Random gpt2-small weights (seeded), saved by transformers for both engines to load."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(123)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def transformers_config(name: str, dtype: str):
    """The transformers config (LlamaConfig / Qwen3Config) of a gptforge family preset's shape.

    Built field by field from `DecoderConfig.from_name(name)`, not through gptforge's own
    converter, so that the benchmark does not rely on the code it measures. No bos / eos /
    pad ids: the random model has no tokenizer, and an eos id would make transformers'
    `min_new_tokens` mask that token's logit (gptforge's `generate` stops at nothing by default).
    """
    import transformers

    from gptforge.families import DecoderConfig

    cfg = DecoderConfig.from_name(name)
    if cfg.arch not in FAMILY_CLASSES:
        raise SystemExit(f"{name}: the benchmark writes {', '.join(FAMILY_CLASSES)} models, not {cfg.arch}")
    if cfg.qkv_bias or cfg.qk_norm != (cfg.arch == "qwen3") or cfg.activation != "silu":
        raise SystemExit(f"{name}: a shape transformers' {FAMILY_CLASSES[cfg.arch][1]} cannot express")
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        assert s["type"] == "llama3", s
        rope.update(rope_type="llama3", factor=s["factor"], low_freq_factor=s["low_freq_factor"],
                    high_freq_factor=s["high_freq_factor"],
                    original_max_position_embeddings=s["original_context_length"])
    config_class = getattr(transformers, FAMILY_CLASSES[cfg.arch][0])
    return config_class(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_weights, attention_bias=False, hidden_act="silu", rope_parameters=rope,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype=dtype,
    )


def make_family_weights(directory: Path, name: str, dtype: str) -> dict:
    """Random (seeded) weights of preset `name`'s shape in `dtype`, built by transformers in
    that dtype (no float32 copy first) and saved with `save_pretrained` (one safetensors file).

    Checks that gptforge reads the written config.json back as the preset's own config.
    Returns the seconds taken, the process's peak RSS and the size on disk.
    """
    import torch
    import transformers

    from gptforge.families import DecoderConfig
    from gptforge.pretrained.hf_decoder import config_from_hf_decoder

    start = time.perf_counter()
    torch.manual_seed(123)
    config = transformers_config(name, dtype)
    model_class = getattr(transformers, FAMILY_CLASSES[DecoderConfig.from_name(name).arch][1])
    model = model_class._from_config(config, dtype=getattr(torch, dtype)).eval()
    n_params = sum(p.numel() for p in model.parameters())  # a tied head counted once
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    model.save_pretrained(directory)
    del model
    read_back = config_from_hf_decoder(json.loads((Path(directory) / "config.json").read_text()))
    want = DecoderConfig.from_name(name)
    diff = {k: (v, want.to_dict()[k]) for k, v in read_back.to_dict().items() if v != want.to_dict()[k]}
    if diff:
        raise SystemExit(f"{name}: gptforge reads the written config.json differently (got, preset): {diff}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "parameters": n_params,
            "bytes": sum(f.stat().st_size for f in Path(directory).iterdir())}


def run_json(*args: str) -> dict:
    """Run `python ARGS` in a fresh process and return the JSON of its last stdout line;
    on failure, raise with the tail of its stderr (a process killed for memory shows as -9)."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(script: str, engine: str, weights: Path, *args: str) -> dict:
    """Run `script --worker ENGINE --weights W ARGS` in a fresh process; return its JSON line."""
    return run_json(script, "--worker", engine, "--weights", str(weights), *args)


def make_peer_checkpoint(weights: Path, directory: Path) -> Path:
    """The Hugging Face directory `weights` as other engines' converters read it, in `directory`.

    The same weight file (linked, not copied), plus what CTranslate2's and llama.cpp's
    converters read and transformers' `save_pretrained` of a bare model does not write:
    GPT-2's tokenizer under Hugging Face's names (vocab.json and merges.txt are OpenAI's
    encoder.json and vocab.bpe) and, in config.json, `n_ctx` (llama.cpp's GPT-2 converter
    reads the context length from this key, which the released gpt2 config.json carries).
    """
    import shutil

    from gptforge.download import download

    directory.mkdir(parents=True, exist_ok=True)
    for path in weights.iterdir():
        if path.name != "config.json":
            (directory / path.name).symlink_to(path.resolve())
    config = json.loads((weights / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(download("gpt2-encoder", progress=False), directory / "vocab.json")
    shutil.copyfile(download("gpt2-vocab", progress=False), directory / "merges.txt")
    return directory


def own_peak_rss_mib() -> float:
    """This process's peak resident memory in MiB, counted from its own start (Linux's VmHWM).

    Unlike `peak_rss_mib`: ru_maxrss carries over through fork + exec, so a worker started by
    a parent holding 1.4 GiB reports at least 1.4 GiB there; VmHWM belongs to the process's
    own address space, which exec replaces.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")
