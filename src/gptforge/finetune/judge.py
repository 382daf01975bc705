"""Scoring model responses: offline metrics and an LLM judge over HTTP.

Offline: ROUGE-L F1 (longest common subsequence of lowercased whitespace tokens),
normalized exact match, and optionally the model's own loss on the references.
Judge: the book's idea of asking a larger LLM to score each response from 0 to 100,
through an OpenAI-compatible `/v1/chat/completions` endpoint or Ollama's `/api/chat`,
with temperature 0 and a fixed seed, retries, timeouts, and an on-disk cache of
replies so that a rerun sends no requests. Replies that are not a bare integer
are counted as unparseable, never guessed at.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import string
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from gptforge.errors import BadInputError, GptforgeError
from gptforge.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

APIS = ("openai", "ollama")
API_KEY_ENV = "GPTFORGE_JUDGE_API_KEY"


# ------------------------------------------------------------------------------------
# offline metrics

def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L compares: lowercased, split on whitespace."""
    return text.lower().split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of `a` and `b` (dynamic programming, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of `candidate` against `reference`: the harmonic mean of LCS precision and recall."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c or not r:
        return float(c == r)  # both empty: a perfect match; one empty: none
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(candidate: str, reference: str) -> bool:
    """Whether the two texts are equal after `normalize_answer`."""
    return normalize_answer(candidate) == normalize_answer(reference)


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 123) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean of `values` (None if empty)."""
    import numpy as np

    if not values:
        return None
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------
# the judge

def judge_prompt(entry: Mapping[str, str], response_key: str = "model_response") -> str:
    """The book's scoring prompt for one entry: input, correct output, model response, 0-100."""
    from gptforge.finetune.templates import get_template

    # The task as the book shows it to the judge: the Alpaca prompt without its response header.
    task = get_template("alpaca").prompt(entry).removesuffix("\n\n### Response:\n")
    return (f"Given the input `{task}` and correct output `{entry['output']}`, "
            f"score the model response `{entry[response_key]}` on a scale from 0 to 100, "
            f"where 100 is the best score. Respond with the integer number only.")


_SCORE = re.compile(r"[\s*\"'`]*(\d{1,3})(?:\.0+)?[\s*\"'`.]*")


def parse_score(reply: str) -> int | None:
    """The score in a judge reply that is just an integer 0-100 (quotes, bold, a final period
    allowed); None for anything else."""
    match = _SCORE.fullmatch(reply)
    if not match:
        return None
    value = int(match.group(1))
    return value if 0 <= value <= 100 else None


class JudgeError(GptforgeError, RuntimeError):
    """The judge cannot be used at all (bad URL, unknown model, refused request)."""


@dataclass
class JudgeReply:
    """One judgement: the score (None if unparseable or failed), the raw reply, any error."""

    score: int | None
    text: str | None
    error: str | None = None
    cached: bool = False


class JudgeCache:
    """Judge replies on disk: a JSON object keyed by sha256 of (model, prompt)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise BadInputError(f"the judge cache {self.path} is not valid JSON; delete it to "
                                 f"start a fresh one") from None

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\n{prompt}".encode("utf-8")).hexdigest()

    def get(self, model: str, prompt: str) -> str | None:
        hit = self.entries.get(self.key(model, prompt))
        return None if hit is None else hit["reply"]

    def put(self, model: str, prompt: str, reply: str) -> None:
        self.entries[self.key(model, prompt)] = {"model": model, "reply": reply}
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(self.entries, indent=1, ensure_ascii=False).encode())


def judge_endpoint(url: str, api: str) -> str:
    """The full chat URL for a server base URL: adds /v1/chat/completions or /api/chat if missing."""
    if api not in APIS:
        raise BadInputError(f"judge API must be one of {', '.join(APIS)}, not {api!r}")
    url = url.rstrip("/")
    if api == "ollama":
        return url if url.endswith("/api/chat") else url + "/api/chat"
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class JudgeClient:
    """Ask a judge LLM to score prompts: deterministic settings, retries, timeouts, a cache.

    `api` is "openai" (any OpenAI-compatible server: vLLM, llama.cpp, LM Studio,
    Ollama's /v1, ...) or "ollama" (Ollama's native /api/chat). A request that
    times out, cannot connect, or gets HTTP 408/429/5xx is retried `retries` times,
    waiting `backoff`, 2x`backoff`, ... in between; other HTTP errors raise JudgeError.
    An API key, if the server needs one, is read from $GPTFORGE_JUDGE_API_KEY.
    """

    def __init__(self, url: str, model: str, api: str = "openai", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, seed: int = 123,
                 cache: str | os.PathLike | None = None, api_key: str | None = None) -> None:
        self.endpoint = judge_endpoint(url, api)
        self.model, self.api, self.timeout = model, api, timeout
        self.retries, self.backoff, self.seed = retries, backoff, seed
        self.cache = JudgeCache(cache)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.requests = 0  # HTTP requests sent, retries included
        self.cache_hits = 0

    def payload(self, prompt: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": prompt}]
        if self.api == "ollama":
            return {"model": self.model, "messages": messages, "stream": False,
                    "options": {"temperature": 0, "seed": self.seed, "num_ctx": 2048}}
        return {"model": self.model, "messages": messages, "temperature": 0, "seed": self.seed}

    def reply_text(self, body: Any) -> str:
        """The judge's message text in a response body (raises KeyError/TypeError if absent)."""
        if self.api == "ollama":
            return body["message"]["content"]
        return body["choices"][0]["message"]["content"]

    def _post_once(self, prompt: str) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(self.payload(prompt)).encode(),
                                         headers=headers, method="POST")
        self.requests += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read()
        try:
            return self.reply_text(json.loads(raw))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise _Retryable(f"malformed response from {self.endpoint}: {raw[:200]!r}") from None

    def ask(self, prompt: str) -> JudgeReply:
        """Score one prompt: from the cache if seen before, else over HTTP."""
        cached = self.cache.get(self.model, prompt)
        if cached is not None:
            self.cache_hits += 1
            return JudgeReply(parse_score(cached), cached, cached=True)
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                text = self._post_once(prompt)
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace")
                err.close()
                if err.code not in (408, 429) and err.code < 500:
                    raise JudgeError(f"the judge at {self.endpoint} refused the request: HTTP "
                                     f"{err.code} {err.reason} {detail}; check --judge-url, "
                                     f"--judge-model and --judge-api") from None
                error = f"HTTP {err.code} {err.reason}"
            except _Retryable as err:
                error = str(err)
            except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
                reason = getattr(err, "reason", None) or err
                error = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
            else:
                self.cache.put(self.model, prompt, text)
                return JudgeReply(parse_score(text), text)
            log.info("judge request failed (%s); attempt %d of %d", error, attempt + 1, self.retries + 1)
        return JudgeReply(None, None, error=f"{error} (after {self.retries + 1} attempts)")


class _Retryable(Exception):
    pass


# ------------------------------------------------------------------------------------
# the report

def evaluate_responses(
    entries: Sequence[Mapping[str, Any]],
    response_key: str = "model_response",
    model=None,
    template: Any = "alpaca",
    judge: JudgeClient | None = None,
    on_judged: Callable[[int], None] | None = None,
    max_consecutive_failures: int = 5,
    batch_size: int = 8,
    seed: int = 123,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Score responses against the references ("output"); return the report as a dict.

    Always: mean ROUGE-L F1 and exact match. With `model`: its mean loss on the
    reference responses (`tokenizer`: the model's; default GPT-2's). With `judge`: scores 0-100, their mean and a seeded
    bootstrap 95% interval, plus counts of unparseable replies and failed requests.
    The judge is given up on (JudgeError) after `max_consecutive_failures` failures in a row.
    """
    for i, entry in enumerate(entries):
        for key in ("instruction", "output", response_key):
            if key not in entry:
                raise BadInputError(f"entry {i} has no {key!r} key; evaluate a responses.json written "
                                 f"by `gptforge finetune instruct` (or name the key with --response-key)")
    rows = []
    for i, entry in enumerate(entries):
        response, reference = str(entry[response_key]), str(entry["output"])
        rows.append({"index": i, "rouge_l_f1": rouge_l_f1(response, reference),
                     "exact_match": exact_match(response, reference)})
    n = len(rows)
    report: dict[str, Any] = {
        "responses": n,
        "response_key": response_key,
        "rouge_l_f1": sum(r["rouge_l_f1"] for r in rows) / n if n else None,
        "exact_match": sum(r["exact_match"] for r in rows) / n if n else None,
    }
    if model is not None:
        from gptforge.finetune.instruct import response_loss

        report["reference_loss"] = response_loss(model, entries, template, batch_size, tokenizer=tokenizer)
    if judge is not None:
        scores: list[int] = []
        unparseable, failed, in_a_row = 0, 0, 0
        for entry, row in zip(entries, rows):
            reply = judge.ask(judge_prompt(entry, response_key))
            row["judge_score"] = reply.score
            if reply.error:
                failed += 1
                in_a_row += 1
                row["judge_error"] = reply.error
                if in_a_row >= max_consecutive_failures:
                    raise JudgeError(f"the judge at {judge.endpoint} failed {in_a_row} times in a row "
                                     f"(last: {reply.error}); check that it is running. Replies so "
                                     f"far are cached, so a rerun continues where this one stopped")
            else:
                in_a_row = 0
                if reply.score is None:
                    unparseable += 1
                    row["judge_reply"] = reply.text
                else:
                    scores.append(reply.score)
            if on_judged:
                on_judged(1)
        ci = bootstrap_ci(scores, seed=seed)
        report["judge"] = {
            "url": judge.endpoint, "model": judge.model, "api": judge.api,
            "scored": len(scores), "unparseable": unparseable, "failed": failed,
            "mean_score": sum(scores) / len(scores) if scores else None,
            "ci95": list(ci) if ci else None,
            "requests": judge.requests, "cache_hits": judge.cache_hits,
        }
    report["entries"] = rows
    return report


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    return path


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A few human-readable lines about a report."""
    lines = [f"responses: {report['responses']}"]
    if report["rouge_l_f1"] is not None:
        lines.append(f"ROUGE-L F1: {report['rouge_l_f1']:.3f}   exact match: {report['exact_match']:.3f}")
    loss = report.get("reference_loss")
    if loss:
        lines.append(f"model loss on reference responses: {loss['mean_loss']:.3f} "
                     f"(perplexity {loss['perplexity']:.1f}) over {loss['tokens']} tokens")
    judge = report.get("judge")
    if judge:
        if judge["mean_score"] is not None:
            lo, hi = judge["ci95"]
            lines.append(f"judge {judge['model']}: mean score {judge['mean_score']:.2f} "
                         f"(95% CI {lo:.2f}-{hi:.2f}) over {judge['scored']} responses")
        else:
            lines.append(f"judge {judge['model']}: no response could be scored")
        lines.append(f"judge: {judge['unparseable']} unparseable, {judge['failed']} failed, "
                     f"{judge['requests']} requests, {judge['cache_hits']} cached")
    return lines
