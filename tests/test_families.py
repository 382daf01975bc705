"""Llama 3, Qwen3 (and Qwen2) and Gemma 3, checked against transformers.

The reference is transformers' own LlamaForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM
and Gemma3ForCausalLM, which we did not write: small random models saved with their
`save_pretrained` (float32 and bfloat16, one file and sharded) must load through
`gptforge.load` and give the same logits and greedy tokens, and what we write must load
in transformers. The rest are properties: cached == uncached decoding, a batch == its
rows alone, presets == the released models' shapes and sizes, int8 and LoRA on these models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import gptforge
from gptforge.convert import convert
from gptforge.decoder import DecoderModel
from gptforge.families import FAMILY_PRESETS, DecoderConfig
from gptforge.finetune.lora import LoRALinear, apply_lora, merge_lora
from gptforge.quantize import Int8Linear, quantize_int8

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)  # short, so that most frequencies are scaled
GEMMA_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
WINDOW = 8  # Gemma's sliding window here: the long prompts (40+ tokens) reach far past it

# name -> (transformers config, the DecoderConfig fields it must load as)
VARIANTS: dict[str, tuple[object, dict]] = {
    "llama3-tied-gqa2-scaled": (
        LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_parameters=LLAMA3_ROPE),
        dict(arch="llama3", n_heads=4, n_kv_heads=2, head_dim=16, tie_weights=True, qk_norm=False, qkv_bias=False,
             rope_base=500_000.0, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_context_length": 32})),
    "llama3-untied-mha": (
        LlamaConfig(**{**COMMON, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=4,
                    tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=500_000.0)),
        dict(arch="llama3", n_layers=3, n_heads=4, n_kv_heads=4, tie_weights=False, rope_scaling=None)),
    "qwen3-tied-gqa4": (
        Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0)),
        dict(arch="qwen3", n_heads=4, n_kv_heads=1, head_dim=32, tie_weights=True, qk_norm=True, qkv_bias=False,
             rope_base=1_000_000.0)),
    "qwen2-bias-untied": (
        Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        dict(arch="qwen3", n_heads=4, n_kv_heads=2, head_dim=16, tie_weights=False, qk_norm=False, qkv_bias=True)),
    "gemma3-sliding": (
        Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW, rope_parameters=GEMMA_ROPE,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        dict(arch="gemma3", n_layers=3, n_heads=4, n_kv_heads=1, head_dim=32, tie_weights=True, qk_norm=True,
             gemma_norms=True, embed_scale=True, query_scale=24.0, sliding_window=WINDOW,
             layer_types=["sliding", "full", "sliding"], rope_base=1_000_000.0, rope_local_base=10_000.0,
             rope_scaling={"type": "linear", "factor": 8.0})),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "gemma3_text": "Gemma3ForCausalLM"}
LAYOUTS = ("float32", "float32-sharded", "bfloat16", "bfloat16-sharded")
LENGTHS = (1, 5, 17, 40)  # prompts of a batch; 40 > Gemma's window of 8


@dataclass
class Family:
    name: str
    hf: torch.nn.Module  # the transformers model, float32
    dirs: dict[str, Path]  # layout -> its save_pretrained directory
    ours: DecoderModel  # loaded through gptforge.load from the float32 directory, float32

    def fresh(self) -> DecoderModel:
        """Another copy of our float32 model, for tests that change it."""
        return gptforge.load(self.dirs["float32"], dtype=torch.float32)


def _random_hf(config) -> torch.nn.Module:
    """A transformers model of `config` with every weight random, norms included (Gemma's
    norms are stored as offsets from 1, the others as the scale itself)."""
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASSES[config.model_type])(copy.deepcopy(config))
    offset = 0.0 if config.model_type == "gemma3_text" else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(offset + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """`families(name)`: the Family of VARIANTS[name], built and saved once for this module."""
    built: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in built:
            hf = _random_hf(VARIANTS[name][0])
            root = tmp_path_factory.mktemp(name)
            dirs = {layout: root / layout for layout in LAYOUTS}
            for layout, folder in dirs.items():
                dtype = torch.bfloat16 if layout.startswith("bfloat16") else torch.float32
                shard = {"max_shard_size": "40KB"} if layout.endswith("sharded") else {}
                copy.deepcopy(hf).to(dtype).save_pretrained(folder, **shard)
            built[name] = Family(name, hf, dirs, gptforge.load(dirs["float32"], dtype=torch.float32))
        return built[name]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def family(request, families) -> Family:
    return families(request.param)


def _ids(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _prompts(seed: int = 2) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _same_weights(model: DecoderModel, cfg: DecoderConfig) -> DecoderModel:
    """A model of `cfg` holding `model`'s weights."""
    other = DecoderModel(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


# ------------------------------------------------------------------------------------
# loading transformers' checkpoints

@pytest.mark.parametrize("layout", ["float32", "float32-sharded"])
def test_float32_checkpoints_give_transformers_logits(family, layout):
    folder = family.dirs[layout]
    assert (folder / "model.safetensors.index.json").is_file() == layout.endswith("sharded")
    ours = gptforge.load(folder, dtype=torch.float32)
    assert ours.emb.tok.weight.dtype == torch.float32
    assert (ours.out_head.weight is ours.emb.tok.weight) == ours.cfg.tie_weights
    ids = _ids(3, 48)
    assert (_logits(ours, ids) - _logits(family.hf, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["bfloat16", "bfloat16-sharded"])
def test_bfloat16_checkpoints_load_in_bfloat16_close_to_transformers(family, layout):
    ours = gptforge.load(family.dirs[layout])  # these families default to bfloat16
    assert ours.emb.tok.weight.dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(family.dirs[layout], dtype=torch.bfloat16).eval()
    ids = _ids(4, 48)
    got, want, exact = _logits(ours, ids), _logits(ref, ids), _logits(family.hf, ids)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.02 * scale  # transformers in the same precision
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.99
    assert (got - exact).abs().max() <= 0.05 * scale  # and the float32 model it was rounded from


def test_read_run_gives_the_decoder_config(family):
    expected = VARIANTS[family.name][1]
    for layout in LAYOUTS:
        cfg = gptforge.read_run(family.dirs[layout]).model
        assert isinstance(cfg, DecoderConfig)
        assert cfg == family.ours.cfg, layout
    cfg = family.ours.cfg
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.vocab_size, cfg.emb_dim, cfg.hidden_dim, cfg.context_length) == (VOCAB, 64, 128, 128)
    assert cfg.num_parameters() == family.ours.num_parameters() == sum(p.numel() for p in family.hf.parameters())


def test_rope_scaling_and_sliding_window_change_the_logits(families):
    """The scaled RoPE and the window are not no-ops here, so the logit checks above test them."""
    ids = _ids(2, 48)
    for name in ("llama3-tied-gqa2-scaled", "gemma3-sliding"):
        ours = families(name).ours
        unscaled = _same_weights(ours, ours.cfg.replace(rope_scaling=None))
        assert (_logits(unscaled, ids) - _logits(ours, ids)).abs().max() > 0.1, name
    gemma = families("gemma3-sliding").ours
    unwindowed = _same_weights(gemma, gemma.cfg.replace(sliding_window=1000))
    diff = (_logits(unwindowed, ids) - _logits(gemma, ids)).abs().amax(dim=(0, 2))  # per position
    assert diff[:WINDOW].max() <= 1e-5  # a query sees no further back than the window anyway
    assert diff[WINDOW:].min() > 0.1


# ------------------------------------------------------------------------------------
# generation

def test_greedy_tokens_match_transformers_generate(family):
    prompts = _ids(2, 5, seed=3)
    want = family.hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=50,
                              do_sample=False)
    assert want.shape == (2, 55)
    assert torch.equal(gptforge.generate(family.ours, prompts, 50), want)


def test_cached_and_uncached_generation_agree(family):
    prompts = _prompts()
    cached = gptforge.generate(family.ours, prompts, 20, use_cache=True)
    assert [len(row) for row in cached] == [n + 20 for n in LENGTHS]
    assert gptforge.generate(family.ours, prompts, 20, use_cache=False) == cached


def test_a_batch_of_prompts_of_different_lengths_generates_what_each_does_alone(family):
    prompts = _prompts()
    alone = [gptforge.generate(family.ours, [p], 20)[0] for p in prompts]
    assert gptforge.generate(family.ours, prompts, 20) == alone
    # and the longest alone is transformers' greedy continuation
    longest = torch.tensor([prompts[-1]])
    want = family.hf.generate(longest, attention_mask=torch.ones_like(longest), max_new_tokens=20, do_sample=False)
    assert alone[-1] == want[0].tolist()


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_stepwise_forward_with_a_cache_equals_the_full_forward(family, impl):
    model = _same_weights(family.ours, family.ours.cfg.replace(attn_impl=impl))
    ids = _ids(2, 44)
    full = _logits(model, ids)
    assert (full - _logits(family.ours, ids)).abs().max() <= 1e-4
    cache, start, pieces = model.new_cache(2), 0, []
    # a short prefill, then single tokens across Gemma's window of 8, then chunks: 44 in all
    for size in (3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 8, 1, 17):
        with torch.no_grad():
            pieces.append(model(ids[:, start:start + size], cache, positions=start).float())
        start += size
    assert start == ids.shape[1]
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-4
    # rows at different positions: row 1 two tokens behind row 0
    cache = model.new_cache(2)
    with torch.no_grad():
        model(ids[:, :30], cache, positions=0)
        step = model(torch.stack([ids[0, 30:31], ids[1, 28:29]]), cache, positions=torch.tensor([30, 28]))
    assert (step[0, -1] - full[0, 30]).abs().max() <= 1e-4
    assert (step[1, -1] - full[1, 28]).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------
# writing checkpoints back

def test_converted_to_hf_loads_in_transformers_with_equal_logits(family, tmp_path):
    out = convert(family.dirs["float32-sharded"], tmp_path / "hf", to="hf", dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == type(family.hf).__name__
    assert back.dtype == torch.float32
    assert back.config.tie_word_embeddings == family.ours.cfg.tie_weights
    ids = _ids(2, 48)
    assert (_logits(back, ids) - _logits(family.hf, ids)).abs().max() <= 1e-4
    # and it reads back through gptforge as the same model
    assert gptforge.read_run(out).model == family.ours.cfg
    assert torch.equal(_logits(gptforge.load(out, dtype=torch.float32), ids), _logits(family.ours, ids))
    # bfloat16 stays bfloat16, the same numbers
    out16 = convert(family.dirs["bfloat16"], tmp_path / "hf16", to="hf")
    back16 = AutoModelForCausalLM.from_pretrained(out16, dtype=torch.bfloat16).eval()
    ref16 = AutoModelForCausalLM.from_pretrained(family.dirs["bfloat16"], dtype=torch.bfloat16).eval()
    assert torch.equal(_logits(back16, ids), _logits(ref16, ids))


def test_converted_to_gptforge_loads_again_equal(family, tmp_path):
    out = convert(family.dirs["float32"], tmp_path / "gf", to="gptforge", dtype=torch.float32)
    assert (out / "gptforge.json").is_file()
    assert gptforge.read_run(out).model == family.ours.cfg
    again = gptforge.load(out)
    ids = _ids(2, 48)
    assert torch.equal(_logits(again, ids), _logits(family.ours, ids))
    back = AutoModelForCausalLM.from_pretrained(convert(out, tmp_path / "hf", to="hf")).eval()
    assert (_logits(back, ids) - _logits(family.hf, ids)).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------
# presets

# The released models' config.json (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, head_dim, intermediate_size, vocab_size, tie_word_embeddings) and
# their parameter counts, a tied head counted once.
RELEASED = {
    "llama-3.2-1b": ((2048, 16, 32, 8, 64, 8192, 128_256, True), 1_235_814_400),
    "llama-3.2-3b": ((3072, 28, 24, 8, 128, 8192, 128_256, True), 3_212_749_824),
    "llama-3.1-8b": ((4096, 32, 32, 8, 128, 14_336, 128_256, False), 8_030_261_248),
    "qwen3-0.6b": ((1024, 28, 16, 8, 128, 3072, 151_936, True), 596_049_920),
    "qwen3-1.7b": ((2048, 28, 16, 8, 128, 6144, 151_936, True), None),
    "qwen3-4b": ((2560, 36, 32, 8, 128, 9728, 151_936, True), None),
    "qwen3-8b": ((4096, 36, 32, 8, 128, 12_288, 151_936, False), None),
    "gemma-3-270m": ((640, 18, 4, 1, 256, 2048, 262_144, True), 268_098_176),
    "gemma-3-1b": ((1152, 26, 4, 1, 256, 6912, 262_144, True), 999_885_952),
}
# Qwen3's model cards: parameters and non-embedding parameters, in billions, as rounded there.
QWEN3_CARDS = {"qwen3-0.6b": ("0.6", "0.44"), "qwen3-1.7b": ("1.7", "1.4"), "qwen3-4b": ("4.0", "3.6"),
               "qwen3-8b": ("8.2", "6.95")}


def _billions(n: int, like: str) -> str:
    """`n` in billions, rounded to as many decimals as `like` has."""
    return f"{n / 1e9:.{len(like.split('.')[1])}f}"


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_preset_parameter_count_is_the_built_models(name):
    cfg = DecoderConfig.from_name(name)
    with torch.device("meta"):
        model = DecoderModel(cfg)
    assert cfg.num_parameters() == model.num_parameters()
    odd = cfg.replace(qkv_bias=not cfg.qkv_bias, tie_weights=not cfg.tie_weights, n_layers=2)
    with torch.device("meta"):
        assert odd.num_parameters() == DecoderModel(odd).num_parameters()


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_presets_have_the_released_models_shapes(name):
    base = name.removesuffix("-instruct")
    shape, count = RELEASED[base]
    cfg = DecoderConfig.from_name(name)
    repo = FAMILY_PRESETS[name][2]
    assert cfg == DecoderConfig.from_name(repo)  # by its Hub repository too
    assert gptforge.read_run(name).model == gptforge.read_run(repo).model == cfg  # with no download
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
            cfg.vocab_size, cfg.tie_weights) == shape
    if count is not None:
        assert cfg.num_parameters() == count
    if base in QWEN3_CARDS:
        total, non_embedding = QWEN3_CARDS[base]
        embeddings = cfg.vocab_size * cfg.emb_dim * (1 if cfg.tie_weights else 2)
        assert _billions(cfg.num_parameters(), total) == total
        assert _billions(cfg.num_parameters() - embeddings, non_embedding) == non_embedding
    if cfg.arch == "llama3":
        factor = 8.0 if base == "llama-3.1-8b" else 32.0
        assert cfg.rope_scaling == {"type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_context_length": 8192}
        assert (cfg.rope_base, cfg.context_length, cfg.norm_eps) == (500_000.0, 131_072, 1e-5)
    elif cfg.arch == "qwen3":
        assert (cfg.rope_base, cfg.rope_scaling, cfg.qk_norm, cfg.qkv_bias) == (1_000_000.0, None, True, False)
    else:
        assert (cfg.sliding_window, cfg.query_scale, cfg.context_length) == (512, 256.0, 32_768)
        assert (cfg.rope_base, cfg.rope_local_base, cfg.rope_scaling) == (1_000_000.0, 10_000.0, None)
        assert [cfg.layer_type(i) for i in range(12)] == (["sliding"] * 5 + ["full"]) * 2


# ------------------------------------------------------------------------------------
# int8 and LoRA on these models

def test_int8_quantization_keeps_most_greedy_tokens(family):
    model = family.fresh()
    quantized = quantize_int8(model)
    assert isinstance(quantized.blocks[0].attn.q, Int8Linear)
    assert type(model.blocks[0].attn.q) is not type(quantized.blocks[0].attn.q)  # the original is left alone
    ids = _ids(4, 48)
    want, got = _logits(model, ids), _logits(quantized, ids)
    assert (got - want).norm() / want.norm() <= 0.15
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.7  # teacher-forced next tokens
    out = gptforge.generate(quantized, _prompts(), 10)
    assert [len(row) for row in out] == [n + 10 for n in LENGTHS]


def test_lora_trains_only_adapters_and_merges_to_the_same_logits(family):
    model = family.fresh().train()
    ids = _ids(2, 24)
    before_logits = _logits(model.eval(), ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=2.0)
    wrapped = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert wrapped == 7 * model.cfg.n_layers + (0 if model.cfg.tie_weights else 1)
    assert torch.equal(_logits(model.eval(), ids), before_logits)  # B starts at zero
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".A", ".B")) for name in trainable)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    base = {k.replace(".base.", "."): v for k, v in after.items() if not k.endswith((".A", ".B"))}
    assert base.keys() == before.keys()
    assert all(torch.equal(base[k], before[k]) for k in before)
    assert all(after[k].abs().max() > 0 for k in after if k.endswith(".B"))  # every adapter moved

    wrapped_logits = _logits(model.eval(), ids)
    assert (wrapped_logits - before_logits).abs().max() > 1e-3
    merged = merge_lora(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert (_logits(merged, ids) - wrapped_logits).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------
# the real models (needs the internet)

@pytest.mark.network
@pytest.mark.parametrize("repo", ["Qwen/Qwen3-0.6B", "HuggingFaceTB/SmolLM2-135M"])
def test_hub_model_continues_a_prompt_as_transformers_does(repo):
    from transformers import AutoTokenizer

    from gptforge.loader import resolve

    ours = gptforge.load(repo, dtype=torch.float32)  # downloads through huggingface_hub
    folder = resolve(repo)  # the same files, now in the Hub's cache
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)("The capital of France is", return_tensors="pt").input_ids
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    got = gptforge.generate(ours, ids, 20)
    assert want.shape[1] > ids.shape[1]
    assert torch.equal(got[:, :want.shape[1]], want)  # transformers may stop early at its end-of-text token
