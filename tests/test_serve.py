"""The HTTP server, tested over real HTTP on 127.0.0.1 with tiny models.

Every test talks to a real uvicorn server in a background thread (one `gptforge
serve` runs as a subprocess): the endpoints, streaming, the official `openai`
client, errors and limits, concurrency, disconnects, timeouts and the API key.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'gptforge[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'gptforge[serve]'")
httpx = pytest.importorskip("httpx")

from conftest import save_lm_and_classifier  # noqa: E402
from gptforge import load  # noqa: E402
from gptforge.config import GPTConfig  # noqa: E402
from gptforge.finetune.templates import get_template, render_chat  # noqa: E402
from gptforge.generate import stream_text  # noqa: E402
from gptforge.model import GPTModel  # noqa: E402
from gptforge.serve.app import background_server, create_app  # noqa: E402
from gptforge.serve.engine import Engine, SamplingParams, TextStream  # noqa: E402
from gptforge.tokenizer import EOT_ID, get_tokenizer, text_to_ids  # noqa: E402

CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
API_KEY = "test-key-123"
MAX_BODY = 50_000


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny language model and a tiny ham/spam classifier, saved as gptforge directories."""
    root = tmp_path_factory.mktemp("serve-models")
    return save_lm_and_classifier(root, CFG)


@pytest.fixture(scope="module")
def lm(dirs):
    return load(dirs["lm"])


@pytest.fixture(scope="module")
def url(dirs):
    app = create_app(dirs["lm"], dirs["clf"], max_body_bytes=MAX_BODY)
    with background_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(dirs):
    with background_server(create_app(dirs["lm"], api_key=API_KEY)) as base:
        yield base


class SlowModel(GPTModel):
    """The tiny model, 30 ms per forward pass: long enough to disconnect or time out mid-way."""

    def forward(self, idx, cache=None, positions=None, logits_at=None):
        time.sleep(0.03)
        return super().forward(idx, cache, positions, logits_at)


@pytest.fixture(scope="module")
def slow_url(lm):
    slow = SlowModel(CFG)
    slow.load_state_dict(lm.state_dict())
    with background_server(create_app(slow, model_id="slow", timeout=1.0)) as base:
        yield base


def reference_text(model, prompt: str, n: int) -> str:
    """Greedy continuation from the library itself, the answer the server must match."""
    return "".join(stream_text(model, prompt, n, temperature=0.0))


def chat_prompt(text: str) -> str:
    return render_chat([{"role": "user", "content": text}], get_template("alpaca"))


def sse_events(response) -> list:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def engine_stats(base: str) -> dict:
    return httpx.get(f"{base}/health").json()["engine"]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------
# endpoints

def test_health_models_and_page(url):
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-lm"
    assert health["classifier"] == "tiny-clf" and health["labels"] == ["ham", "spam"]
    assert health["context_length"] == 64 and health["auth_required"] is False
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-lm", "tiny-clf"]
    assert httpx.get(f"{url}/v1/models/tiny-lm").json()["object"] == "model"
    assert httpx.get(f"{url}/v1/models/other").status_code == 404
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<title>gptforge</title>" in page.text


def test_completion_equals_library_generation(url, lm):
    prompt = "Every effort moves you"
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-lm", "prompt": prompt,
                                                  "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-lm"
    assert body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == reference_text(lm, prompt, 12)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    n_prompt = len(text_to_ids(prompt))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12,
                             "total_tokens": n_prompt + 12}


def test_completion_prompt_as_token_ids(url):
    ids = text_to_ids("Every effort moves you")
    by_text = httpx.post(f"{url}/v1/completions", json={"prompt": "Every effort moves you",
                                                        "max_tokens": 5, "temperature": 0}).json()
    by_ids = httpx.post(f"{url}/v1/completions", json={"prompt": [ids], "max_tokens": 5,
                                                       "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


def test_chat_renders_the_template(url, lm):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-lm", "messages": messages,
                                                       "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == reference_text(lm, chat_prompt("Name a colour."), 10)
    assert body["usage"]["prompt_tokens"] == len(text_to_ids(chat_prompt("Name a colour.")))


def test_streams_equal_the_whole_answers(url):
    params = {"max_tokens": 10, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello there", **params}).json()
    with httpx.stream("POST", f"{url}/v1/completions",
                      json={"prompt": "Hello there", "stream": True, **params}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Hi"}]
    whole = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **params}).json()
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"messages": messages, "stream": True, **params,
                            "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_stop_sequences_cut_the_text_and_end_generation(url):
    prompt = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 20}
    full = httpx.post(f"{url}/v1/completions", json=prompt).json()["choices"][0]["text"]
    stop = full[6:10]
    expected = full[:full.find(stop)]
    for stops in (stop, ["never-there", stop]):
        body = httpx.post(f"{url}/v1/completions", json={**prompt, "stop": stops}).json()
        assert body["choices"][0]["text"] == expected
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] < 20
    with httpx.stream("POST", f"{url}/v1/completions", json={**prompt, "stop": stop, "stream": True}) as r:
        chunks = sse_events(r)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_stream_holds_back_a_possible_stop_sequence():
    tok = get_tokenizer()
    ids = text_to_ids("Hello world, this is a test")
    stream = TextStream(tok, stop=[", this"])
    released, stopped = "", False
    for i in ids:
        piece, stopped = stream.push(i)
        released += piece
        assert "Hello world".startswith(released)  # "," is held back: it may start the stop
        if stopped:
            break
    assert stopped and released == "Hello world"
    # Without a stop sequence every byte comes out, including a character split across tokens.
    stream = TextStream(tok)
    text = "".join(stream.push(i)[0] for i in text_to_ids("naïve café ☕")) + stream.finish()
    assert text == "naïve café ☕"


def test_seed_makes_sampling_reproducible(url):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "top_p": 0.95}
    a = httpx.post(f"{url}/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    b = httpx.post(f"{url}/v1/completions", json={**body, "seed": 7}).json()["choices"][0]["text"]
    assert a == b


def test_classify(url, dirs):
    clf = load(dirs["clf"])
    r = httpx.post(f"{url}/v1/classify", json={"input": ["win a free prize now", "see you at 5"]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "tiny-clf" and body["labels"] == ["ham", "spam"]
    assert [d["index"] for d in body["data"]] == [0, 1]
    for text, result in zip(["win a free prize now", "see you at 5"], body["data"]):
        with torch.no_grad():
            logits = clf(torch.tensor([text_to_ids(text)]))[0, -1]  # the last token's output
        expected = torch.softmax(logits, -1).tolist()
        probs = result["probabilities"]
        assert [probs["ham"], probs["spam"]] == pytest.approx(expected, abs=1e-5)
        assert result["label"] == ["ham", "spam"][int(torch.argmax(logits))]
    one = httpx.post(f"{url}/v1/classify", json={"input": "see you at 5", "model": "tiny-clf"}).json()
    assert one["data"][0]["label"] == body["data"][1]["label"]
    assert one["data"][0]["probabilities"] == pytest.approx(body["data"][1]["probabilities"], abs=1e-5)


# ------------------------------------------------------------------------------------
# the official OpenAI client

def test_openai_client(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-lm", "tiny-clf"]

    done = client.completions.create(model="tiny-lm", prompt="Hello", max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    streamed = client.completions.create(model="tiny-lm", prompt="Hello", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=6,
                                          temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=6,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-lm", messages=messages, temperature=-0.5)
    assert err.value.body["param"] == "temperature"


def test_instruction_judge_can_use_the_server(url, tmp_path):
    judge = pytest.importorskip("gptforge.finetune.judge")
    client = judge.JudgeClient(url, "tiny-lm", "openai", timeout=30, retries=0,
                               cache=tmp_path / "judge_cache.json")
    reply = client.ask("Score the response from 0 to 100. Respond with the integer number only.")
    assert reply.error is None and isinstance(reply.text, str)  # a tiny random model gives no score
    with pytest.raises(judge.JudgeError):  # a model the server does not have is refused at once
        judge.JudgeClient(url, "llama3", "openai", retries=0).ask("Score this.")


# ------------------------------------------------------------------------------------
# errors and limits

@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [[1, 99999]]}, 400, "prompt", None),
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "word " * 80}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 80}]},
     400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]},
     400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "tiny-clf"},
     404, "model", "model_not_found"),
    ("/v1/classify", {"input": "x", "model": "tiny-lm"}, 404, "model", "model_not_found"),
    ("/v1/classify", {"input": []}, 400, "input", None),
    ("/v1/classify", {"input": ["fine", "  "]}, 400, "input", None),
])
def test_errors_have_openai_shape(url, path, body, status, param, code):
    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and error["code"] == code


def test_malformed_json_and_unknown_paths(url):
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Invalid URL")


def test_body_too_large(url):
    big = {"prompt": "x" * (MAX_BODY + 10)}
    r = httpx.post(f"{url}/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the server must count the bytes itself
        for _ in range(MAX_BODY // 1000 + 2):
            yield b"x" * 1000

    r = httpx.post(f"{url}/v1/completions", content=chunked())
    assert r.status_code == 413


def test_api_key(keyed_url):
    messages = [{"role": "user", "content": "hi"}]
    body = {"messages": messages, "max_tokens": 2}
    r = httpx.post(f"{keyed_url}/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{keyed_url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert httpx.get(f"{keyed_url}/v1/models").status_code == 401
    r = httpx.post(f"{keyed_url}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    # The page and the health check stay open; the page asks for the key.
    assert httpx.get(f"{keyed_url}/").status_code == 200
    assert httpx.get(f"{keyed_url}/health").json()["auth_required"] is True
    # No classifier on this server.
    r = httpx.post(f"{keyed_url}/v1/classify", json={"input": "x"},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404

    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=API_KEY, max_retries=0)
    assert good.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=2).choices
    bad = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=2)


# ------------------------------------------------------------------------------------
# serving that holds up

def test_sixteen_concurrent_requests_are_answered_unmixed(url):
    prompts = [f"Request number {i} says" for i in range(16)]
    body = {"max_tokens": 16, "temperature": 0}
    alone = [httpx.post(f"{url}/v1/completions", json={"prompt": p, **body}).json()["choices"][0]["text"]
             for p in prompts]
    assert len(set(alone)) > 1  # the prompts lead to different answers

    async def together():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(i: int):
                if i % 2:  # half of them streamed
                    text = ""
                    async with client.stream("POST", "/v1/completions",
                                             json={"prompt": prompts[i], "stream": True, **body}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                text += json.loads(line[6:])["choices"][0]["text"]
                    return text
                r = await client.post("/v1/completions", json={"prompt": prompts[i], **body})
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(together()) == alone


def test_engine_queues_beyond_max_active(lm):
    tok = get_tokenizer()
    engine = Engine(lm, tok, eos_id=EOT_ID, max_active=2)
    engine.start()
    try:
        results: dict[int, list] = {i: [] for i in range(5)}
        prompts = [text_to_ids(f"Item {i}:") for i in range(5)]
        for i, ids in enumerate(prompts):
            engine.submit(ids, SamplingParams(max_tokens=6, temperature=0.0),
                          lambda e, i=i: results[i].append(e))
        assert wait_for(lambda: all(r and r[-1].finish_reason for r in results.values()))
        for i in range(5):
            text = "".join(e.text for e in results[i])
            assert text == reference_text(lm, f"Item {i}:", 6)
        assert engine.snapshot()["completed"] == 5
    finally:
        engine.stop()


def test_engine_decodes_active_requests_in_one_batch(lm):
    rows = []  # the batch size of every forward pass
    hook = lm.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    engine = Engine(lm, get_tokenizer(), eos_id=EOT_ID, max_active=4)
    prompts = [f"Item {i}:" for i in range(4)]
    results: dict[int, list] = {i: [] for i in range(4)}
    for i, prompt in enumerate(prompts):  # all queued before the worker starts
        engine.submit(text_to_ids(prompt), SamplingParams(max_tokens=6, temperature=0.0),
                      lambda e, i=i: results[i].append(e))
    engine.start()
    try:
        assert wait_for(lambda: all(r and r[-1].finish_reason for r in results.values()))
    finally:
        engine.stop()
        hook.remove()
    for i, prompt in enumerate(prompts):
        assert "".join(e.text for e in results[i]) == reference_text(lm, prompt, 6)
    assert rows[:2] == [4, 4]  # the four prompts together, then one decoding batch of four


def test_engine_steps_requests_of_different_lengths_together(lm):
    """Prompts of different lengths decode in one batch, each at its own position; as
    requests finish, the last cache row moves into the freed one and the others go on."""
    calls = []  # (rows, positions) of every forward pass
    hook = lm.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs.get("positions"))),
        with_kwargs=True)
    prompts = ["Hi", "The quick brown fox jumps over", "Item 3:", "Once upon a time there was a", "A"]
    max_tokens = [9, 2, 5, 12, 4]
    engine = Engine(lm, get_tokenizer(), eos_id=None, max_active=3)
    results: dict[int, list] = {i: [] for i in range(5)}
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.submit(text_to_ids(prompt), SamplingParams(max_tokens=n, temperature=0.0),
                      lambda e, i=i: results[i].append(e))
    engine.start()
    try:
        assert wait_for(lambda: all(r and r[-1].finish_reason for r in results.values()))
    finally:
        engine.stop()
        hook.remove()
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        assert results[i][-1].finish_reason == "length"
        assert "".join(e.text for e in results[i]) == reference_text(lm, prompt, n)
    assert calls[0][0] == 3  # the first three prompts in one call
    assert any(torch.is_tensor(p) and rows == 3 for rows, p in calls)  # one step, three positions


def test_the_engine_cache_grows_with_the_requests_it_holds(lm):
    """A quiet server holds cache rows for the requests it has, not for --max-active of them;
    rows added later keep what the earlier rows cached (the answers stay the same)."""
    engine = Engine(lm, get_tokenizer(), eos_id=None, max_active=16)
    results: dict[int, list] = {i: [] for i in range(4)}
    engine.start()
    try:
        engine.submit(text_to_ids("Hi"), SamplingParams(max_tokens=8, temperature=0.0),
                      lambda e: results[0].append(e))
        assert wait_for(lambda: results[0] and results[0][-1].finish_reason)
        assert engine._cache.batch_size == 1
        for i in range(1, 4):  # three at once: the cache doubles to make room
            engine.submit(text_to_ids(f"Item {i}:"), SamplingParams(max_tokens=6, temperature=0.0),
                          lambda e, i=i: results[i].append(e))
        assert wait_for(lambda: all(r and r[-1].finish_reason for r in results.values()))
        assert 3 <= engine._cache.batch_size <= 4
    finally:
        engine.stop()
    assert "".join(e.text for e in results[0]) == reference_text(lm, "Hi", 8)
    for i in range(1, 4):
        assert "".join(e.text for e in results[i]) == reference_text(lm, f"Item {i}:", 6)


class FlakyModel(GPTModel):
    """The tiny model, failing every batched decoding step (one new token for each of
    several rows) while `failing` is set."""

    failing = True

    def forward(self, idx, cache=None, positions=None, logits_at=None):
        if self.failing and cache is not None and idx.shape[0] > 1 and idx.shape[1] == 1:
            raise RuntimeError("the batched step broke")
        return super().forward(idx, cache, positions, logits_at)


def test_a_failed_batch_ends_its_requests_with_an_error_and_serving_goes_on(lm):
    flaky = FlakyModel(CFG)
    flaky.load_state_dict(lm.state_dict())
    engine = Engine(flaky, get_tokenizer(), eos_id=EOT_ID, max_active=4)
    results: dict[int, list] = {i: [] for i in range(3)}
    for i in range(3):
        engine.submit(text_to_ids(f"Item {i}:"), SamplingParams(max_tokens=6, temperature=0.0),
                      lambda e, i=i: results[i].append(e))
    engine.start()
    try:
        assert wait_for(lambda: all(r and r[-1].finish_reason for r in results.values()))
        for events in results.values():  # the prompt step worked, the first batch failed
            assert events[-1].finish_reason == "error" and "batched step broke" in events[-1].error
        assert engine.snapshot()["failed"] == 3 and engine.snapshot()["active"] == 0
        flaky.failing = False
        later: list = []
        engine.submit(text_to_ids("Item 0:"), SamplingParams(max_tokens=6, temperature=0.0), later.append)
        assert wait_for(lambda: later and later[-1].finish_reason)
        assert "".join(e.text for e in later) == reference_text(lm, "Item 0:", 6)
    finally:
        engine.stop()


def test_disconnect_mid_stream_stops_generation(slow_url):
    before = engine_stats(slow_url)
    body = {"prompt": "Tell me a long story", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{slow_url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        seen = [line for _, line in zip(range(6), lines) if line.startswith("data: ")]
        assert seen  # some chunks arrived; now hang up
    assert wait_for(lambda: engine_stats(slow_url)["cancelled"] == before["cancelled"] + 1)
    after = engine_stats(slow_url)
    assert after["active"] == 0 and after["completed"] == before["completed"]
    assert after["tokens"] - before["tokens"] < 40  # stopped well before max_tokens

    # A plain (non-streamed) request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
    assert wait_for(lambda: engine_stats(slow_url)["cancelled"] == before["cancelled"] + 2)


def test_timeout(slow_url):
    body = {"prompt": "Tell me a long story", "max_tokens": 60, "temperature": 0}
    r = httpx.post(f"{slow_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "timeout" and r.json()["error"]["type"] == "timeout_error"
    with httpx.stream("POST", f"{slow_url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200  # the stream had begun: the error comes as its last event
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    assert any(e.get("choices") for e in events[:-2])  # text arrived before the timeout
    assert engine_stats(slow_url)["timed_out"] >= 2


# ------------------------------------------------------------------------------------
# the command line

def test_cli_serve_needs_the_extra(monkeypatch, dirs, capsys):
    from gptforge.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", "--model", str(dirs["lm"])]) == 2
    assert "pip install 'gptforge[serve]'" in capsys.readouterr().err


def test_cli_serve_subprocess(dirs):
    """`gptforge serve` in its own process: answers, and loads no web stack for `--help`."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    # One process: build the parser (as `gptforge --help` does), check, then serve.
    code = ("import sys; from gptforge.cli import build_parser, main; build_parser(); "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules, 'web stack loaded'; "
            "sys.exit(main(sys.argv[1:]))")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(dirs["lm"]),
                             "--port", str(port), "--api-key", API_KEY, "--model-id", "cli-model"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/health").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None
        assert wait_for(up, timeout=90) and proc.poll() is None, proc.stdout.read().decode()
        r = httpx.post(f"{base}/v1/completions", json={"model": "cli-model", "prompt": "Hi", "max_tokens": 3},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
