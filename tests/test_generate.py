import pytest
import torch
from torch import nn

from gptforge import GPTModel, generate, generate_stream, sample, stream_text
from gptforge.generate import filter_logits


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(1)
    return GPTModel(tiny_cfg).eval()


def test_greedy_cache_equals_no_cache_past_the_context(model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 10))
    n = 2 * tiny_cfg.context_length  # runs well past the 32-token context
    cached = generate(model, idx, n, use_cache=True)
    plain = generate(model, idx, n, use_cache=False)
    assert cached.shape == (3, 10 + n)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :10], idx)


def test_batch_rows_match_single_prompts(model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 6))
    both = generate(model, idx, 8)
    for row in range(2):
        assert torch.equal(both[row], generate(model, idx[row], 8))


def test_seeded_sampling_is_reproducible(model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 4))
    kw = dict(temperature=1.5, top_k=50, top_p=0.9)
    a = generate(model, idx, 20, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, idx, 20, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, idx, 20, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.79)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_sampling_only_draws_kept_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, temperature=1.0, top_k=2, generator=g)
    assert set(drawn.tolist()) == {1, 2}


def test_eos_stops_generation(model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 5))
    first = int(generate(model, idx, 1)[0, -1])
    out = generate(model, idx, 10, eos_id=first)
    assert out.shape == (1, 6) and int(out[0, -1]) == first


def test_streaming_yields_the_same_tokens(model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 5))
    streamed = [int(t[0]) for t in generate_stream(model, idx, 7)]
    assert streamed == generate(model, idx, 7)[0, 5:].tolist()


def test_stream_text_yields_text(model):
    text = "".join(stream_text(model, "Every effort moves you", max_new_tokens=5, stop_at_eos=False))
    assert isinstance(text, str) and len(text) > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
])
def test_bad_sampling_settings_are_clear_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1, 2]]), 3, **kwargs)


def test_prompt_longer_than_context_is_a_clear_error(model, tiny_cfg):
    with pytest.raises(ValueError, match="context length"):
        generate(model, torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long), 2)


def test_int8_generation_and_evaluation_work(model, tiny_cfg, verdict_text):
    from gptforge.evaluate import evaluate_string
    from gptforge.quantize import quantize_int8

    idx = torch.randint(0, tiny_cfg.vocab_size, (1, 5))
    fp32 = evaluate_string(model, verdict_text[:2000])
    q = quantize_int8(model)
    assert generate(q, idx, 5, use_cache=True).shape == (1, 10)
    int8 = evaluate_string(q, verdict_text[:2000])
    assert abs(int8["loss"] - fp32["loss"]) < 0.05 * fp32["loss"]


def test_decode_layout_changes_memory_order_not_results(model, tiny_cfg, monkeypatch):
    from gptforge.generate import DecodeLinear, use_decode_layout

    monkeypatch.setattr(DecodeLinear, "min_split_size", 1)  # split even the tiny model's layers

    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 5))
    before = generate(model, idx, 12)
    logits = model(idx)
    names = [name for name, _ in model.named_parameters()]
    use_decode_layout(model, parts=2)
    assert isinstance(model.blocks[0].attn.qkv, DecodeLinear) and model.blocks[0].attn.qkv.parts == 2
    assert not model.blocks[0].attn.qkv.weight.is_contiguous()
    assert [name for name, _ in model.named_parameters()] == names
    assert model.out_head.weight is model.emb.tok.weight  # still tied
    assert torch.allclose(model(idx), logits, atol=1e-5)
    assert torch.equal(generate(model, idx, 12), before)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_decode_linear_split_products_equal_linear(rows):
    from gptforge.generate import DecodeLinear

    layer = nn.Linear(256, 768)
    x = torch.randn(rows, 1, 256)
    expected = layer(x)
    split = DecodeLinear(layer, parts=4)
    assert split.weight is layer.weight and split.parts == 4
    assert torch.allclose(split(x), expected, atol=1e-5)
    assert DecodeLinear(nn.Linear(250, 768), parts=4).parts == 1  # 250 inputs do not split in 4
    assert DecodeLinear(nn.Linear(64, 96), parts=4).parts == 1  # too small to gain from it
