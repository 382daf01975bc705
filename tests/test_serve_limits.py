"""A server that holds: limits on every endpoint, slow clients, foreign hosts, bad flags.

Everything runs against real uvicorn servers on 127.0.0.1 (one `gptforge serve` in a
subprocess with a lowered file-descriptor limit). The slow models sleep in their
forward passes, so that "a classify request does not hold back a stream" is a matter
of seconds measured, not of machine speed.
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
from gptforge.config import GPTConfig  # noqa: E402
from gptforge.finetune.classify import TextClassifier  # noqa: E402
from gptforge.model import GPTModel  # noqa: E402
from gptforge.serve import app as serve_app  # noqa: E402
from gptforge.serve.app import ConnectionLimits, background_server, create_app  # noqa: E402
from gptforge.serve.engine import Engine, SamplingParams  # noqa: E402
from gptforge.tokenizer import get_tokenizer, text_to_ids  # noqa: E402

CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
API_KEY = "limits-key"
STEP_S = 0.01  # a generation step of the slow language model
BATCH_S = 0.02  # a batch of the slow classifier
MANY = [f"message {i} about the prize" for i in range(2000)]  # 125 batches of 16


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits-models")
    return save_lm_and_classifier(root, CFG)


class SlowModel(GPTModel):
    def forward(self, idx, cache=None, positions=None, logits_at=None):
        time.sleep(STEP_S)
        return super().forward(idx, cache, positions, logits_at)


def slow_app(dirs, **settings):
    """The tiny models, slowed down: STEP_S per generation step, BATCH_S per classify batch."""
    lm = SlowModel(CFG)
    app = create_app(lm, dirs["clf"], model_id="slow", max_classify_texts=3000, **settings)
    app.state.served.classifier.model.register_forward_pre_hook(lambda module, args: time.sleep(BATCH_S))
    return app


@pytest.fixture(scope="module")
def slow_url(dirs):
    with background_server(slow_app(dirs)) as base:
        yield base


@pytest.fixture(scope="module")
def url(dirs):
    """Small limits, an API key, an extra allowed host and one CORS origin."""
    app = create_app(dirs["lm"], dirs["clf"], api_key=API_KEY, max_classify_texts=8,
                     max_classify_tokens=40, allowed_hosts=["myhost.lan", "*.example.org"],
                     cors_origins=["http://app.example.com"])
    with background_server(app) as base:
        yield base


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def engine_stats(base: str) -> dict:
    return httpx.get(f"{base}/health", headers=AUTH).json()["engine"]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


async def stream_times(client, body: dict) -> tuple[list[float], str]:
    """When the request was sent and when every streamed text chunk arrived, and the
    finish reason."""
    times, reason = [time.monotonic()], None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"]:
                    times.append(time.monotonic())
                reason = choice["finish_reason"] or reason
    return times, reason


# ------------------------------------------------------------------------------------
# classify: bounded, interleaved with generation, cancelled, timed out

def test_a_huge_classify_request_is_refused_while_a_stream_goes_on(slow_url):
    async def run():
        async with httpx.AsyncClient(base_url=slow_url, timeout=60) as client:
            stream = asyncio.create_task(stream_times(client, {"prompt": "Hi", "max_tokens": 30,
                                                               "temperature": 0}))
            start = time.monotonic()
            r = await client.post("/v1/classify", json={"input": ["t"] * 100_000})
            refused_after = time.monotonic() - start
            return r, refused_after, await stream

    r, refused_after, (times, reason) = asyncio.run(run())
    assert r.status_code == 413 and refused_after < 5
    error = r.json()["error"]
    assert error["code"] == "too_many_texts" and error["param"] == "input"
    assert "3000" in error["message"] and "--max-classify-texts" in error["message"]
    assert reason == "length" and len(times) > 1


def test_a_big_classify_runs_between_generation_steps(slow_url, dirs):
    """2,000 texts take seconds of model time; a stream started meanwhile gets its tokens
    at its usual pace, and the classify's answers are those of one big predict_proba."""
    before = engine_stats(slow_url)

    async def run():
        async with httpx.AsyncClient(base_url=slow_url, timeout=120) as client:
            start = time.monotonic()

            async def classify():
                r = await client.post("/v1/classify", json={"input": MANY})
                return r, time.monotonic()

            job = asyncio.create_task(classify())
            await asyncio.sleep(0.3)  # the classify is under way
            times, reason = await stream_times(client, {"prompt": "Once upon a time",
                                                        "max_tokens": 40, "temperature": 0})
            r, end = await job
            return r, start, end, times, reason

    r, start, end, times, reason = asyncio.run(run())
    assert r.status_code == 200, r.text
    classify_s = end - start
    first, gaps = times[1] - times[0], [b - a for a, b in zip(times[1:], times[2:])]
    print(f"\nclassify of {len(MANY)} texts: {classify_s:.2f} s; stream of {len(times) - 1} chunks: "
          f"first after {first * 1000:.0f} ms, longest gap {max(gaps) * 1000:.0f} ms, "
          f"median {sorted(gaps)[len(gaps) // 2] * 1000:.0f} ms")
    assert classify_s > 125 * BATCH_S  # the classify really took seconds
    assert reason == "length" and len(gaps) > 10
    assert times[-1] < end  # the stream finished while the classify was still running
    assert max(first, *gaps) < classify_s / 5

    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(MANY)))
    expected = TextClassifier.load(dirs["clf"]).predict_proba(MANY, batch_size=64)
    got = torch.tensor([[d["probabilities"]["ham"], d["probabilities"]["spam"]] for d in data])
    assert torch.allclose(got, expected, atol=1e-5)
    after = engine_stats(slow_url)
    assert after["job_steps"] - before["job_steps"] == 125  # batches of 16 short texts


def test_a_classify_whose_client_leaves_stops(slow_url):
    before = engine_stats(slow_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_url}/v1/classify", json={"input": MANY}, timeout=0.5)
    assert wait_for(lambda: engine_stats(slow_url)["cancelled"] == before["cancelled"] + 1)
    stopped = engine_stats(slow_url)
    time.sleep(0.3)
    after = engine_stats(slow_url)
    assert after["job_steps"] == stopped["job_steps"] and after["jobs"] == 0
    assert after["job_steps"] - before["job_steps"] < 100  # of 125
    assert after["completed"] == before["completed"]


def test_a_classify_is_bounded_by_the_timeout(dirs):
    with background_server(slow_app(dirs, timeout=0.5)) as base:
        start = time.monotonic()
        r = httpx.post(f"{base}/v1/classify", json={"input": MANY}, timeout=30)
        assert r.status_code == 504 and time.monotonic() - start < 2.5
        assert r.json()["error"]["code"] == "timeout" and "--timeout" in r.json()["error"]["message"]
        assert httpx.get(f"{base}/health").json()["engine"]["timed_out"] == 1


@pytest.mark.parametrize("path, body, status, code, needle", [
    ("/v1/classify", {"input": ["x"] * 9}, 413, "too_many_texts", "--max-classify-texts"),
    ("/v1/classify", {"input": ["one two three four five six seven eight nine ten"] * 5},
     413, "too_many_tokens", "--max-classify-tokens"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, None, "at most 4"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 501}, 400, None, "500 characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ["z"] * 9},
     400, None, "at most 4"),
    ("/v1/completions", {"prompt": ["a"] * 1000}, 413, "too_many_prompts", "at most 256"),
    ("/v1/completions", {"prompt": "x", "n": 100}, 400, None, "n=1"),
])
def test_every_endpoint_bounds_its_requests(url, path, body, status, code, needle):
    r = httpx.post(f"{url}{path}", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and needle in error["message"]


def test_classify_within_the_limits_is_answered(url):
    r = httpx.post(f"{url}/v1/classify", json={"input": ["short one", "and two"] * 4}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["data"]) == 8


def test_classify_batches_are_small():
    """Batches of at most 16 texts and 2048 padded tokens, in order, covering every text."""
    cut = serve_app._classify_batches
    assert cut([5] * 40) == [(0, 16), (16, 32), (32, 40)]
    assert cut([600, 600, 600, 600, 3]) == [(0, 3), (3, 5)]  # 4 x 600 > 2048
    assert cut([3, 3, 3000, 3]) == [(0, 2), (2, 3), (3, 4)]  # a long text alone
    assert cut([10] * 8, fixed_width=1024) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert cut([7]) == [(0, 1)]


def test_engine_runs_a_job_one_step_per_turn(dirs):
    """Between two steps of a job, an active generation always gets its forward pass;
    a cancelled job runs no further step; one past its deadline gets a TimeoutError."""
    model = GPTModel(CFG)
    order = []
    model.register_forward_pre_hook(lambda module, args: order.append("forward"))
    engine = Engine(model, get_tokenizer(), eos_id=None, max_active=2)
    events = []
    engine.submit(text_to_ids("Hi"), SamplingParams(max_tokens=6, temperature=0.0), events.append)
    job = engine.run_in_turns([lambda i=i: order.append(f"step {i}") or i for i in range(4)])
    engine.start()
    try:
        assert job.result(timeout=10) == [0, 1, 2, 3]
        assert wait_for(lambda: events and events[-1].finish_reason)
        assert order[:8] == ["step 0", "forward", "step 1", "forward", "step 2", "forward",
                             "step 3", "forward"]

        ran = []
        gate = engine.run_in_turns([lambda: time.sleep(0.2)] + [lambda: ran.append(1)] * 5)
        time.sleep(0.05)
        gate.cancel()
        assert wait_for(lambda: engine.snapshot()["jobs"] == 0)
        assert not ran and engine.snapshot()["cancelled"] == 1

        late = engine.run_in_turns([lambda: time.sleep(0.2)] * 3, timeout=0.1)
        with pytest.raises(TimeoutError):
            late.result(timeout=10)
        assert engine.snapshot()["timed_out"] == 1
    finally:
        engine.stop()


# ------------------------------------------------------------------------------------
# slow clients and the connection limit

def half_open(port: int, n: int) -> list[socket.socket]:
    """n connections that send half a request header and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHo")
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket, wait: float = 0.0) -> bool:
    """Whether the server closes `s` within `wait` seconds (what it sent before is skipped)."""
    deadline = time.monotonic() + wait
    try:
        while True:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            if s.recv(65536) == b"":
                return True
    except (socket.timeout, BlockingIOError):
        return False
    except ConnectionResetError:
        return True


def reply_of(s: socket.socket, wait: float = 5.0) -> bytes:
    """All the server sends on `s` until it closes it (or `wait` seconds pass)."""
    reply, deadline = b"", time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return reply


def health_latency(port: int) -> float:
    """Seconds for one GET /health over a new connection (raw socket, no client library)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    return time.monotonic() - start


def test_300_half_open_connections_leave_health_answering(dirs):
    """`gptforge serve` in a process limited to 256 file descriptors: 300 connections that
    send half a header do not exhaust them, and /health answers at once."""
    resource = pytest.importorskip("resource")
    del resource  # used by the server's process
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
            "from gptforge.cli import main; sys.exit(main(sys.argv[1:]))")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(dirs["lm"]),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    socks: list[socket.socket] = []
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None
        assert wait_for(up, timeout=90) and proc.poll() is None, proc.stdout.read().decode()
        start = time.monotonic()
        socks = half_open(port, 300)
        opened_s = time.monotonic() - start
        latencies = [health_latency(port) for _ in range(5)]
        print(f"\n300 half-open connections opened in {opened_s:.2f} s; /health then took "
              f"{max(latencies) * 1000:.0f} ms at most ({min(latencies) * 1000:.0f} ms at least)")
        assert max(latencies) < 1.0
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        if fd_dir.is_dir():
            assert len(list(fd_dir.iterdir())) < 256
        assert wait_for(lambda: sum(closed_by_server(s) for s in socks) >= 300 - 192, timeout=5)
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_connections_slow_to_send_headers_are_closed(dirs):
    app = create_app(dirs["lm"], body_timeout=0.5)
    limits = ConnectionLimits(header_timeout=0.5, keep_alive_timeout=0.5)
    with background_server(app, limits=limits) as base:
        port = int(base.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        partial, = half_open(port, 1)
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        try:
            start = time.monotonic()
            for s in (silent, partial, idle):
                assert closed_by_server(s, wait=5)
            assert time.monotonic() - start < 3
            reply = reply_of(slow_body)
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
            # A long answer is not cut by the header timeout: its headers came in time.
            r = httpx.post(f"{base}/v1/completions", timeout=30,
                           json={"prompt": "Hi", "max_tokens": 40, "temperature": 0})
            assert r.status_code == 200
        finally:
            for s in (silent, partial, idle, slow_body):
                s.close()


def test_at_the_connection_limit_the_oldest_half_open_one_makes_room(dirs):
    app = create_app(dirs["lm"], body_timeout=1.0)
    with background_server(app, limits=ConnectionLimits(max_connections=4)) as base:
        port = int(base.rsplit(":", 1)[1])
        socks = half_open(port, 4)
        try:
            assert health_latency(port) < 1.0
            assert closed_by_server(socks[0], wait=2)  # the oldest
            assert not any(closed_by_server(s) for s in socks[2:])
            for s in socks:
                s.close()
            # Four connections busy sending their bodies cannot be closed: a fifth is refused.
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
            for s in socks:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                          b"Content-Length: 50\r\n\r\n{")
            time.sleep(0.2)
            r = httpx.get(f"{base}/health")
            assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
            for s in socks:  # they run out of time and free their places
                assert reply_of(s).startswith(b"HTTP/1.1 408")
            assert wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, timeout=5)
        finally:
            for s in socks:
                s.close()


def test_the_connection_limit_stays_below_the_descriptor_limit(monkeypatch):
    resource = pytest.importorskip("resource")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 256))
    connections, per_turn = serve_app.connection_budget(256)
    assert connections == 192 and 8 <= per_turn <= (256 - connections - serve_app.FD_BASE) // 3 + 8
    assert serve_app.connection_budget(100)[0] == 100
    monkeypatch.setattr(resource, "getrlimit", lambda which: (48, 48))
    with pytest.raises(ValueError, match="ulimit -n"):
        serve_app.connection_budget(256)


# ------------------------------------------------------------------------------------
# Host header, CORS, /health

@pytest.mark.parametrize("host, allowed", [
    ("localhost", True), ("LOCALHOST:8000", True), ("127.0.0.1:1234", True), ("[::1]:8000", True),
    ("[::1]", True), ("myhost.lan:8000", True), ("api.example.org", True),
    ("evil.example", False), ("evil.example:8000", False), ("example.org", False),
    ("localhost.evil.example", False), ("10.1.2.3", False), ("", False),
])
def test_only_allowed_hosts_are_answered(url, host, allowed):
    r = httpx.get(f"{url}/health", headers={"Host": host})
    if allowed:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "host_not_allowed" and "--allow-host" in r.json()["error"]["message"]


def test_the_host_check_comes_before_the_api_key(url):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Host": "localhost"})
    assert r.status_code == 401


def test_any_host_with_a_star(dirs):
    with background_server(create_app(dirs["lm"], allowed_hosts=["*"])) as base:
        assert httpx.get(f"{base}/health", headers={"Host": "anything.example"}).status_code == 200


def test_cors_preflight_only_for_listed_origins(url):
    def preflight(origin: str):
        return httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})

    ok = preflight("http://app.example.com")
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://app.example.com"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = preflight("http://evil.example")
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    r = httpx.post(f"{url}/v1/classify", json={"input": "hi"},
                   headers={**AUTH, "Origin": "http://app.example.com"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example.com"


def test_no_cors_without_origins(dirs):
    with background_server(create_app(dirs["lm"])) as base:
        r = httpx.options(f"{base}/v1/completions", headers={
            "Origin": "http://app.example.com", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers


def test_health_shows_only_liveness_without_the_key(url):
    anonymous = httpx.get(f"{url}/health").json()
    assert anonymous == {"status": "ok", "auth_required": True}
    wrong = httpx.get(f"{url}/health", headers={"Authorization": "Bearer nope"}).json()
    assert wrong == anonymous
    full = httpx.get(f"{url}/health", headers=AUTH).json()
    assert full["status"] == "ok" and full["model"] == "tiny-lm" and "engine" in full


# ------------------------------------------------------------------------------------
# serve's flags

@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port must be 1-65535"),
    (["--port", "0"], "--port must be 1-65535"),
    (["--timeout", "-1"], "--timeout must be"),
    (["--timeout", "nan"], "--timeout must be"),
    (["--header-timeout", "0"], "--header-timeout must be"),
    (["--keep-alive-timeout", "-5"], "--keep-alive-timeout must be"),
    (["--body-timeout", "0"], "--body-timeout must be"),
    (["--max-active", "0"], "--max-active must be at least 1"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1"),
    (["--max-classify-texts", "0"], "--max-classify-texts must be at least 1"),
    (["--max-classify-tokens", "-3"], "--max-classify-tokens must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--host", ""], "--host"),
    (["--allow-host", "bad host/x"], "--allow-host"),
    (["--cors-origin", "app.example.com"], "--cors-origin"),
])
def test_bad_serve_flags_exit_2_with_one_message(capsys, flags, message):
    """Checked before anything loads: the model named here does not even exist."""
    from gptforge.cli import main

    assert main(["serve", "--model", "no-such-model-dir", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
