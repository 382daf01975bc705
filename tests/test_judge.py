"""Response scoring: ROUGE-L, exact match, bootstrap intervals, and the judge client against a
real HTTP server on 127.0.0.1 (OpenAI-style and Ollama-style), failures included."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptforge.cli import main
from gptforge.finetune.judge import (
    JudgeCache,
    JudgeClient,
    JudgeError,
    bootstrap_ci,
    evaluate_responses,
    exact_match,
    judge_endpoint,
    judge_prompt,
    lcs_length,
    parse_score,
    rouge_l_f1,
)

# ------------------------------------------------------------------------------------
# offline metrics


def test_lcs_and_rouge_l():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert lcs_length([], ["a"]) == 0
    assert rouge_l_f1("a b c d", "a c d e") == pytest.approx(0.75)
    # precision 2/2, recall 2/4 -> F1 = 2/3
    assert rouge_l_f1("the cat", "The cat sat down") == pytest.approx(2 / 3)
    assert rouge_l_f1("Same words", "same   WORDS") == 1.0
    assert rouge_l_f1("", "") == 1.0 and rouge_l_f1("x", "") == 0.0 and rouge_l_f1("x", "y") == 0.0


def test_exact_match_is_normalized():
    assert exact_match("The answer is 42.", "the answer is 42")
    assert exact_match("  Hello,   World! ", "hello world")
    assert not exact_match("The answer is 42", "The answer is 43")


def test_parse_score_never_guesses():
    assert parse_score("85") == 85
    assert parse_score(" 85.\n") == 85
    assert parse_score("**90**") == 90
    assert parse_score("100") == 100 and parse_score("0") == 0
    assert parse_score("70.0") == 70
    for reply in ("Score: 85", "101", "eighty", "85 out of 100", "", "-5", "7.5"):
        assert parse_score(reply) is None, reply


def test_bootstrap_ci_is_seeded():
    values = [10, 50, 90, 70, 30, 60]
    lo, hi = bootstrap_ci(values, seed=1)
    assert lo < sum(values) / len(values) < hi
    assert bootstrap_ci(values, seed=1) == (lo, hi)
    assert bootstrap_ci([42, 42, 42]) == (42.0, 42.0)
    assert bootstrap_ci([]) is None


def test_judge_prompt_is_the_books():
    entry = {"instruction": "Name a color.", "input": "", "output": "Blue.",
             "model_response": "Red."}
    assert judge_prompt(entry) == (
        "Given the input `Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nName a color.` and correct "
        "output `Blue.`, score the model response `Red.` on a scale from 0 to 100, where 100 is "
        "the best score. Respond with the integer number only.")


def test_judge_endpoint():
    assert judge_endpoint("http://h:1", "openai") == "http://h:1/v1/chat/completions"
    assert judge_endpoint("http://h:1/v1/", "openai") == "http://h:1/v1/chat/completions"
    assert judge_endpoint("http://h:1/v1/chat/completions", "openai") == "http://h:1/v1/chat/completions"
    assert judge_endpoint("http://h:11434", "ollama") == "http://h:11434/api/chat"
    with pytest.raises(ValueError):
        judge_endpoint("http://h:1", "claude")


# ------------------------------------------------------------------------------------
# a judge server on 127.0.0.1

# What the server answers, by the model response being scored.
ANSWERS = {"good": "90", "fine": "80", "chatty": "I would say 40", "flaky": "70", "slow": "50"}


class JudgeServer:
    """OpenAI-style (/v1/chat/completions) and Ollama-style (/api/chat) fake judge."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, dict]] = []
        self.failed_once: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.hits.append((self.path, body))
                prompt = body["messages"][0]["content"]
                response = re.search(r"score the model response `(.*?)`", prompt).group(1)
                if self.path not in ("/v1/chat/completions", "/api/chat"):
                    return self._send(404, {"error": "not found"})
                if response == "flaky" and response not in server.failed_once:
                    server.failed_once.add(response)
                    return self._send(500, {"error": "overloaded"})
                if response == "slow":
                    time.sleep(1.0)
                text = ANSWERS.get(response, "55")
                if self.path == "/api/chat":
                    return self._send(200, {"model": body["model"], "done": True,
                                            "message": {"role": "assistant", "content": text}})
                return self._send(200, {"choices": [{"index": 0, "message": {
                    "role": "assistant", "content": text}}]})

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with JudgeServer() as s:
        yield s


def entries(*responses: str) -> list[dict]:
    return [{"instruction": f"Task {i}.", "input": "", "output": "good", "model_response": r}
            for i, r in enumerate(responses)]


def test_openai_judge_scores_retries_and_reports(server, tmp_path):
    judge = JudgeClient(server.url, "judge-model", "openai", timeout=0.3, retries=1, backoff=0.01,
                        cache=tmp_path / "cache.json")
    report = evaluate_responses(entries("good", "chatty", "flaky", "slow", "fine"), judge=judge)
    j = report["judge"]
    assert (j["scored"], j["unparseable"], j["failed"]) == (3, 1, 1)
    assert j["mean_score"] == pytest.approx((90 + 70 + 80) / 3)
    assert j["ci95"][0] <= j["mean_score"] <= j["ci95"][1]
    # good 1, chatty 1, flaky 500 then ok 2, slow times out twice 2, fine 1
    assert j["requests"] == len(server.hits) == 7
    rows = report["entries"]
    assert rows[1]["judge_score"] is None and rows[1]["judge_reply"] == "I would say 40"
    assert rows[3]["judge_score"] is None and "timed out" in rows[3]["judge_error"]
    assert rows[0]["exact_match"] and rows[0]["rouge_l_f1"] == 1.0
    path, body = server.hits[0]
    assert path == "/v1/chat/completions"
    assert body["temperature"] == 0 and body["seed"] == 123 and body["model"] == "judge-model"


def test_cache_means_no_requests_on_rerun(server, tmp_path):
    data = entries("good", "chatty", "fine")
    cache = tmp_path / "cache.json"
    first = evaluate_responses(data, judge=JudgeClient(server.url, "m", "ollama", cache=cache))
    assert len(server.hits) == 3
    path, body = server.hits[0]
    assert path == "/api/chat" and body["stream"] is False
    assert body["options"]["temperature"] == 0 and body["options"]["seed"] == 123
    again = JudgeClient(server.url, "m", "ollama", cache=cache)
    second = evaluate_responses(data, judge=again)
    assert len(server.hits) == 3 and again.requests == 0 and again.cache_hits == 3
    assert second["entries"] == first["entries"]
    assert second["judge"]["mean_score"] == first["judge"]["mean_score"] == 85
    assert second["judge"]["unparseable"] == 1
    # keyed by model and prompt: another judge model is asked anew
    evaluate_responses(data[:1], judge=JudgeClient(server.url, "other", "ollama", cache=cache))
    assert len(server.hits) == 4
    key = JudgeCache.key("m", judge_prompt(data[0]))
    assert json.loads(cache.read_text())[key]["reply"] == "90"


def test_refused_and_unreachable_judges_raise(server, tmp_path):
    wrong_path = JudgeClient(server.url + "/nope/api/chat", "m", "ollama", retries=3)
    with pytest.raises(JudgeError, match="HTTP 404"):
        wrong_path.ask("score the model response `good`")
    assert len(server.hits) == 1  # not retried
    # a port nothing listens on: fails fast, gives up after a few failures in a row
    dead = JudgeClient("http://127.0.0.1:9", "m", retries=0, timeout=0.5)
    with pytest.raises(JudgeError, match="2 times in a row"):
        evaluate_responses(entries("good", "good", "good"), judge=dead, max_consecutive_failures=2)


def test_evaluate_responses_command_with_judge(server, tmp_path, capsys):
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(entries("good", "chatty", "fine")))
    argv = ["evaluate-responses", str(responses), "--judge-url", server.url, "--judge-model", "llama3",
            "--judge-api", "ollama", "--out", str(tmp_path / "report.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mean score 85.00" in out and "1 unparseable" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["judge"]["model"] == "llama3" and report["responses"] == 3
    assert (tmp_path / "judge_cache.json").is_file()
    assert main(argv) == 0
    assert len(server.hits) == 3  # the rerun came from the cache
    assert json.loads((tmp_path / "report.json").read_text())["judge"]["cache_hits"] == 3
    assert main(["evaluate-responses", str(responses), "--judge-url", server.url]) == 2
