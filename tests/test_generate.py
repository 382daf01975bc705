import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptforge import GPTModel, generate, generate_stream, sample, stream_text
from gptforge.generate import DecodeLinear, filter_logits, use_decode_layout
from gptforge.generate import _bf16_kernels as gen_bf16


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(1)
    return GPTModel(tiny_cfg).eval()


@pytest.fixture
def small_vocab_model(tiny_cfg):
    """The tiny model with 512 tokens: long generations without a cache stay fast."""
    torch.manual_seed(1)
    return GPTModel(tiny_cfg.replace(vocab_size=512)).eval()


def test_greedy_cache_equals_no_cache_past_the_context(small_vocab_model, tiny_cfg):
    model = small_vocab_model
    idx = torch.randint(0, 512, (3, 10))
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


def test_prompts_of_different_lengths_each_get_their_own_tokens(tiny_cfg):
    # Context 64: the 60-token prompt runs past it, the others stay within.
    torch.manual_seed(1)
    model = GPTModel(tiny_cfg.replace(context_length=64, vocab_size=512)).eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (1, 5, 17, 60)]
    alone = [generate(model, torch.tensor(p), 20).tolist() for p in prompts]
    assert alone[3] == generate(model, torch.tensor(prompts[3]), 20, use_cache=False).tolist()
    for use_cache in (True, False):
        assert generate(model, prompts, 20, use_cache=use_cache) == alone
        steps = list(generate_stream(model, prompts, 20, use_cache=use_cache))
        assert torch.stack(steps, dim=1).tolist() == [a[len(p):] for a, p in zip(alone, prompts)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_every_step_of_every_row_sees_its_own_last_tokens(tiny_cfg, use_cache):
    # Greedy tokens of a random model soon repeat; comparing the logits of given (random)
    # continuations checks every step. Context 16: the third row runs past it.
    from gptforge.generate import decode_one, prefill

    model = GPTModel(tiny_cfg.replace(context_length=16, vocab_size=512)).eval()
    ctx = 16
    tokens = torch.randint(0, 512, (3, 22))  # each row's ids, right-padded
    lengths = [1, 6, 14]  # the prompts: each row's first ids
    cache = model.new_cache(3) if use_cache else None
    with torch.inference_mode():
        if use_cache:
            logits = prefill(model, cache, tokens[:, :14], lengths)
        else:
            logits = decode_one(model, None, tokens, lengths)
        for _ in range(8):
            for row, n in enumerate(lengths):
                alone = model(tokens[row:row + 1, max(0, n - ctx):n])[0, -1]
                assert (logits[row] - alone).abs().max() < 1e-5
            lengths = [n + 1 for n in lengths]
            logits = decode_one(model, cache, tokens, lengths)


def test_list_prompts_end_at_their_eos(model, tiny_cfg):
    prompts = [torch.randint(0, tiny_cfg.vocab_size, (n,)).tolist() for n in (3, 8)]
    first = generate(model, [prompts[0]], 6)[0][3:]
    eos = first[2]  # the first row's third new token
    out = generate(model, prompts, 6, eos_id=eos)
    assert out[0] == prompts[0] + first[:first.index(eos) + 1]
    assert len(out[1]) == 8 + 6 or out[1][-1] == eos


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


def test_int8_quantization_after_generating(model, tiny_cfg):
    from gptforge.quantize import Int8Linear, quantize_int8

    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 5))
    expected = generate(model, idx, 8)  # puts the model's linear layers in the decode layout
    q = quantize_int8(model)
    assert isinstance(q.blocks[0].attn.qkv, Int8Linear)  # DecodeLinear layers too
    assert isinstance(q.out_head, Int8Linear)
    out = generate(q, idx, 8)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], idx)
    assert isinstance(model.blocks[0].attn.qkv, DecodeLinear)  # the original is left as it was
    assert torch.equal(generate(model, idx, 8), expected)


def _greedy_by_full_forwards(model, idx, n):
    """The definition of greedy decoding: the argmax of a full forward pass, n times."""
    for _ in range(n):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_decode_layout_changes_memory_order_not_results(model, tiny_cfg, monkeypatch):
    monkeypatch.setattr(DecodeLinear, "min_split_size", 1)  # split even the tiny model's layers

    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 5))
    with torch.no_grad():
        before = _greedy_by_full_forwards(model, idx, 12)
        logits = model(idx)
    names = [name for name, _ in model.named_parameters()]
    use_decode_layout(model, parts=2)
    assert isinstance(model.blocks[0].attn.qkv, DecodeLinear) and model.blocks[0].attn.qkv.parts == 2
    assert not model.blocks[0].attn.qkv.weight.is_contiguous()
    assert [name for name, _ in model.named_parameters()] == names
    assert model.out_head.weight is model.emb.tok.weight  # still tied
    with torch.no_grad():
        assert torch.allclose(model(idx), logits, atol=1e-5)
    assert torch.equal(generate(model, idx, 12), before)


def _decode_linears(model):
    return [m for m in model.modules() if isinstance(m, DecodeLinear)]


def test_generation_is_fast_by_default_and_training_undoes_it(tiny_cfg, monkeypatch):
    monkeypatch.setattr(DecodeLinear, "min_split_size", 1)  # the tiny model's weights count as large

    def fresh():
        torch.manual_seed(3)
        model = GPTModel(tiny_cfg.replace(vocab_size=128))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    batch = torch.randint(0, 128, (2, 12))

    def train(model, opt, steps):
        losses = []
        for _ in range(steps):
            model.train()  # as the Trainer does every step
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    model, opt = fresh()
    params = list(model.parameters())
    losses = train(model, opt, 3)
    generate(model, batch[:1, :4], 5)
    layers = _decode_linears(model)
    assert len(layers) == 4 * tiny_cfg.n_layers + 1  # every linear layer, the output head too
    assert all(layer.weight.t().is_contiguous() and not layer.weight.is_contiguous() for layer in layers)
    assert model.out_head.weight is model.emb.tok.weight
    losses += train(model, opt, 3)
    assert all(layer.weight.is_contiguous() for layer in layers)  # back in the standard layout
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]  # the same Parameters
    assert model.out_head.weight is model.emb.tok.weight
    generate(model, batch[:1, :4], 5)  # generating again re-applies the decode layout
    assert all(layer.weight.t().is_contiguous() for layer in layers)

    never_generated, opt = fresh()
    expected = train(never_generated, opt, 6)
    assert losses == pytest.approx(expected, abs=1e-6)
    assert losses[-1] < losses[0]  # it did train
    model.train()
    for p, q in zip(model.parameters(), never_generated.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_decode_linear_split_products_equal_linear(rows):
    layer = nn.Linear(256, 768)
    x = torch.randn(rows, 1, 256)
    expected = layer(x)
    split = DecodeLinear(layer, parts=4)
    assert split.weight is layer.weight and split.parts == 4
    assert torch.allclose(split(x), expected, atol=1e-5)
    split.eval()
    assert split.weight.t().is_contiguous()  # eval mode keeps the decode layout
    split.train()
    assert split.weight.is_contiguous() and split.weight is layer.weight
    assert torch.allclose(split(x), expected, atol=1e-5)  # the standard layout's plain product
    assert DecodeLinear(nn.Linear(250, 768), parts=4).parts == 1  # 250 inputs do not split in 4
    assert DecodeLinear(nn.Linear(64, 96), parts=4).parts == 1  # too small to gain from it


@pytest.mark.skipif(not DecodeLinear.pack_batches, reason="PyTorch built without oneDNN")
def test_decode_linear_packed_batches_follow_weight_changes():
    layer = nn.Linear(256, 768)
    split = DecodeLinear(layer, parts=2).eval()
    with torch.no_grad():
        x = torch.randn(4, 1, 256)
        assert torch.allclose(split(x), layer(x), atol=1e-5)  # 4 rows: the prepacked copy
        assert split._packed is not None
        split.weight.mul_(2)  # an in-place change (load_state_dict, a LoRA merge) repacks
        assert torch.allclose(split(x), F.linear(x, split.weight, split.bias), atol=1e-5)
    split.train()
    assert split._packed is None  # training drops the copy
    y = split(x.requires_grad_())
    y.sum().backward()  # the training path is differentiable
    assert split.weight.grad is not None


@pytest.mark.skipif(not DecodeLinear.pack_batches, reason="PyTorch built without oneDNN")
def test_decode_linear_packs_only_where_memory_allows(monkeypatch):
    import importlib

    gen = importlib.import_module("gptforge.generate")  # the module; gptforge.generate the attribute is a function
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512)).eval()
    x = torch.randn(3, 1, 512)  # three sequences, one new token each
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(gen, "_available_memory", lambda: 1 << 20)  # 1 MiB free: 2 MiB of weights do not fit
    use_decode_layout(model)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert all(not layer.pack and layer._packed is None for layer in model)
    monkeypatch.setattr(gen, "_available_memory", lambda: 1 << 34)
    use_decode_layout(model)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert all(layer.pack and layer._packed is not None for layer in model)


@pytest.mark.skipif(not gen_bf16(), reason="no oneDNN bfloat16 kernels on this CPU")
def test_bfloat16_decoding_uses_the_packed_product_with_the_same_results():
    layer = DecodeLinear(nn.Linear(512, 768).to(torch.bfloat16), parts=2).eval()
    assert layer.weight.is_contiguous()  # bfloat16 keeps the standard layout
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert layer._packed is not None
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)
