"""`gptforge serve --draft` and `--quantize int8`: a request decoding alone goes through
speculative decoding, requests decoding together are batched as before, and the text is
the one the served model gives without a draft."""

from __future__ import annotations

import copy
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'gptforge[serve]'")
httpx = pytest.importorskip("httpx")

from gptforge import load  # noqa: E402
from gptforge.checkpoint import save_model  # noqa: E402
from gptforge.config import GPTConfig  # noqa: E402
from gptforge.errors import BadInputError  # noqa: E402
from gptforge.generate import stream_text  # noqa: E402
from gptforge.model import GPTModel  # noqa: E402
from gptforge.serve.app import background_server, create_app  # noqa: E402
from gptforge.serve.engine import Engine, SamplingParams  # noqa: E402
from gptforge.tokenizer import EOT_ID, get_tokenizer, text_to_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny target, and a draft that is the target with its weights moved a little (it
    agrees often, not always), saved as gptforge directories."""
    root = tmp_path_factory.mktemp("draft-models")
    torch.manual_seed(0)
    target = GPTModel(CFG)
    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    save_model(target, root / "target")
    save_model(draft, root / "draft")
    return root / "target", root / "draft"


def _wait(results: dict, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(r and r[-1].finish_reason for r in results.values()):
        assert time.monotonic() < deadline, "the engine did not finish"
        time.sleep(0.02)


def _run(engine: Engine, prompts: list[str], n: int, stop: tuple[str, ...] = ()) -> list[str]:
    results: dict[int, list] = {i: [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.submit(text_to_ids(prompt), SamplingParams(max_tokens=n, temperature=0.0, stop=stop),
                      lambda e, i=i: results[i].append(e))
    _wait(results)
    return ["".join(e.text for e in results[i]) for i in range(len(prompts))]


def test_a_request_alone_is_speculated_and_gets_the_models_text(models):
    target, draft = load(models[0]), load(models[1])
    engine = Engine(target, get_tokenizer(), eos_id=EOT_ID, draft=draft, draft_tokens=3)
    engine.start()
    try:
        texts = _run(engine, ["Every effort moves you"], 40)
    finally:
        engine.stop()
    assert texts[0] == "".join(stream_text(target, "Every effort moves you", 40))
    assert engine.stats["draft_proposed"] > 0
    assert 0 < engine.stats["draft_accepted"] < engine.stats["draft_proposed"]
    assert engine.stats["tokens"] == 40


def test_requests_together_are_batched_and_stop_texts_still_cut(models):
    target, draft = load(models[0]), load(models[1])
    rows = []  # the batch size of every forward pass of the target
    hook = target.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    engine = Engine(target, get_tokenizer(), eos_id=EOT_ID, max_active=4, draft=draft)
    prompts = [f"Item {i}:" for i in range(4)]
    try:
        expected = ["".join(stream_text(target, p, 12)) for p in prompts]
        rows.clear()
        engine.start()
        assert _run(engine, prompts, 12) == expected
        assert 4 in rows  # decoded together, not one speculated request after another
        stop = expected[0][5:8]
        assert stop and _run(engine, prompts[:1], 12, stop=(stop,)) == [expected[0][:expected[0].index(stop)]]
    finally:
        engine.stop()
        hook.remove()


def test_http_with_int8_and_a_draft_gives_the_int8_models_text(models):
    target, draft = models
    body = {"prompt": "Every effort moves you", "max_tokens": 24, "temperature": 0}
    texts = []
    for options in ({"quantize": "int8"}, {"quantize": "int8", "draft": draft, "draft_tokens": 4}):
        with background_server(create_app(target, **options)) as base:
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
            health = httpx.get(f"{base}/health").json()["engine"]
            assert (health["draft_proposed"] > 0) == ("draft" in options)
    assert texts[0] == texts[1] and texts[0]


def test_a_draft_with_another_vocabulary_is_refused(models, tmp_path):
    save_model(GPTModel(GPTConfig(vocab_size=1000, context_length=64, emb_dim=32, n_heads=2,
                                  n_layers=1)), tmp_path / "other")
    with pytest.raises(BadInputError, match="vocabulary|tokenizer"):
        create_app(models[0], draft=tmp_path / "other")
    with pytest.raises(BadInputError, match="int8"):
        create_app(models[0], quantize="int4")
