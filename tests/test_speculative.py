"""Speculative decoding gives the target model's own tokens (greedy) or its own
distribution (sampling), whatever the draft proposes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from gptforge import GPTConfig, GPTModel
from gptforge.decoder import DecoderModel
from gptforge.errors import BadInputError
from gptforge.families import small_config
from gptforge.generate import generate
from gptforge.speculative import SpeculationStats, speculative_generate, speculative_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt(seed: int, vocab: int = 101, layers: int = 2, width: int = 32, ctx: int = 96,
         sharpen: float = 1.0) -> GPTModel:
    """A random GPT; `sharpen` > 1 scales its (untied) output head, for next-token
    distributions far from a fresh model's near-uniform ones."""
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=width, n_heads=4,
                               n_layers=layers, drop_rate=0.0, tie_weights=sharpen == 1.0))
    with torch.no_grad():
        model.out_head.weight.mul_(sharpen)
    return model.eval()


def _nearby(model: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    """A copy of `model` with its weights moved a little: a draft that agrees often, not always."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(noise * p.std().nan_to_num(0) * torch.randn(p.shape, generator=gen))
    return other


def _train(model: GPTModel, ids: torch.Tensor, steps: int) -> GPTModel:
    """A few hundred AdamW steps on random windows of `ids`: enough for text-like greedy
    output, where a fresh model repeats one token."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = model.cfg.context_length
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (16,), generator=gen)
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def verdict_pair(fetch):
    """A target (3 blocks, width 64) and a draft (1 block, width 32) trained on The Verdict,
    its GPT-2 token ids renumbered 0..V-1 to keep the models small."""
    from gptforge.tokenizer import get_tokenizer

    text = fetch("the-verdict").read_text(encoding="utf-8")
    raw = torch.tensor(get_tokenizer().encode(text))
    vocab, ids = torch.unique(raw, return_inverse=True)
    target = _train(_gpt(0, vocab=len(vocab), layers=3, width=64, ctx=64), ids, 300)
    draft = _train(_gpt(1, vocab=len(vocab), layers=1, width=32, ctx=64), ids, 150)
    return target, draft, ids[:12].tolist()


PROMPT = [5, 17, 3, 99, 42, 8, 1]


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_are_the_targets_for_any_draft(verdict_pair, use_cache):
    target, trained_draft, prompt = verdict_pair
    expected = generate(target, [prompt], 64)[0]
    assert len(set(expected[len(prompt):])) > 10  # text, not one token repeated
    drafts = {"identical": copy.deepcopy(target), "trained": trained_draft,
              "untrained": _gpt(7, vocab=target.cfg.vocab_size, layers=1, ctx=64)}
    acceptance = {}
    for name, draft in drafts.items():
        for k in (1, 3, 6):
            stats = SpeculationStats()
            got = speculative_generate(target, draft, prompt, 64, draft_tokens=k,
                                       use_cache=use_cache, stats=stats)
            assert got == expected, (name, k)
            acceptance[name, k] = stats.acceptance
    assert acceptance["identical", 3] == 1.0
    assert acceptance["untrained", 3] < acceptance["trained", 3] < 1.0


def test_greedy_tokens_past_the_context_and_at_a_stop_id():
    target = _gpt(0, ctx=24)
    draft = _nearby(target, 0.2, 2)
    expected = generate(target, [PROMPT], 40)[0]  # runs past the context of 24
    assert speculative_generate(target, draft, PROMPT, 40, draft_tokens=4) == expected
    stop = expected[len(PROMPT) + 5]
    first = expected.index(stop, len(PROMPT))
    got = speculative_generate(target, draft, PROMPT, 40, draft_tokens=4, eos_id=stop)
    assert got == expected[:first + 1]


def test_a_decoder_family_target_and_draft():
    torch.manual_seed(0)
    target = DecoderModel(small_config("qwen3", vocab_size=101, context_length=64, emb_dim=32,
                                       n_layers=2, n_heads=4)).eval()
    draft = _nearby(target, 0.3, 3)
    expected = generate(target, [PROMPT], 30)[0]
    stats = SpeculationStats()
    assert speculative_generate(target, draft, PROMPT, 30, draft_tokens=4, stats=stats) == expected
    assert stats.accepted > 0


def _joint(model: GPTModel, prompt: list[int], temperature: float) -> torch.Tensor:
    """The exact probability of every pair of next two tokens, (V, V)."""
    V = model.cfg.vocab_size
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt]))[0, -1] / temperature, -1)  # (V,)
        pairs = torch.tensor([prompt + [a] for a in range(V)])
        second = torch.softmax(model(pairs)[:, -1] / temperature, -1)  # (V, V)
    return first[:, None] * second


def test_sampling_follows_the_targets_distribution():
    target, draft = _gpt(0, vocab=6, width=16, sharpen=20), _gpt(5, vocab=6, width=16, sharpen=20)
    prompt, t = [1, 2, 3], 1.5
    exact = _joint(target, prompt, t)
    drafts_own = _joint(draft, prompt, t)
    # The draft alone is far from the target: accepting its tokens blindly would show.
    assert 0.5 * (exact - drafts_own).abs().sum() > 0.25
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(exact)
    n = 3000
    for _ in range(n):
        # Two new tokens: one round drafts one (k <= max_new_tokens - 1), the target adds one.
        a, b = speculative_stream(target, draft, prompt, 2, draft_tokens=2, temperature=t,
                                  generator=gen)
        counts[a, b] += 1
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.06, float(tv)


def test_sampling_with_longer_drafts_keeps_the_distribution():
    target = _gpt(0, vocab=5, width=16, sharpen=20)
    draft = _nearby(target, 1.0, 4)
    prompt, t = [1, 2], 1.0
    gen = torch.Generator().manual_seed(1)
    n = 2000
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        seq = tuple(speculative_stream(target, draft, prompt, 3, draft_tokens=3, temperature=t,
                                       generator=gen))
        counts[seq] = counts.get(seq, 0) + 1
    # The first two tokens' joint distribution, from three-token runs with 2 drafts a round.
    exact = _joint(target, prompt, t)
    observed = torch.zeros_like(exact)
    for (a, b, _), c in counts.items():
        observed[a, b] += c / n
    assert 0.5 * (observed - exact).abs().sum() < 0.07
    assert set(itertools.chain.from_iterable(counts)) <= set(range(5))


def test_bad_pairs_are_refused():
    target = _gpt(0)
    with pytest.raises(BadInputError, match="vocabulary"):
        speculative_generate(target, _gpt(1, vocab=50), PROMPT, 5)
    with pytest.raises(BadInputError, match="target model itself"):
        speculative_generate(target, target, PROMPT, 5)
    with pytest.raises(BadInputError, match="draft_tokens"):
        speculative_generate(target, _gpt(1), PROMPT, 5, draft_tokens=0)
    with pytest.raises(BadInputError, match="context length"):
        speculative_generate(target, _gpt(1), list(range(97)), 5)


def _saved(root, name: str, seed: int, layers: int) -> str:
    from gptforge.checkpoint import save_model

    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4,
                               n_layers=layers, drop_rate=0.0))
    save_model(model, root / name)
    return str(root / name)


def test_generate_and_chat_with_a_draft_print_the_same_text(tmp_path, capsys, monkeypatch):
    import io

    from gptforge.cli import main

    target, draft = _saved(tmp_path, "target", 0, 2), _saved(tmp_path, "draft", 1, 1)
    args = ["generate", "--model", target, "--prompt", "Every effort moves you", "--max-new-tokens", "20"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft", draft, "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    outputs = []
    for extra in ([], ["--draft", draft]):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/exit\n"))
        assert main(["chat", "--model", target, "--max-new-tokens", "12", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > len(">>> >>> ")


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, capsys):
    from gptforge.checkpoint import save_model
    from gptforge.cli import main

    target = _saved(tmp_path, "target", 0, 1)
    save_model(_gpt(1, vocab=1000, ctx=64), tmp_path / "small-vocab")
    assert main(["generate", "--model", target, "--prompt", "Hi", "--draft",
                 str(tmp_path / "small-vocab")]) == 2
    err = capsys.readouterr().err
    assert "draft" in err and ("tokenizer" in err or "vocabulary" in err)
