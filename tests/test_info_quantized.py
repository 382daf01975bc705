"""`gptforge info`'s int8 figures against what quantize_int8 really makes of a model."""

import pytest
import torch

from gptforge import GPTConfig, GPTModel
from gptforge.checkpoint import save_model
from gptforge.decoder import DecoderModel
from gptforge.families import DecoderConfig
from gptforge.info import int8_footprint, model_info
from gptforge.quantize import Int8Linear, quantize_int8


def _gpt(tie: bool) -> GPTModel:
    return GPTModel(GPTConfig(vocab_size=500, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                              drop_rate=0.0, tie_weights=tie))


def _decoder(tie: bool) -> DecoderModel:
    cfg = DecoderConfig.from_name("qwen3-0.6b", n_layers=2, emb_dim=64, hidden_dim=128, n_heads=4,
                                  n_kv_heads=2, head_dim=16, vocab_size=500, tie_weights=tie)
    return DecoderModel(cfg)


def _stored_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("build", [_gpt, _decoder], ids=["GPTModel", "DecoderModel"])
def test_footprint_matches_the_quantized_model(build, tie):
    model = build(tie).to(torch.bfloat16)
    assert (model.out_head.weight is model.emb.tok.weight) == tie
    footprint = int8_footprint(model)
    q = quantize_int8(model)
    int8_layers = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert isinstance(q.out_head, Int8Linear)  # a tied head is quantized too
    assert footprint.layers == len(int8_layers)
    assert footprint.parameters == sum(m.weight.numel() for m in int8_layers)
    assert footprint.n_bytes == _stored_bytes(q)


def test_info_counts_a_tied_head_as_quantized(tmp_path):
    # A head large enough next to the rest that leaving it out shows at two decimals of a GiB.
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=512, n_heads=4, n_layers=1,
                    drop_rate=0.0, tie_weights=True)
    model = GPTModel(cfg)
    save_model(model, tmp_path / "m")
    info = model_info(str(tmp_path / "m"))
    q = quantize_int8(model.to(torch.bfloat16))
    int8_layers = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert q.out_head in int8_layers
    codes = sum(m.weight.numel() for m in int8_layers)
    assert info["int8-quantized linear layers"] == f"{len(int8_layers)} ({codes:,} parameters, output head included)"
    assert info["weights int8 (linear layers)"] == f"{_stored_bytes(q) / 2**30:.2f} GiB"
