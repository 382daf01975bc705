"""Exports other tools take unchanged: Hugging Face directories (transformers) and GGUF files.

The references are code gptforge did not write: transformers' pipeline, AutoTokenizer and
apply_chat_template for the Hugging Face directory; for GGUF, gguf-py's reader, its
dequantizer and its table of Hugging Face -> GGUF tensor names, applied to the Hugging Face
export of the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gptforge
from gptforge.checkpoint import RunMeta, save_model
from gptforge.convert import convert
from gptforge.families import DecoderConfig
from gptforge.hf_tokenizer import load_tokenizer, save_tokenizer_files
from gptforge.tokenizer import EOT_ID, get_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Every effort moves you"
ENTRIES = [
    {"instruction": "Rewrite the sentence in passive voice.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat."},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
]


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (norms too, around their neutral value), so that a misplaced,
    untransposed or unshifted tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            neutral = 0.0 if ("norm" in name and getattr(model.cfg, "gemma_norms", False)) else 1.0
            p.copy_(neutral + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    """A random GPT-2 with GPT-2's vocabulary, saved as a plain model and as Alpaca and Phi-3 instruct runs."""
    root = tmp_path_factory.mktemp("gpt2-export")
    cfg = gptforge.GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    model = _randomize(gptforge.GPTModel(cfg))
    dirs = {"lm": save_model(model, root / "lm")}
    for name in ("alpaca", "phi3"):
        dirs[name] = save_model(model, root / name, RunMeta(model=cfg, task="instruct", template=name))
    return dirs


def _family_dir(root: Path, tokenizer_dir: Path, cfg: DecoderConfig, template: str | None = None) -> Path:
    """A random family model with the real tokenizer of `tokenizer_dir`, as a gptforge directory."""
    from gptforge.decoder import DecoderModel

    model = _randomize(DecoderModel(cfg))
    meta = RunMeta(model=cfg, task="instruct", template=template) if template else None
    out = save_model(model, root, meta)
    save_tokenizer_files(load_tokenizer(tokenizer_dir), out)
    return out


QWEN3 = dict(arch="qwen3", vocab_size=151_936, context_length=128, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
             head_dim=16, hidden_dim=64, norm_eps=1e-6, rope_base=1_000_000.0, qk_norm=True, tie_weights=True)
# The Llama 3 fixture's tokenizer (built from llama.cpp's vocabulary) has one token past the release's 128256.
LLAMA3 = dict(arch="llama3", vocab_size=128_257, context_length=128, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
              head_dim=8, hidden_dim=64, norm_eps=1e-5, rope_base=500_000.0, tie_weights=False,
              rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_context_length": 32})


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory, tokenizer_dir):
    return _family_dir(tmp_path_factory.mktemp("qwen3") / "run", tokenizer_dir("qwen3"), DecoderConfig(**QWEN3),
                       template="chat")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, tokenizer_dir):
    return _family_dir(tmp_path_factory.mktemp("llama3") / "run", tokenizer_dir("llama3"), DecoderConfig(**LLAMA3))


def _first_paragraph(verdict_text: str) -> str:
    return verdict_text.split("\n\n")[0]


# ------------------------------------------------------------------------------------
# Hugging Face directories

def _ours_greedy(source: Path, prompt: str, n: int, export: Path) -> str:
    """gptforge's greedy continuation of `prompt`, stopped at the export's stop ids and
    decoded without special tokens, as the pipeline shows it."""
    from gptforge.generate import generate
    from gptforge.loader import tokenizer_for
    from gptforge.tokenizer import text_to_ids

    model = gptforge.load(source, dtype=torch.float32)
    tokenizer = tokenizer_for(source)
    stops = json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    ids = generate(model, [text_to_ids(prompt, tokenizer)], n, eos_id=stops)[0]
    specials = getattr(tokenizer, "special_tokens_set", {"<|endoftext|>"})
    return tokenizer.decode([i for i in ids if tokenizer.decode([i]) not in specials])


def test_gpt2_export_runs_in_a_pipeline_with_gptforges_greedy_text(gpt2_dirs, tmp_path):
    out = convert(gpt2_dirs["lm"], tmp_path / "hf", to="hf")
    pipe = transformers.pipeline("text-generation", str(out))
    got = pipe(PROMPT, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    want = _ours_greedy(gpt2_dirs["lm"], PROMPT, 12, out)
    assert got == want
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for data in (config, generation):
        assert (data["bos_token_id"], data["eos_token_id"], data["pad_token_id"]) == (EOT_ID, EOT_ID, EOT_ID)
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"


def test_gpt2_export_tokenizer_is_gpt2s_vocabulary(gpt2_dirs, tmp_path, verdict_text):
    out = convert(gpt2_dirs["lm"], tmp_path / "hf", to="hf")
    from gptforge.tokenizer import _load_files

    ours = get_tokenizer()
    encoder_json, vocab_bpe = _load_files(None)
    assert (out / "vocab.json").read_bytes() == encoder_json and (out / "merges.txt").read_bytes() == vocab_bpe
    # without tokenizer.json, a tokenizer is built from vocab.json + merges.txt
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (slow / name).write_bytes((out / name).read_bytes())
    for folder in (out, slow):
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        assert len(tok) == 50257
        assert tok.model_max_length == 64
        paragraph = _first_paragraph(verdict_text)
        assert tok(paragraph)["input_ids"] == ours.encode_ordinary(paragraph)
        assert tok(verdict_text)["input_ids"] == ours.encode_ordinary(verdict_text)
        assert tok("a<|endoftext|>b")["input_ids"] == ours.encode("a<|endoftext|>b", allowed_special="all")
        assert tok.decode(ours.encode_ordinary(paragraph)) == paragraph


@pytest.mark.needs_data("instruction-data")
@pytest.mark.parametrize("template", ["alpaca", "phi3"])
def test_gpt2_instruct_chat_template_renders_what_gptforge_trains_on(gpt2_dirs, tmp_path, fetch, template):
    from gptforge.finetune.instruct import encode_entry, encode_template_text
    from gptforge.finetune.templates import get_template, render_chat

    out = convert(gpt2_dirs[template], tmp_path / "hf", to="hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    ours, tmpl = get_tokenizer(), get_template(template)
    entries = ENTRIES + json.loads(fetch("instruction-data").read_text(encoding="utf-8"))[:20]
    for entry in entries:
        messages = ([{"role": "system", "content": entry["input"]}] if entry["input"] else []) + [
            {"role": "user", "content": entry["instruction"]}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == tmpl.prompt(entry) == render_chat(messages, tmpl)
        assert tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
            encode_template_text(tmpl.prompt(entry), tmpl, ours)
        answered = messages + [{"role": "assistant", "content": entry["output"]}]
        ids, _ = encode_entry(entry, tmpl, ours)
        assert tok.apply_chat_template(answered, return_dict=False) == ids + [EOT_ID]  # the collate adds the EOT
    # earlier turns become the input, as in gptforge's own chat
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Name a colour."}]
    assert tok.apply_chat_template(turns, tokenize=False) == render_chat(turns, tmpl)
    with pytest.raises(Exception, match="role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}], tokenize=False)


def test_small_vocabulary_gpt2_exports_without_a_tokenizer(tmp_path, caplog):
    cfg = gptforge.GPTConfig(vocab_size=96, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    src = save_model(gptforge.GPTModel(cfg), tmp_path / "small")
    out = convert(src, tmp_path / "hf", to="hf")
    assert not (out / "tokenizer.json").exists()
    assert "no tokenizer files" in caplog.text
    with pytest.raises(gptforge.errors.BadInputError, match="vocabulary of 96"):
        convert(src, tmp_path / "x.gguf", to="gguf")


def test_family_export_runs_in_a_pipeline_with_its_own_tokenizer(qwen3_dir, tokenizer_dir, tmp_path, verdict_text):
    out = convert(qwen3_dir, tmp_path / "hf", to="hf", dtype=torch.float32)
    ours = load_tokenizer(qwen3_dir)
    pipe = transformers.pipeline("text-generation", str(out))
    got = pipe(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert got == _ours_greedy(qwen3_dir, PROMPT, 8, out)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    paragraph = _first_paragraph(verdict_text)
    assert tok(paragraph)["input_ids"] == ours.encode_prompt(paragraph)
    assert tok.model_max_length == 128
    # A chat run: its template is the model's own, and <|im_end|> (which training appends) ends a reply first.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((out / "generation_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert generation["eos_token_id"][0] == im_end == config["eos_token_id"][0]
    assert set(generation["eos_token_id"]) == set(ours.eos_ids) | {im_end}
    assert generation["pad_token_id"] is not None
    messages = [{"role": "user", "content": "Name a colour."}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == \
        ours.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)


def test_llama_export_keeps_the_bos_and_all_stop_ids(llama3_dir, tmp_path):
    out = convert(llama3_dir, tmp_path / "hf", to="hf", dtype=torch.float32)
    ours = load_tokenizer(llama3_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello there")["input_ids"] == ours.encode_prompt("Hello there")
    assert tok("Hello there")["input_ids"][0] == 128000
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 128000
    assert {128001, 128008, 128009} <= set(generation["eos_token_id"])
    pipe = transformers.pipeline("text-generation", str(out))
    got = pipe(PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert got == _ours_greedy(llama3_dir, PROMPT, 6, out)


# ------------------------------------------------------------------------------------
# GGUF files

def _fields(reader) -> dict:
    """A GGUF file's metadata as Python values."""
    out = {}
    for name, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                out[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[name] = [field.parts[i].tolist()[0] for i in field.data]
        elif field.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[name] = field.parts[field.data[0]].tolist()[0]
    return out


def _values(tensor) -> np.ndarray:
    """A GGUF tensor as float32, in PyTorch's dimension order."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _expected_from_hf(hf_dir: Path, arch: str, n_layers: int, cfg) -> dict[str, np.ndarray]:
    """The tensors a GGUF file should hold, from the Hugging Face export, named by gguf-py's map."""
    from gptforge.gguf_export import permute_for_pairs

    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(model_arch, n_layers)
    expected = {}
    for hf_name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        t = tensor.float()
        if arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.T  # Conv1D's [in, out]
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            t = permute_for_pairs(t, cfg.n_heads if "q_proj" in hf_name else cfg.n_kv_heads)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            t = t + 1
        expected[name] = t.numpy()
    if arch == "gpt2" and "output.weight" not in expected:
        expected["output.weight"] = expected["token_embd.weight"]
    return expected


def _check_tensors(reader, expected: dict[str, np.ndarray], file_type: str) -> None:
    types = gguf.GGMLQuantizationType
    tensors = {t.name: t for t in reader.tensors}
    extra = set(tensors) - set(expected) - {"rope_freqs.weight"}
    assert set(expected) <= set(tensors) and not extra, (sorted(set(expected) - set(tensors)), sorted(extra))
    for name, want in expected.items():
        t = tensors[name]
        got = _values(t)
        assert got.shape == want.shape, name
        one_d = want.ndim == 1 or name == "position_embd.weight"
        if file_type == "f32" or one_d:
            assert t.tensor_type == types.F32, name
            assert np.array_equal(got, want), name
        elif file_type == "f16" or want.shape[-1] % 32:
            assert t.tensor_type == types.F16, name
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:
            assert t.tensor_type == types.Q8_0, name
            step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # a block's scale
            error = np.abs(got - want).reshape(-1, 32)
            # half a step, plus up to 127 steps times the float16 rounding of the scale (2^-11)
            assert (error <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all(), name


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
def test_gpt2_gguf_holds_every_tensor_and_the_tokenizer(gpt2_dirs, tmp_path, file_type):
    hf = convert(gpt2_dirs["alpaca"], tmp_path / "hf", to="hf")
    path = convert(gpt2_dirs["alpaca"], tmp_path / "model.gguf", to="gguf", gguf_type=file_type)
    assert path == tmp_path / "model.gguf" and not list(tmp_path.glob(".*.tmp"))
    reader = gguf.GGUFReader(path)
    cfg = gptforge.read_run(gpt2_dirs["alpaca"]).model
    _check_tensors(reader, _expected_from_hf(hf, "gpt2", cfg.n_layers, cfg), file_type)
    meta = _fields(reader)
    assert meta["general.architecture"] == "gpt2"
    assert meta["general.file_type"] == int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                                             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.block_count"],
            meta["gpt2.feed_forward_length"], meta["gpt2.attention.head_count"]) == (64, 32, 2, 128, 4)
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 == len(meta["tokenizer.ggml.token_type"])
    ours = get_tokenizer()
    assert tokens[EOT_ID] == "<|endoftext|>" and meta["tokenizer.ggml.token_type"][EOT_ID] == gguf.TokenType.CONTROL
    assert tokens[ours.encode_ordinary(" effort")[0]] == "\u0120effort"  # GPT-2's byte alphabet: Ġ is the space
    assert len(meta["tokenizer.ggml.merges"]) == 50000 and meta["tokenizer.ggml.merges"][0] == "\u0120 t"
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == EOT_ID
    assert meta["tokenizer.chat_template"] == json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize("file_type", ["f32", "q8_0"])
def test_qwen3_gguf_holds_every_tensor_and_the_tokenizer(qwen3_dir, tmp_path, file_type):
    hf = convert(qwen3_dir, tmp_path / "hf", to="hf", dtype=torch.float32)
    path = convert(qwen3_dir, tmp_path / "out", to="gguf", gguf_type=file_type)
    assert path == tmp_path / "out" / f"model-{file_type}.gguf"
    reader = gguf.GGUFReader(path)
    cfg = DecoderConfig(**QWEN3)
    _check_tensors(reader, _expected_from_hf(hf, "qwen3", cfg.n_layers, cfg), file_type)
    meta = _fields(reader)
    assert meta["general.architecture"] == "qwen3"
    assert (meta["qwen3.attention.head_count"], meta["qwen3.attention.head_count_kv"],
            meta["qwen3.attention.key_length"], meta["qwen3.attention.value_length"],
            meta["qwen3.feed_forward_length"], meta["qwen3.context_length"]) == (4, 2, 16, 16, 64, 128)
    assert meta["qwen3.rope.freq_base"] == 1_000_000.0
    assert meta["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    ours = load_tokenizer(qwen3_dir)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size  # padded past the tokenizer's own tokens, one per embedding
    assert meta["tokenizer.ggml.pre"] == "qwen2" and len(meta["tokenizer.ggml.merges"]) > 100_000
    im_end = ours._backend.token_to_id("<|im_end|>")
    assert tokens[im_end] == "<|im_end|>" and meta["tokenizer.ggml.token_type"][im_end] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.eos_token_id"] == im_end  # a chat run's reply ends there
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == ours.chat_template


def test_llama_gguf_reorders_q_and_k_for_rope_on_pairs(llama3_dir, tmp_path):
    """llama.cpp's Llama rotates neighbouring pairs; Hugging Face rotates halves. With the
    reordered q, pair-RoPE of the GGUF projection is the half-RoPE of gptforge's, reordered."""
    from gptforge.layers import apply_rope, rope_frequencies

    hf = convert(llama3_dir, tmp_path / "hf", to="hf", dtype=torch.float32)
    path = convert(llama3_dir, tmp_path / "m.gguf", to="gguf", gguf_type="f32")
    reader = gguf.GGUFReader(path)
    cfg = DecoderConfig(**LLAMA3)
    _check_tensors(reader, _expected_from_hf(hf, "llama", cfg.n_layers, cfg), "f32")
    tensors = {t.name: t for t in reader.tensors}
    ours = gptforge.load(llama3_dir, dtype=torch.float32)
    x = torch.randn(5, cfg.emb_dim)
    hd, pos = cfg.head_dim, torch.arange(5).float()
    inv = rope_frequencies(hd, cfg.rope_base, cfg.rope_scaling)
    # RoPE on halves, as gptforge and transformers do it
    angles = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    q = (x @ ours.blocks[0].attn.q.weight.T).view(5, cfg.n_heads, hd).transpose(0, 1)
    halves = apply_rope(q, angles.cos(), angles.sin())
    # RoPE on pairs, as llama.cpp's Llama does it, with llama.cpp's frequency divisors
    factors = torch.from_numpy(_values(tensors["rope_freqs.weight"]).copy())
    pair_freq = rope_frequencies(hd, cfg.rope_base) / factors
    qg = (x @ torch.from_numpy(_values(tensors["blk.0.attn_q.weight"]).copy()).T).view(5, cfg.n_heads, hd // 2, 2)
    a = pos[:, None, None] * pair_freq  # (T, 1, hd/2)
    even, odd = qg[..., 0], qg[..., 1]
    rotated = torch.stack([even * a.cos() - odd * a.sin(), even * a.sin() + odd * a.cos()], dim=-1)
    pairs = rotated.transpose(0, 1)  # (heads, T, hd/2, 2)
    assert torch.allclose(pairs[..., 0], halves[..., : hd // 2], atol=1e-5)
    assert torch.allclose(pairs[..., 1], halves[..., hd // 2:], atol=1e-5)
    meta = _fields(reader)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["llama.rope.dimension_count"] == hd
    assert meta["tokenizer.ggml.bos_token_id"] == 128000 and meta["tokenizer.ggml.add_bos_token"] is True
    assert "output.weight" in tensors  # an untied head


def test_gemma3_gguf_shifts_norms(tmp_path, tokenizer_dir):
    """Gemma's norms multiply by 1 + w; llama.cpp multiplies by the stored weight."""
    cfg = DecoderConfig(arch="gemma3", vocab_size=262_144, context_length=64, emb_dim=32, n_layers=2, n_heads=2,
                        n_kv_heads=1, head_dim=16, hidden_dim=64, activation="gelu_tanh", norm_eps=1e-6,
                        rope_base=1_000_000.0, rope_local_base=10_000.0, qk_norm=True, gemma_norms=True,
                        embed_scale=True, sliding_window=16, query_scale=16.0,
                        layer_types=["sliding", "full"], tie_weights=True)
    src = _family_dir(tmp_path / "gemma", tokenizer_dir("gemma4"), cfg)
    hf = convert(src, tmp_path / "hf", to="hf", dtype=torch.float32)
    path = convert(src, tmp_path / "g.gguf", to="gguf", gguf_type="f16")
    reader = gguf.GGUFReader(path)
    _check_tensors(reader, _expected_from_hf(hf, "gemma3", cfg.n_layers, cfg), "f16")
    meta = _fields(reader)
    assert meta["gemma3.attention.sliding_window"] == 16 and meta["gemma3.attention.key_length"] == 16
    assert meta["tokenizer.ggml.model"] in ("llama", "gpt2") and len(meta["tokenizer.ggml.tokens"]) == 262_144
    ours = load_tokenizer(src)
    assert meta["tokenizer.ggml.bos_token_id"] == ours._backend.token_to_id(ours.bos_token)
    unk = ours._backend.token_to_id("<unk>")
    assert meta.get("tokenizer.ggml.unknown_token_id") == unk and meta["tokenizer.ggml.tokens"][unk] == "<unk>"


def test_cli_converts_to_gguf(gpt2_dirs, tmp_path, capsys):
    from gptforge.cli import main

    out = tmp_path / "m.gguf"
    assert main(["convert", str(gpt2_dirs["lm"]), str(out), "--to", "gguf", "--gguf-type", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _fields(gguf.GGUFReader(out))["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_qwen_with_biases_is_written_as_qwen2(tmp_path, tokenizer_dir):
    cfg = DecoderConfig(**{**QWEN3, "n_layers": 1, "qk_norm": False, "qkv_bias": True, "tie_weights": False})
    src = _family_dir(tmp_path / "qwen2", tokenizer_dir("qwen3"), cfg)
    hf = convert(src, tmp_path / "hf", to="hf", dtype=torch.float32)
    assert json.loads((hf / "config.json").read_text())["model_type"] == "qwen2"
    reader = gguf.GGUFReader(convert(src, tmp_path / "q.gguf", to="gguf", gguf_type="f32"))
    _check_tensors(reader, _expected_from_hf(hf, "qwen2", cfg.n_layers, cfg), "f32")
    meta = _fields(reader)
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= {
        t.name for t in reader.tensors}
