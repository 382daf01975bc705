import pytest
import torch
from torch import nn

from gptforge import GPTConfig, GPTModel


def test_shapes(tiny_cfg):
    model = GPTModel(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 7))
    assert model(idx).shape == (3, 7, tiny_cfg.vocab_size)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_future_tokens_never_change_past_logits(tiny_cfg, impl):
    model = GPTModel(tiny_cfg.replace(attn_impl=impl)).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = torch.randint(0, tiny_cfg.vocab_size, (2, 4))
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_explicit_and_sdpa_attention_agree(tiny_cfg):
    sdpa = GPTModel(tiny_cfg).eval()
    math_ = GPTModel(tiny_cfg.replace(attn_impl="math")).eval()
    math_.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    assert (sdpa(idx) - math_(idx)).abs().max() < 1e-5


def test_kv_cache_forward_equals_full_forward(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    full = model(idx)
    model.setup_cache(2)
    pieces = [model(idx[:, :5], start_pos=0), model(idx[:, 5:6], start_pos=5),
              model(idx[:, 6:16], start_pos=6)]  # a multi-token chunk after a prefix uses a mask
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_rows_at_their_own_positions_equal_full_forwards(tiny_cfg, impl):
    # Serving: requests of different lengths, each with its own cache, step together.
    model = GPTModel(tiny_cfg.replace(attn_impl=impl)).eval()
    seqs = [torch.randint(0, tiny_cfg.vocab_size, (1, n)) for n in (4, 9, 6)]
    caches = []
    for seq in seqs:
        model.setup_cache(1)
        model(seq[:, :-1], start_pos=0)  # each prompt alone, all but its last token
        caches.append([block.attn.cache for block in model.blocks])
    for i, block in enumerate(model.blocks):
        block.attn.cache = nn.ModuleList(c[i] for c in caches)
    last = torch.cat([seq[:, -1:] for seq in seqs])  # (3, 1)
    together = model(last, start_pos=[seq.shape[1] - 1 for seq in seqs])[:, -1]  # (3, V)
    model.clear_cache()
    for row, seq in enumerate(seqs):
        assert (together[row] - model(seq)[0, -1]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="one per row"):
        model(last, start_pos=[3, 8])


def test_presets_and_overrides():
    cfg = GPTConfig.from_name("gpt2-medium", context_length=256)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length) == (1024, 24, 16, 256)
    assert GPTConfig.from_name("1558M") == GPTConfig.from_name("gpt2-xl")
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_name("gpt2-small", context=3)


def test_parameter_counts_of_gpt2_small():
    with torch.device("meta"):
        tied = GPTModel(GPTConfig.from_name("gpt2-small"))
        untied = GPTModel(GPTConfig.from_name("gpt2-small", tie_weights=False, qkv_bias=False))
    assert tied.num_parameters() == 124_439_808  # GPT-2 small as released
    assert untied.num_parameters() == 163_009_536  # the book's model, separate head, no QKV bias


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(emb_dim=64, n_heads=4, n_layers=8, vocab_size=1000, context_length=64))
    assert abs(model.blocks[0].ff.fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].ff.proj.weight.std().item() - 0.02 / 4) < 0.001
    assert model.out_head.weight is model.emb.tok.weight


def test_bad_input_is_a_clear_error(tiny_cfg):
    model = GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, tiny_cfg.vocab_size]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, tiny_cfg.context_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))


def test_can_overfit_one_batch(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg.replace(vocab_size=128))
    idx = torch.randint(0, 128, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
