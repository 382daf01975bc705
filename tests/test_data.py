import numpy as np
import pytest
import torch

from gptforge import GPTDataset, TokenFileDataset, create_dataloader, create_embeddings, get_tokenizer
from gptforge.data import prepare_token_file


def test_windows_exact_on_the_verdict(verdict_text):
    ids = get_tokenizer().encode(verdict_text, allowed_special={"<|endoftext|>"})
    max_length, stride = 4, 3
    loader = create_dataloader(verdict_text, batch_size=8, max_length=max_length, stride=stride,
                               shuffle=False, drop_last=False)
    starts = list(range(0, len(ids) - max_length, stride))
    inputs = torch.cat([x for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    assert len(inputs) == len(starts)
    for row, start in enumerate(starts):
        assert inputs[row].tolist() == ids[start:start + max_length]
        assert targets[row].tolist() == ids[start + 1:start + max_length + 1]


def test_first_batch_matches_the_book(verdict_text):
    loader = create_dataloader(verdict_text, batch_size=1, max_length=4, stride=1, shuffle=False)
    x, y = next(iter(loader))
    assert x.tolist() == [[40, 367, 2885, 1464]]  # "I HAD always"
    assert y.tolist() == [[367, 2885, 1464, 1807]]


def test_drop_last_and_shuffle_seedable(verdict_text):
    a = [x for x, _ in create_dataloader(verdict_text, batch_size=3, max_length=16, stride=16, seed=7)]
    b = [x for x, _ in create_dataloader(verdict_text, batch_size=3, max_length=16, stride=16, seed=7)]
    c = [x for x, _ in create_dataloader(verdict_text, batch_size=3, max_length=16, stride=16, seed=8)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert all(len(x) == 3 for x in a)  # drop_last drops the short batch


def test_too_short_text_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        create_dataloader("just a few words", max_length=256)
    with pytest.raises(ValueError, match="empty"):
        create_dataloader("", max_length=4)


def test_embeddings_add_token_and_position():
    emb = create_embeddings(vocab_size=50257, emb_dim=8, context_length=4, seed=123)
    ids = torch.tensor([[40, 367, 2885, 1464]])
    out = emb(ids)
    assert out.shape == (1, 4, 8)
    assert torch.allclose(out[0, 2], emb.tok.weight[2885] + emb.pos.weight[2])


def test_token_file_round_trip(tmp_path, verdict_text):
    src = tmp_path / "a.txt"
    src.write_text(verdict_text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("A second document.")
    out = tmp_path / "tokens.bin"
    summary = prepare_token_file([str(tmp_path / "*.txt"), tmp_path / "sub"], out, num_threads=2)
    tokens = np.fromfile(out, dtype=np.uint16)
    tok = get_tokenizer()
    expected = tok.encode(verdict_text) + [50256] + tok.encode("A second document.") + [50256]
    assert tokens.tolist() == expected
    assert summary["tokens"] == len(expected)
    ds = TokenFileDataset(out, max_length=8, stride=8)
    x, y = ds[1]
    assert x.tolist() == expected[8:16] and y.tolist() == expected[9:17]
    assert len(ds) == (len(expected) - 9) // 8 + 1


def test_token_file_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="gptforge prepare"):
        TokenFileDataset(tmp_path / "nope.bin")


def test_dataset_len_matches_book_formula(verdict_text):
    ds = GPTDataset(verdict_text, max_length=256, stride=128)
    n = len(get_tokenizer().encode(verdict_text))
    assert len(ds) == len(range(0, n - 256, 128))
