"""Loading GPT-2 weights from OpenAI's and Hugging Face's formats, checked against transformers.

The reference is Hugging Face's GPT2LMHeadModel, which we did not write: random
models saved with its `save_pretrained` must load through our loader and give
the same logits, and what we save must load in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gptforge import load
from gptforge.config import GPTConfig
from gptforge.convert import convert
from gptforge.loader import detect_format
from gptforge.model import GPTModel
from gptforge.pretrained import flat_to_gptforge, gptforge_to_flat, read_openai_checkpoint, save_hf

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

TF_GPT2 = Path(__file__).parent / "fixtures" / "tf_gpt2_tiny"
SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_hf(tie: bool = True, seed: int = 0) -> GPT2LMHeadModel:
    """A small random Hugging Face GPT-2 with every weight, bias and norm randomized."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=101, n_positions=40, n_embd=32, n_layer=3, n_head=4,
                        bos_token_id=100, eos_token_id=100, tie_word_embeddings=tie)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "ln" in name and name.endswith("weight")
                    else 0.1 * torch.randn_like(p))
    return model


def hf_from_expected(expected: dict[str, np.ndarray]) -> GPT2LMHeadModel:
    """Build the transformers model for the TF fixture, copying OpenAI's variables by hand."""
    hp = json.loads((TF_GPT2 / "hparams.json").read_text())
    config = GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
                        n_layer=hp["n_layer"], n_head=hp["n_head"], bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    t = model.transformer
    with torch.no_grad():
        t.wte.weight.copy_(torch.from_numpy(expected["model/wte"]))
        t.wpe.weight.copy_(torch.from_numpy(expected["model/wpe"]))
        t.ln_f.weight.copy_(torch.from_numpy(expected["model/ln_f/g"]))
        t.ln_f.bias.copy_(torch.from_numpy(expected["model/ln_f/b"]))
        for i, block in enumerate(t.h):
            for module, tf_name in [(block.ln_1, "ln_1"), (block.ln_2, "ln_2")]:
                module.weight.copy_(torch.from_numpy(expected[f"model/h{i}/{tf_name}/g"]))
                module.bias.copy_(torch.from_numpy(expected[f"model/h{i}/{tf_name}/b"]))
            convs = [(block.attn.c_attn, "attn/c_attn"), (block.attn.c_proj, "attn/c_proj"),
                     (block.mlp.c_fc, "mlp/c_fc"), (block.mlp.c_proj, "mlp/c_proj")]
            for module, tf_name in convs:
                module.weight.copy_(torch.from_numpy(expected[f"model/h{i}/{tf_name}/w"][0]))
                module.bias.copy_(torch.from_numpy(expected[f"model/h{i}/{tf_name}/b"]))
    return model


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int = 10) -> list[int]:
    ids = prompt
    for _ in range(steps):
        next_id = logits_of(model, ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def assert_same_parameters(a: GPTModel, b: GPTModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# Hugging Face -> gptforge ---------------------------------------------------------------------

def test_hf_model_gives_same_logits_and_greedy_text(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert not ours.training and ours.out_head.weight is ours.emb.tok.weight
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))
    assert (logits_of(ours, ids) - logits_of(hf, ids)).abs().max() <= 1e-4
    prompt = ids[:1, :5]
    assert greedy(ours, prompt) == greedy(hf, prompt)


def test_gpt2_small_full_size_logits(tmp_path):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # 124M parameters, random
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.cfg == GPTConfig.from_name("gpt2-small", drop_rate=0.0)
    ids = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(2))
    assert (logits_of(ours, ids) - logits_of(hf, ids)).abs().max() <= 1e-4


def test_bare_safetensors_file_with_config_beside_it(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    assert detect_format(tmp_path / "model.safetensors") == "hf"
    bare = load(tmp_path / "model.safetensors")
    assert_same_parameters(bare, load(tmp_path))


def test_sharded_hf_checkpoint(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf.save_pretrained(tmp_path / "single")
    sharded, single = load(tmp_path / "sharded"), load(tmp_path / "single")
    assert_same_parameters(sharded, single)


def test_untied_lm_head(tmp_path):
    hf = tiny_hf(tie=False)
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert not ours.cfg.tie_weights
    assert not torch.equal(ours.out_head.weight, ours.emb.tok.weight)
    ids = torch.randint(0, 101, (1, 12))
    assert (logits_of(ours, ids) - logits_of(hf, ids)).abs().max() <= 1e-4


def test_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The files on the Hub have no `transformer.` prefix and carry attn.bias buffers."""
    hf = tiny_hf()
    (tmp_path / "new").mkdir()
    hf.save_pretrained(tmp_path / "new")
    state = {k.removeprefix("transformer."): v.contiguous().clone()
             for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(3):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(40, 40)).view(1, 1, 40, 40)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    (tmp_path / "hub").mkdir()
    save_file(state, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    hf.config.to_json_file(tmp_path / "hub" / "config.json")
    assert_same_parameters(load(tmp_path / "hub"), load(tmp_path / "new"))


def test_dtype_conversion_keeps_the_head_tied(tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    ours = load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.out_head.weight is ours.emb.tok.weight


# OpenAI (TensorFlow) -> gptforge --------------------------------------------------------------

def test_tf_fixture_and_hf_copy_load_identically(tmp_path):
    expected = dict(np.load(TF_GPT2 / "expected.npz"))
    hf = hf_from_expected(expected)
    hf.save_pretrained(tmp_path)
    from_tf, from_hf = load(TF_GPT2), load(tmp_path)
    assert from_tf.cfg == from_hf.cfg
    assert_same_parameters(from_tf, from_hf)
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(3))
    assert (logits_of(from_tf, ids) - logits_of(hf, ids)).abs().max() <= 1e-4


def test_openai_reader_gives_flat_conv1d_weights():
    cfg, flat = read_openai_checkpoint(TF_GPT2)
    sizes = (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers)
    assert sizes == (96, 32, 12, 3, 2)
    assert cfg.qkv_bias and cfg.tie_weights and cfg.drop_rate == 0.0
    assert flat["h.1.attn.c_attn.weight"].shape == (12, 36)
    assert flat["h.0.mlp.c_proj.weight"].shape == (48, 12)
    expected = np.load(TF_GPT2 / "expected.npz")
    assert np.array_equal(flat["h.1.ln_2.weight"], expected["model/h1/ln_2/g"])


def test_loading_imports_neither_tensorflow_nor_transformers():
    code = ("import sys; from gptforge import load; "
            f"load({str(TF_GPT2)!r}); "
            "print(sorted(m for m in ('tensorflow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_hparams_that_do_not_match_the_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for file in TF_GPT2.iterdir():
        (ckpt / file.name).write_bytes(file.read_bytes())
    hp = json.loads((ckpt / "hparams.json").read_text())
    (ckpt / "hparams.json").write_text(json.dumps({**hp, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing h\.2\.attn\.c_attn\.bias"):
        load(ckpt)
    (ckpt / "hparams.json").write_text(json.dumps({**hp, "n_vocab": 100}))
    with pytest.raises(ValueError, match=r"wte\.weight has shape \[96, 12\], expected \[100, 12\]"):
        load(ckpt)


# gptforge -> Hugging Face and gptforge formats ----------------------------------------------------

def test_convert_tf_to_hf_loads_in_transformers(tmp_path):
    out = convert(TF_GPT2, tmp_path / "hf", to="hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours = load(TF_GPT2)
    ids = torch.randint(0, 96, (2, 20))
    assert (logits_of(hf, ids) - logits_of(ours, ids)).abs().max() <= 1e-4
    assert_same_parameters(load(out), ours)


def test_convert_to_gptforge_round_trips(tmp_path):
    out = convert(TF_GPT2, tmp_path / "ours", to="gptforge")
    assert detect_format(out) == "gptforge"
    assert_same_parameters(load(out), load(TF_GPT2))


def test_convert_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="gptforge, hf"):
        convert(TF_GPT2, tmp_path, to="onnx")


@pytest.mark.parametrize("qkv_bias, tie", [(False, False), (True, True)])
def test_save_hf_of_our_model(tmp_path, qkv_bias, tie):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=80, context_length=24, emb_dim=16, n_heads=2, n_layers=2,
                    drop_rate=0.0, qkv_bias=qkv_bias, tie_weights=tie)
    model = GPTModel(cfg).eval()
    save_hf(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 80, (2, 24))
    assert (logits_of(hf, ids) - logits_of(model, ids)).abs().max() <= 1e-4


def test_save_hf_refuses_a_replaced_head(tmp_path):
    model = GPTModel(GPTConfig(vocab_size=80, context_length=24, emb_dim=16, n_heads=2, n_layers=1))
    model.out_head = torch.nn.Linear(16, 2, bias=False)  # e.g. a classifier
    with pytest.raises(ValueError, match="out_head.weight is not tied"):
        save_hf(model, tmp_path)


# The name map ---------------------------------------------------------------------------------

SMALL = GPTConfig(vocab_size=50, context_length=16, emb_dim=8, n_heads=2, n_layers=2)


def test_flat_round_trip_and_transposes():
    model = GPTModel(SMALL)
    flat = gptforge_to_flat(model.state_dict(), SMALL)
    assert flat["h.0.attn.c_attn.weight"].shape == (8, 24)  # Conv1D [in, out]
    assert flat["h.1.mlp.c_proj.weight"].shape == (32, 8)
    assert "lm_head.weight" not in flat
    state = flat_to_gptforge(flat, SMALL)
    assert state["out_head.weight"] is state["emb.tok.weight"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_missing_unexpected_and_misshapen_tensors_are_named():
    flat = gptforge_to_flat(GPTModel(SMALL).state_dict(), SMALL)
    missing = {k: v for k, v in flat.items() if k != "h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"missing h\.1\.mlp\.c_fc\.bias"):
        flat_to_gptforge(missing, SMALL)
    with pytest.raises(ValueError, match=r"unexpected h\.9\.attn\.c_attn\.weight"):
        flat_to_gptforge({**flat, "h.9.attn.c_attn.weight": flat["h.0.attn.c_attn.weight"]}, SMALL)
    wrong = {**flat, "h.0.attn.c_attn.weight": flat["h.0.attn.c_attn.weight"].t()}
    message = r"h\.0\.attn\.c_attn\.weight has shape \[24, 8\], expected \[8, 24\]"
    with pytest.raises(ValueError, match=message):
        flat_to_gptforge(wrong, SMALL)
    state = GPTModel(SMALL).state_dict()
    message = r"missing blocks\.0\.norm2\.bias.*unexpected blocks\.0\.norm3\.bias"
    with pytest.raises(ValueError, match=message):
        gptforge_to_flat({("blocks.0.norm3.bias" if k == "blocks.0.norm2.bias" else k): v
                          for k, v in state.items()}, SMALL)
    with pytest.raises(ValueError, match=r"final_norm\.weight has shape \[9\]"):
        gptforge_to_flat({**state, "final_norm.weight": torch.ones(9)}, SMALL)


def test_hf_checkpoint_missing_a_tensor(tmp_path):
    hf = tiny_hf()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if k not in ("lm_head.weight", "transformer.h.1.ln_2.bias")}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"missing h\.1\.ln_2\.bias"):
        load(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"model_type": "mamba"}, "'mamba' model; gptforge loads the model types gpt2, llama"),
    ({"model_type": "llama"}, "llama model lacks or garbles 'num_attention_heads'"),
    ({"n_inner": 100}, "n_inner=100"),
])
def test_unsupported_hf_configs(tmp_path, change, message):
    tiny_hf().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


# Finding the source ---------------------------------------------------------------------------

def test_unknown_source_says_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a preset name.*hparams.json.*config.json"):
        load(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="gptforge.json.*hparams.json.*config.json"):
        load(tmp_path)  # exists, but empty


@pytest.mark.parametrize("name, fmt, size", [("124M", "openai", "124M"),
                                             ("gpt2-small", "openai", "124M"),
                                             ("gpt2-xl", "hf", "1558M")])
def test_preset_names_download_first(monkeypatch, tmp_path, name, fmt, size):
    calls = []

    def fake_download(size_arg, fmt_arg):
        calls.append((size_arg, fmt_arg))
        return TF_GPT2

    monkeypatch.setattr("gptforge.download.download_gpt2", fake_download)
    monkeypatch.chdir(tmp_path)  # so that no local directory shadows the name
    model = load(name, download_format=fmt)
    assert calls == [(size, fmt)]
    assert model.cfg.vocab_size == 96
