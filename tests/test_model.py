import pytest
import torch

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


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_kv_cache_forward_in_chunks_equals_full_forward(tiny_cfg, impl):
    model = GPTModel(tiny_cfg.replace(attn_impl=impl)).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    full = model(idx)
    cache = model.new_cache(2)
    pieces = [model(idx[:, :5], cache, positions=0), model(idx[:, 5:6], cache, positions=5),
              model(idx[:, 6:16], cache, positions=6)]  # a multi-token chunk after a prefix uses a mask
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def _rows_at_their_own_positions(model, seqs, prefix):
    """Prefill each row's first prefix[b] tokens (right-padded, one call), then feed every
    row its next 3 tokens and then 1 more, each at the row's own positions (one call each)."""
    cache = model.new_cache(len(seqs))
    width = max(prefix)
    padded = torch.stack([torch.cat([s[:n], s[:width - n]]) for s, n in zip(seqs, prefix)])  # junk pads
    model(padded, cache, positions=0)
    positions = torch.tensor(prefix)
    chunk = torch.stack([s[n:n + 3] for s, n in zip(seqs, prefix)])  # (B, 3)
    three = model(chunk, cache, positions=positions)
    one = model(torch.stack([s[n + 3:n + 4] for s, n in zip(seqs, prefix)]), cache, positions=positions + 3)
    return torch.cat([three, one], dim=1)  # (B, 4, V)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_rows_at_their_own_positions_equal_each_row_alone(tiny_cfg, impl):
    # Rows of different lengths step together in one call (a batch of prompts, a server).
    model = GPTModel(tiny_cfg.replace(attn_impl=impl)).eval()
    seqs = [torch.randint(0, tiny_cfg.vocab_size, (12,)) for _ in range(3)]
    prefix = [2, 7, 4]
    together = _rows_at_their_own_positions(model, seqs, prefix)
    for row, (seq, n) in enumerate(zip(seqs, prefix)):
        alone = model(seq[None, :n + 4])[0, n:]  # (4, V): the same positions, one full forward
        assert (together[row] - alone).abs().max() < 1e-5


def test_sdpa_and_math_agree_at_per_row_positions(tiny_cfg):
    sdpa = GPTModel(tiny_cfg).eval()
    math_ = GPTModel(tiny_cfg.replace(attn_impl="math")).eval()
    math_.load_state_dict(sdpa.state_dict())
    seqs = [torch.randint(0, tiny_cfg.vocab_size, (12,)) for _ in range(3)]
    a = _rows_at_their_own_positions(sdpa, seqs, [5, 1, 8])
    b = _rows_at_their_own_positions(math_, seqs, [5, 1, 8])
    assert (a - b).abs().max() < 1e-5


def test_logits_at_one_position_per_row_equal_the_full_logits(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 10))
    at = torch.tensor([9, 0, 4])
    with torch.no_grad():
        full = model(idx)  # (3, 10, V)
        picked = model(idx, logits_at=at)  # (3, 1, V)
    assert picked.shape == (3, 1, tiny_cfg.vocab_size)
    assert torch.allclose(picked[:, 0], full[torch.arange(3), at], atol=1e-6)


def test_cache_rows_share_memory_and_a_copied_row_decodes_the_same(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    seq = torch.randint(0, tiny_cfg.vocab_size, (1, 9))
    cache = model.new_cache(3)
    assert cache.k.shape == (2, 3, 4, 32, 8) and not cache.k.any() and not cache.v.any()
    model(seq[:, :8], cache.rows(2, 3), positions=0)  # a view: written into row 2 of `cache`
    assert cache.k[:, 2, :, :8].any() and not cache.k[:, :2].any()
    cache.copy_row(2, 0, length=8)
    next_logits = model(seq[:, 8:], cache.rows(0, 1), positions=8)[0, -1]
    assert (next_logits - model(seq)[0, -1]).abs().max() < 1e-5


def test_cache_and_position_errors_are_clear(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 1))
    cache = model.new_cache(2, max_len=8)
    with pytest.raises(ValueError, match="one per row"):
        model(ids, cache, positions=torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="need a KV cache"):
        model(ids, positions=3)
    with pytest.raises(ValueError, match="context length"):
        model(ids, model.new_cache(2), positions=torch.tensor([3, tiny_cfg.context_length]))
    with pytest.raises(ValueError, match="max_len=9"):
        model(ids, cache, positions=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="3 rows"):
        model(ids, model.new_cache(3), positions=0)
    with pytest.raises(ValueError, match="not be negative"):
        model(ids, cache, positions=-1)


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
