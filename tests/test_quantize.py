"""int8 weight-only quantization: quality against float32 on a trained model, per-channel
scales, both model classes, no deprecated PyTorch API, inference only."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptforge import GPTConfig, GPTModel, generate
from gptforge.decoder import DecoderModel
from gptforge.errors import BadInputError
from gptforge.families import DecoderConfig
from gptforge.quantize import Int8Linear, per_channel_int8, quantize_int8
from gptforge.tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(fetch):
    """A tiny GPT trained for a few hundred steps on The Verdict's first 90%, over only the
    token ids the text uses (remapped to 0..V-1, so the head is small and training quick),
    with the remapped training and validation ids (the first 90% and the last 10%)."""
    torch.manual_seed(0)
    text = fetch("the-verdict").read_text(encoding="utf-8")
    raw = get_tokenizer().encode(text)
    vocab = {t: i for i, t in enumerate(sorted(set(raw)))}
    ids = torch.tensor([vocab[t] for t in raw])
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    cfg = GPTConfig(vocab_size=len(vocab), context_length=64, emb_dim=64, n_heads=4, n_layers=2,
                    drop_rate=0.0, tie_weights=False)
    model = GPTModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = cfg.context_length
    for _ in range(250):
        starts = torch.randint(0, len(train_ids) - T - 1, (8,))
        x = torch.stack([train_ids[s:s + T] for s in starts])  # (8, T)
        y = torch.stack([train_ids[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), train_ids, val_ids


def _perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    T = model.cfg.context_length
    n = (len(ids) - 1) // T
    x = ids[:n * T].view(n, T)
    y = ids[1:n * T + 1].view(n, T)
    with torch.inference_mode():
        return math.exp(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())


def test_trained_model_keeps_greedy_tokens_and_perplexity(trained):
    model, train_ids, val = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation (or any other) warning
        q = quantize_int8(model)
    assert all(not isinstance(m, nn.Linear) for m in q.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * 2 + 1  # blocks' layers and the head
    fp32_ppl, int8_ppl = _perplexity(model, val), _perplexity(q, val)
    assert _perplexity(model, train_ids) < 0.1 * model.cfg.vocab_size  # it did learn something
    assert abs(int8_ppl / fp32_ppl - 1) < 0.01, (fp32_ppl, int8_ppl)
    # Greedy decoding from a text the model has seen, where its choices are clear-cut: near
    # ties (common after so short a training) flip either way and change all that follows.
    prompt = train_ids[:8][None]
    want = generate(model, prompt, 64)[0, 8:]
    got = generate(q, prompt, 64)[0, 8:]
    assert (want == got).float().mean() >= 0.95
    # On unseen text, teacher-forced, so one early difference cannot carry over to the rest.
    with torch.inference_mode():
        window = val[:64 * 4].view(4, 64)
        same = (model(window).argmax(-1) == q(window).argmax(-1)).float().mean()
    assert same >= 0.95


def test_scales_are_per_output_channel():
    torch.manual_seed(0)
    layer = nn.Linear(64, 8)
    with torch.no_grad():
        layer.weight[3] *= 1000  # one row of large values
    codes, scales = per_channel_int8(layer.weight)
    assert codes.dtype == torch.int8 and scales.shape == (8,)
    error = (codes.float() * scales[:, None] - layer.weight).abs()  # (8, 64)
    others = [r for r in range(8) if r != 3]
    # Each row keeps its own precision: within half of its own step, far below the big row's.
    assert torch.all(error[others].amax(1) <= 0.5 * scales[others] * 1.0001)
    assert error[others].max() < 1e-3 * error[3].max() * 1000
    assert torch.equal(scales.bfloat16().float(), scales)  # the kernel takes them exactly
    q = Int8Linear(layer)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = layer(x)
    got = q(x)
    rel = (got - want).abs().amax(0) / want.abs().amax(0)  # per output column
    assert rel[others].max() < 0.02


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_int8_linear_matches_its_dequantized_weight(rows):
    layer = nn.Linear(96, 72)
    q = Int8Linear(layer)
    x = torch.randn(rows, 1, 96)
    want = F.linear(x, q.dequantized(), layer.bias.detach())
    got = q(x)
    assert got.shape == (rows, 1, 72) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2)
    assert torch.allclose(q(x.bfloat16()).float(), want, rtol=5e-2, atol=5e-2)


def _small_decoder() -> DecoderModel:
    cfg = DecoderConfig.from_name("qwen3-0.6b", n_layers=2, emb_dim=64, hidden_dim=128, n_heads=4,
                                  n_kv_heads=2, head_dim=16, vocab_size=500)
    return DecoderModel(cfg).eval()


@pytest.mark.parametrize("build", [
    lambda: GPTModel(GPTConfig(vocab_size=500, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                               drop_rate=0.0)).eval(),
    _small_decoder,
], ids=["GPTModel", "DecoderModel"])
def test_both_model_classes(build):
    model = build()
    ids = torch.randint(0, 500, (2, 12))
    with torch.inference_mode():
        want = model(ids)
    q = quantize_int8(model)
    assert type(q) is type(model)
    assert isinstance(q.out_head, Int8Linear) and q.out_head.weight.dtype == torch.int8
    assert q.emb.tok.weight.dtype == torch.float32  # embeddings stay as they were
    assert isinstance(model.out_head, nn.Linear)  # the original is left alone
    if model.cfg.tie_weights:
        assert model.out_head.weight is model.emb.tok.weight
    with torch.inference_mode():
        got = q(ids)
    assert (got - want).norm() / want.norm() < 0.05
    out = generate(q, [[1, 2, 3], [4, 5]], 6)
    assert [len(r) for r in out] == [9, 8]


def test_int8_models_are_for_inference():
    model = GPTModel(GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=1,
                               drop_rate=0.0))
    q = quantize_int8(model)
    assert not q.training
    with pytest.raises(BadInputError, match="inference only"):
        q.train()
    q.eval()  # allowed
    state = q.state_dict()
    assert state["out_head.weight"].dtype == torch.int8 and "out_head.scales" in state
    other = quantize_int8(GPTModel(model.cfg))
    other.load_state_dict(state)  # a quantized state dict loads into a quantized model
    ids = torch.randint(0, 300, (1, 8))
    with torch.inference_mode():
        assert torch.equal(other(ids), q(ids))
    with pytest.raises(RuntimeError, match="scales"):
        GPTModel(model.cfg).load_state_dict(state)  # ... and not into a float one
