"""The HTTP server: OpenAI-compatible endpoints and a chat page, on FastAPI.

`create_app` loads a language model (and optionally a classifier) and returns the
ASGI app. Generation runs in `Engine`'s worker thread; the handlers here only
tokenize, validate, hand requests to the engine and turn its events into JSON or
server-sent events, so the event loop never waits on the model.

Endpoints: `POST /v1/completions` (with logprobs, echo, scoring with `max_tokens: 0`
and lists of prompts, as OpenAI's legacy API and vLLM), `POST /v1/chat/completions`
(both with `stream`), `GET /v1/models`, `POST /v1/classify`, vLLM's `GET
/tokenizer_info`, `POST /tokenize` and `POST /detokenize`, `GET /health`, and the page at `/`.
Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every request passes, in order: the Host check (`HostGuard`, against DNS
rebinding), CORS (only with `cors_origins`), then the API key and the body limits
(`RequestGuard`). Below HTTP, `server_config` gives uvicorn a protocol that
closes connections slow to send their headers and holds at most
`ConnectionLimits.max_connections` of them (`background_server` and `serve`
both use it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from gptforge.checkpoint import RunMeta
from gptforge.errors import BadInputError
from gptforge.model import GPTModel
from gptforge.serve.engine import Engine, Event, SamplingParams
from gptforge.serve.logprobs import MAX_LOGPROBS, TokenLogprob, openai_logprobs, score, score_batches, text_end

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
# Paths open without the API key: the page itself (it asks for the key) and the health check.
OPEN_PATHS = frozenset({"/", "/health"})
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 256  # prompts in one completions request (one choice each)
# One step of a scoring job (echo with max_tokens 0): prompts x padded length.
SCORE_BATCH_TOKENS = 2048
DISCONNECT_CHECK_S = 0.25  # how often a non-streamed request checks that its client is still there
# Host header names every server answers to; `allowed_hosts` adds more.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 500  # each stop sequence is searched for at every token: keep them short
# One step of a classify job on the engine's worker, so a stream waits for at most one of them.
CLASSIFY_BATCH_TEXTS = 16
CLASSIFY_BATCH_TOKENS = 2048  # texts x padded length
# File descriptors the server process needs besides its connections (model files, pipes,
# the listening socket, ...); the connection limit stays below the process's limit by more.
FD_BASE = 32
# Connections the kernel holds for the server until it accepts them; they use no descriptor.
LISTEN_QUEUE = 2048


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, close: bool = False) -> JSONResponse:
        """The JSON response; `close`: end the connection after it (the body was not all read)."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if close:
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


# ------------------------------------------------------------------------------------
# request bodies (unknown fields are accepted and ignored, as OpenAI clients send many)

class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but accepted as vLLM does
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokens: list[int]


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str]


# ------------------------------------------------------------------------------------
# the guards in front of every request: Host header, then API key and body

def _host_name(value: str) -> str | None:
    """The name in a Host header (or an allowed-host entry), lower case, without the port
    or IPv6 brackets; None when it is not a host name at all."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1] or [::1]:8000
        name, _, port = value[1:].partition("]")
        if port and not (port.startswith(":") and port[1:].isdigit()):
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.rstrip(".")  # "localhost." is "localhost"
    if not name or any(c in name for c in " /\\@?#"):
        return None
    return name


def _check_hosts(allowed_hosts: Sequence[str]) -> frozenset[str]:
    """The allowed Host names, checked; "*" allows any and "*.example.com" its subdomains."""
    names = set()
    for entry in allowed_hosts:
        name = "*" if entry.strip() == "*" else _host_name(entry)
        if name is None or (name.startswith("*") and not (name == "*" or name.startswith("*."))):
            raise BadInputError(f"{entry!r} is not a host name to allow (--allow-host): give a name "
                                f"such as 'myhost.lan' or '192.168.1.5', '*.example.com' for its "
                                f"subdomains, or '*' for any")
        names.add(name)
    return frozenset(names)


class HostGuard:
    """ASGI middleware: refuses (400) a request whose Host header names a host this server
    does not answer to.

    Allowed are the loopback names, `allowed_hosts` ("*" allows any Host), and the
    address the connection came in on (so a server bound to 0.0.0.0 answers to its IP
    addresses). This defeats DNS rebinding: a web page that points its own domain at
    this server's address still sends its own domain as the Host. A request with no
    Host header (HTTP/1.0) passes: browsers always send one.
    """

    def __init__(self, app, allowed_hosts: Sequence[str] = ()) -> None:
        self.app = app
        names = _check_hosts(allowed_hosts)
        self.any = "*" in names
        self.names = LOOPBACK_HOSTS | {n for n in names if not n.startswith("*")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".example.com"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.any:
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"), None)
        if host is None or self._allowed(_host_name(host), scope.get("server")):
            return await self.app(scope, receive, send)
        error = APIError(400, f"The Host header {host!r} is not a name this server answers to. If "
                              f"this server is meant to be reached by that name, start it with "
                              f"--allow-host NAME.", code="host_not_allowed")
        await error.response()(scope, receive, send)

    def _allowed(self, name: str | None, server: tuple | None) -> bool:
        if name is None:
            return False
        if name in self.names or name.endswith(self.suffixes):
            return True
        local = server[0].lower() if server else None
        if local is None:
            return False
        try:  # the address the client connected to, in any spelling
            return _address(name) == _address(local)
        except ValueError:
            return False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address; an IPv4 one reached over IPv6 (::ffff:a.b.c.d) as the IPv4 address."""
    address = ipaddress.ip_address(text)
    return getattr(address, "ipv4_mapped", None) or address


def _check_origins(origins: Sequence[str]) -> tuple[str, ...]:
    """The CORS origins, checked: each "*" or a scheme and host such as "https://app.example.com"."""
    checked = []
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin != "*" and not (sep and scheme in ("http", "https") and rest
                                  and not any(c in rest for c in "/?# ")):
            raise BadInputError(f"{origin!r} is not a web origin (--cors-origin): give scheme and host "
                                f"(and port), as a browser sends it, e.g. 'https://app.example.com' or "
                                f"'http://localhost:3000', or '*' for any")
        checked.append(origin)
    return tuple(checked)


def _key_matches(authorization: str, api_key: str) -> bool:
    """Whether an Authorization header carries `Bearer <api_key>` (compared in constant time)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class RequestGuard:
    """ASGI middleware: checks the API key (Bearer) and caps the request body's size and
    the time it may take to arrive.

    The body is read up to `max_body_bytes` before the app sees it, so an
    oversized body is refused with 413 whether or not it declares its length; a
    body that has not all arrived `body_timeout` seconds after the headers gets 408.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout: float = 30.0) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            error = APIError(401, "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'.",
                             code="invalid_api_key")
            return await error.response()(scope, receive, send)
        too_large = APIError(413, f"The request body is larger than this server's limit of "
                                  f"{self.max_body_bytes} bytes.", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large.response(close=True)(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                error = APIError(408, f"The request body did not arrive within this server's limit of "
                                      f"{self.body_timeout:g} s.", code="request_timeout")
                return await error.response(close=True)(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await too_large.response(close=True)(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # from here on: the client's disconnect

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        return _key_matches(headers.get("authorization", ""), self.api_key)


# ------------------------------------------------------------------------------------
# the served models

class ServedModels:
    """The loaded models, their ids and the engine that runs them."""

    def __init__(self, model: GPTModel, model_id: str, meta: RunMeta | None, engine: Engine,
                 tokenizer, classifier=None, classifier_id: str | None = None,
                 timeout: float | None = None, template=None) -> None:
        from gptforge.finetune.instruct import template_of

        self.model, self.model_id, self.meta, self.engine = model, model_id, meta, engine
        self.tokenizer = tokenizer
        self.template = template or template_of(meta, tokenizer=tokenizer)
        self.classifier, self.classifier_id = classifier, classifier_id  # a TextClassifier
        self.timeout = timeout
        self.created = int(time.time())

    @property
    def context_length(self) -> int:
        return self.model.cfg.context_length

    def model_cards(self) -> list[dict[str, Any]]:
        ids = [self.model_id] + ([self.classifier_id] if self.classifier is not None else [])
        return [{"id": i, "object": "model", "created": self.created, "owned_by": "gptforge"}
                for i in ids]

    def check_model(self, requested: str | None, served: str | None) -> None:
        """404 unless `requested` (when given) names the served model `served`."""
        if served is None:
            raise APIError(404, "No classifier is loaded: start the server with --classifier RUN.",
                           param="model", code="model_not_found")
        if requested is not None and requested != served:
            raise APIError(404, f"The model '{requested}' does not exist; this endpoint serves "
                                f"'{served}'.", param="model", code="model_not_found")


def _source_id(source: str | os.PathLike) -> str:
    """A model's id: the directory's name for a path, the name itself for a preset."""
    path = Path(source)
    return path.resolve().name if path.exists() else str(source)


def _load_language_model(source: str | os.PathLike | GPTModel,
                         device: str) -> tuple[GPTModel, RunMeta | None]:
    """The model to serve and its run metadata (None for a model passed in directly)."""
    if isinstance(source, nn.Module):
        return source.to(device).eval(), None
    from gptforge.loader import load, read_run

    meta = read_run(source)
    if meta.task == "classifier":
        raise BadInputError(f"{source} is a classifier: serve a language model with --model and "
                            f"add the classifier with --classifier")
    return load(source, device=device), meta


# ------------------------------------------------------------------------------------
# turning requests into engine work

def _sampling(body: _SamplingRequest, max_tokens: int | None, default_max_tokens: int,
              extra_stop: tuple[str, ...] = (), logprobs: int | None = None,
              prompt_logprobs: bool = False) -> SamplingParams:
    if body.n not in (None, 1):
        raise APIError(400, f"Only n=1 is supported, got n={body.n}.", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise APIError(400, f"temperature must be a number >= 0 (0 means greedy), got "
                            f"{body.temperature}.", param="temperature")
    if body.top_p is not None and not (math.isfinite(body.top_p) and 0 < body.top_p <= 1):
        raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}.", param="top_p")
    if body.top_k is not None and body.top_k < 1:
        raise APIError(400, f"top_k must be at least 1, got {body.top_k}.", param="top_k")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}.",
                       param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"Each stop sequence may be at most {MAX_STOP_CHARS} characters long.",
                       param="stop")
    return SamplingParams(max_tokens=max_tokens or default_max_tokens, temperature=temperature,
                          top_k=body.top_k, top_p=body.top_p, stop=tuple(stop) + extra_stop,
                          seed=body.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _logprobs_count(body: CompletionRequest) -> int | None:
    """How many alternatives a completion wants listed per token; None: no logprobs."""
    value = body.logprobs
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be a whole number from 0 to {MAX_LOGPROBS}: how many of "
                            f"the most likely tokens to list at each position, got {value!r}.",
                       param="logprobs")
    return value


def _check_length(prompt: list[int], context_length: int, param: str) -> None:
    if len(prompt) > context_length:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens, "
                            f"but the {param} has {len(prompt)} tokens. Shorten the {param}.",
                       param=param, code="context_length_exceeded")


@dataclass(frozen=True)
class _Prompt:
    """One prompt of a completion request: its token ids and the text `echo` repeats."""

    ids: list[int]
    text: str


def _completion_prompts(body: CompletionRequest, served: ServedModels) -> list[_Prompt]:
    """The request's prompts: a text, token ids, or a list of either (one choice each)."""
    from gptforge.tokenizer import EOT_ID, text_to_ids

    prompts: Any = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError(400, "prompt is an empty list: give a text, token ids, or a list of them.",
                       param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(413, f"This request has {len(prompts)} prompts; this server takes at most "
                            f"{MAX_PROMPTS} per request. Send them in smaller requests.",
                       param="prompt", code="too_many_prompts")
    vocab = served.model.cfg.vocab_size
    start = getattr(served.tokenizer, "bos_id", None) or EOT_ID
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = text_to_ids(prompt, served.tokenizer)
        else:
            ids = list(prompt)
            if any(not 0 <= t < vocab for t in ids):
                where = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
                raise APIError(400, f"Token ids must be in [0, {vocab}) ({where}).", param="prompt")
        # An empty prompt starts from the start token: <|endoftext|> for GPT-2, as it was trained.
        text = prompt if isinstance(prompt, str) else served.tokenizer.decode(ids)
        out.append(_Prompt(ids or [start], text))
    return out


def _tokenizer_info(served: ServedModels) -> dict[str, Any]:
    """What vLLM's /tokenizer_info tells of the tokenizer: its special tokens, chat template
    and the longest input."""
    from gptforge.tokenizer import ENDOFTEXT

    tokenizer = served.tokenizer
    if hasattr(tokenizer, "special_tokens_map"):  # a Hugging Face tokenizer (HFTokenizer)
        eos, bos = tokenizer.eos_token, tokenizer.bos_token
        pad = tokenizer.special_tokens_map.get("pad_token")
        template = tokenizer.chat_template
    else:  # GPT-2's BPE: <|endoftext|> is all of them, as in transformers' GPT-2 tokenizer
        eos = bos = ENDOFTEXT
        pad, template = None, None
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": eos, "bos_token": bos,
            "pad_token": pad, "chat_template": template, "model_max_length": served.context_length}


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`text`'s token ids, special tokens written in it recognised; with `add_special_tokens`
    as a whole model input (the model's BOS first, where it has one)."""
    from gptforge.tokenizer import text_to_ids

    if add_special_tokens:
        return text_to_ids(text, tokenizer)
    return tokenizer.encode(text, allowed_special="all")


def _chat_prompt(body: ChatRequest, served: ServedModels) -> list[int]:
    from gptforge.finetune.templates import render_chat
    from gptforge.tokenizer import text_to_ids

    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):  # content parts: only text is understood
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, "Only text content parts are supported.",
                               param=f"messages.[{i}].content")
            content = "".join(str(part.get("text", "")) for part in content)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content or ""})
    try:
        text = render_chat(messages, served.template)
    except ValueError as err:
        raise APIError(400, str(err), param="messages") from None
    return text_to_ids(text, served.tokenizer)


async def _events(request: Request, served: ServedModels, prompts: list[list[int]],
                  params: SamplingParams, watch_disconnect: bool) -> AsyncIterator[tuple[int, Event]]:
    """Run a generation on the engine for each prompt and yield (prompt's index, event)
    until all have finished.

    Leaving early (the client went away, or this task was cancelled) cancels the
    generations, so the engine stops spending steps on them.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    gens = []
    try:
        for i, prompt in enumerate(prompts):
            def on_event(event: Event, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))

            try:
                gens.append(served.engine.submit(prompt, params, on_event, served.timeout))
            except ValueError as err:
                raise APIError(400, str(err)) from None
        running = len(gens)
        next_check = loop.time() + DISCONNECT_CHECK_S
        while running:
            if not watch_disconnect:
                # A streaming response learns of a disconnect from Starlette, which cancels us.
                item = await queue.get()
            else:  # a plain response has to ask, every DISCONNECT_CHECK_S
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, next_check - loop.time()))
                except asyncio.TimeoutError:
                    item = None
                if loop.time() >= next_check:
                    if await request.is_disconnected():
                        return
                    next_check = loop.time() + DISCONNECT_CHECK_S
                if item is None:
                    continue
            yield item
            if item[1].finish_reason is not None:
                running -= 1
    finally:
        for gen in gens:
            gen.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _timeout_error(timeout: float | None, advice: str) -> APIError:
    return APIError(504, f"The request took longer than this server's limit of {timeout:g} s "
                         f"(--timeout); {advice}.", type="timeout_error", code="timeout")


def _failure(event: Event, timeout: float | None) -> APIError | None:
    if event.finish_reason == "timeout":
        return _timeout_error(timeout, "ask for fewer tokens (max_tokens) or try again")
    if event.finish_reason == "error":
        return APIError(500, f"Generation failed: {event.error}", type="server_error")
    return None


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class _Choice:
    """One choice of an answer as it is put together: the prompt it continues, the text
    and logprobs so far, the last event."""

    prompt: _Prompt
    echo: bool = False
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    last: Event | None = None
    sent_chars: int = 0  # streaming: characters of the choice's tokens sent so far

    def add(self, event: Event) -> None:
        self.pieces.append(event.text)
        self.logprobs += event.logprobs
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.last = event

    @property
    def text(self) -> str:
        return (self.prompt.text if self.echo else "") + "".join(self.pieces)

    def logprobs_object(self, tokenizer) -> dict[str, Any]:
        """OpenAI's logprobs of the whole choice: the echoed prompt's, then the tokens generated."""
        entries = [*(self.prompt_logprobs if self.echo else ()), *self.logprobs]
        tokens = [*(self.prompt.ids if self.echo else ()), *(e.token for e in self.logprobs)]
        return openai_logprobs(tokenizer, entries, tokens, 0, len(self.text))


def _completion_choice(served: ServedModels, index: int, choice: _Choice,
                       logprobs: int | None) -> dict[str, Any]:
    return {"index": index, "text": choice.text, "finish_reason": choice.last.finish_reason,
            "logprobs": None if logprobs is None else choice.logprobs_object(served.tokenizer)}


def _head(served: ServedModels, chat: bool) -> dict[str, Any]:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": served.model_id}


async def _respond(request: Request, served: ServedModels, prompts: list[_Prompt], params: SamplingParams,
                   stream: bool, include_usage: bool, chat: bool, echo: bool = False) -> Any:
    """The whole answer as one JSON object, or a stream of chunks ending in `data: [DONE]`:
    one choice per prompt (chat: one prompt), in the prompts' order."""
    head = _head(served, chat)
    ids = [p.ids for p in prompts]
    prompt_tokens = sum(len(p) for p in ids)
    choices = [_Choice(p, echo) for p in prompts]

    if not stream:
        async for i, event in _events(request, served, ids, params, watch_disconnect=True):
            choices[i].add(event)
        if any(c.last is None or c.last.finish_reason is None for c in choices):
            return JSONResponse({}, status_code=499)  # the client left; nobody reads this answer
        for c in choices:
            failure = _failure(c.last, served.timeout)
            if failure:
                raise failure
        usage = _usage(prompt_tokens, sum(c.last.completion_tokens for c in choices))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": choices[0].text},
                      "logprobs": None, "finish_reason": choices[0].last.finish_reason}
            return {**head, "choices": [choice], "usage": usage}
        return {**head, "choices": [_completion_choice(served, i, c, params.logprobs)
                                    for i, c in enumerate(choices)], "usage": usage}

    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish_reason: str | None = None, role: bool = False,
              logprobs: Any = None) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice]})

    def chunk_logprobs(c: _Choice, event: Event) -> dict[str, Any] | None:
        """The logprobs of the tokens this event brings (with the echoed prompt's, first)."""
        if params.logprobs is None:
            return None
        entries, tokens = list(event.logprobs), [e.token for e in event.logprobs]
        if echo and event.prompt_logprobs is not None:
            entries, tokens = [*event.prompt_logprobs, *entries], [*c.prompt.ids, *tokens]
        out = openai_logprobs(served.tokenizer, entries, tokens, c.sent_chars)
        if tokens:
            c.sent_chars = text_end(served.tokenizer, tokens, c.sent_chars)
        return out

    async def body() -> AsyncIterator[str]:
        if chat:
            yield chunk(0, "", role=True)
        echoed = [False] * len(choices)
        completion_tokens = 0
        async for i, event in _events(request, served, ids, params, watch_disconnect=False):
            c = choices[i]
            text = event.text
            if echo and not echoed[i]:
                text, echoed[i] = c.prompt.text + text, True
            logprobs = chunk_logprobs(c, event)
            if text or (logprobs and logprobs["tokens"]):
                yield chunk(i, text, logprobs=logprobs)
            if event.finish_reason is None:
                continue
            failure = _failure(event, served.timeout)
            if failure:
                yield _sse(failure.body())
                yield _sse("[DONE]")
                return
            completion_tokens += event.completion_tokens
            yield chunk(i, None, event.finish_reason)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")

    return _event_stream(body())


def _event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _score(request: Request, served: ServedModels, prompts: list[_Prompt], logprobs: int | None,
                 stream: bool, include_usage: bool) -> Any:
    """A completion with echo and max_tokens 0: the prompts themselves and, with `logprobs`,
    their tokens' log-probabilities, from one forward pass per batch of prompts (an
    engine job, so streams go on meanwhile); no generation."""
    head = _head(served, chat=False)
    choices = [_Choice(p, echo=True, last=Event(finish_reason="length")) for p in prompts]
    if logprobs is not None:
        ids = [p.ids for p in prompts]
        steps = [partial(score, served.model, ids[a:b], logprobs)
                 for a, b in score_batches([len(p) for p in ids], SCORE_BATCH_TOKENS)]
        future = served.engine.run_in_turns(steps, served.timeout)
        try:
            finished, parts = await _job_result(request, future)
        except TimeoutError:
            raise _timeout_error(served.timeout, "send fewer or shorter prompts per request") from None
        except Exception as err:
            raise APIError(500, f"Scoring failed: {type(err).__name__}: {err}",
                           type="server_error") from None
        if not finished:  # the client left; nobody reads this answer
            return JSONResponse({}, status_code=499)
        for c, scored in zip(choices, (row for part in parts for row in part)):
            c.prompt_logprobs = (None, *scored)
    answers = [_completion_choice(served, i, c, logprobs) for i, c in enumerate(choices)]
    usage = _usage(sum(len(p.ids) for p in prompts), 0)
    if not stream:
        return {**head, "choices": answers, "usage": usage}

    async def body() -> AsyncIterator[str]:
        for answer in answers:
            yield _sse({**head, "choices": [answer]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage})
        yield _sse("[DONE]")

    return _event_stream(body())


def _classify_lengths(classifier, texts: list[str]) -> list[int]:
    """How many tokens of each text the classifier reads (texts are cut at its max_length)."""
    return [min(len(ids), classifier.max_length)
            for ids in classifier.tokenizer.encode_ordinary_batch(texts)]


def _classify_batches(lengths: list[int], fixed_width: int | None = None) -> list[tuple[int, int]]:
    """Split texts of these token lengths, in order, into (start, end) batches of at most
    CLASSIFY_BATCH_TEXTS texts and CLASSIFY_BATCH_TOKENS padded tokens (one text at least).

    `fixed_width`: every text is padded to it (the "last" pooling), not to its batch's longest."""
    batches, start, width = [], 0, 0
    for i, n in enumerate(lengths):
        wider = fixed_width or max(width, n)
        if i > start and ((i - start + 1) * wider > CLASSIFY_BATCH_TOKENS
                          or i - start >= CLASSIFY_BATCH_TEXTS):
            batches.append((start, i))
            start, wider = i, fixed_width or n
        width = wider
    batches.append((start, len(lengths)))
    return batches


async def _job_result(request: Request, future: concurrent.futures.Future) -> tuple[bool, Any]:
    """Wait for an engine job: (True, its result), or (False, None) once the client has
    gone away. Leaving early, for either reason, cancels the job."""
    waiter = asyncio.wrap_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_CHECK_S)
            if done:
                return True, waiter.result()
            if await request.is_disconnected():
                return False, None
    finally:
        future.cancel()  # no-op once it has finished


def _positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"{name} must be a positive number, got {value}")


# ------------------------------------------------------------------------------------
# the app

def create_app(model_dir: str | os.PathLike | GPTModel, classifier_dir: str | os.PathLike | None = None,
               api_key: str | None = None, *, timeout: float | None = None,
               max_body_bytes: int = 1_000_000, device: str = "cpu", max_active: int = 16,
               model_id: str | None = None, body_timeout: float = 30.0,
               max_classify_texts: int = 256, max_classify_tokens: int = 65536,
               allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = (),
               quantize: str | None = None, draft: str | os.PathLike | GPTModel | None = None,
               draft_tokens: int = 4) -> FastAPI:
    """Build the server app for a language model and, optionally, a classifier.

    `model_dir` is a run directory, checkpoint or preset name (anything `gptforge
    generate --model` takes) or a loaded GPTModel; `classifier_dir` a classifier
    run directory. When `api_key` is set, every request but the page and
    `/health` must send `Authorization: Bearer <api_key>`, and `/health` shows
    only liveness without it. `timeout` (seconds, None = no limit) bounds each
    generation and classification, queueing included; `max_body_bytes` and
    `body_timeout` bound request bodies; `max_active` is how many generations
    advance together; `max_classify_texts` and `max_classify_tokens` bound one
    classify request. Requests must name a loopback host or one of
    `allowed_hosts` in their Host header; `cors_origins` lists the web origins
    whose pages may call the API. `quantize="int8"` serves int8 weights (CPU);
    `draft` is a smaller model with the same tokenizer that speeds up a request
    decoding alone by speculative decoding (`draft_tokens` proposed per check).
    Settings are checked before any model loads. The engine's worker starts and
    stops with the app (its lifespan).
    """
    from gptforge.finetune.instruct import end_ids, template_of
    from gptforge.loader import tokenizer_for
    from gptforge.tokenizer import get_tokenizer

    if timeout is not None:
        _positive("timeout", timeout)
    _positive("body_timeout", body_timeout)
    for name, value in (("max_body_bytes", max_body_bytes), ("max_active", max_active),
                        ("max_classify_texts", max_classify_texts),
                        ("max_classify_tokens", max_classify_tokens)):
        if value < 1:
            raise BadInputError(f"{name} must be at least 1, got {value}")
    _check_hosts(allowed_hosts)
    origins = _check_origins(cors_origins)
    if quantize not in (None, "int8"):
        raise BadInputError(f"quantize must be 'int8' or None, got {quantize!r}")
    if quantize and device != "cpu":
        raise BadInputError(f"int8 weights are served on the CPU only, not on {device}")
    model, meta = _load_language_model(model_dir, device)
    draft_model = _load_language_model(draft, device)[0] if draft is not None else None
    classifier, classifier_id = None, None
    if classifier_dir is not None:
        from gptforge.finetune.classify import TextClassifier

        classifier = TextClassifier.load(classifier_dir, device)  # labels, pooling, max_length
    lm_id = model_id or ("gptforge" if isinstance(model_dir, nn.Module) else _source_id(model_dir))
    if classifier_dir is not None:
        classifier_id = _source_id(classifier_dir)
        classifier_id = classifier_id + "-classifier" if classifier_id == lm_id else classifier_id
    tokenizer = get_tokenizer() if isinstance(model_dir, nn.Module) else tokenizer_for(model_dir)
    template = template_of(meta, tokenizer=tokenizer)
    if draft_model is not None and not isinstance(draft, nn.Module):
        from gptforge.speculative import check_tokenizers

        check_tokenizers(tokenizer, tokenizer_for(draft))
    if quantize:
        from gptforge.quantize import quantize_int8

        model = quantize_int8(model)
        draft_model = quantize_int8(draft_model) if draft_model is not None else None
    engine = Engine(model, tokenizer, eos_id=end_ids(tokenizer, template), max_active=max_active,
                    draft=draft_model, draft_tokens=draft_tokens)
    served = ServedModels(model, lm_id, meta, engine, tokenizer, classifier, classifier_id, timeout, template)
    page = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="gptforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    # The last added runs first: Host check, then CORS (it answers preflights), then key and body.
    app.add_middleware(RequestGuard, api_key=api_key or None, max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout)
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(HostGuard, allowed_hosts=list(allowed_hosts))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else f"Invalid request body: {first['msg']}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = (f"Invalid URL ({request.method} {request.url.path})" if err.status_code == 404
                   else str(err.detail))
        return APIError(err.status_code, message).response()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if api_key and not _key_matches(request.headers.get("authorization", ""), api_key):
            # Liveness only; the page reads auth_required to ask for the key.
            return {"status": "ok", "auth_required": True}
        labels = served.classifier.labels if served.classifier is not None else None
        return {"status": "ok", "model": served.model_id, "classifier": served.classifier_id,
                "labels": labels, "context_length": served.context_length,
                "auth_required": bool(api_key), "engine": engine.snapshot()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": served.model_cards()}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        for card in served.model_cards():
            if card["id"] == name:
                return card
        raise APIError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served.check_model(body.model, served.model_id)
        logprobs, echo = _logprobs_count(body), bool(body.echo)
        scoring = body.max_tokens == 0
        if scoring and not echo:
            raise APIError(400, "max_tokens must be at least 1; 0 only scores the prompt, which "
                                "needs echo: true.", param="max_tokens")
        params = _sampling(body, 1 if scoring else body.max_tokens, COMPLETION_MAX_TOKENS,
                           logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
        prompts = await asyncio.to_thread(_completion_prompts, body, served)  # a long text takes a while
        for prompt in prompts:
            _check_length(prompt.ids, served.context_length, "prompt")
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if scoring:
            return await _score(request, served, prompts, logprobs, bool(body.stream), include_usage)
        return await _respond(request, served, prompts, params, bool(body.stream), include_usage,
                              chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        served.check_model(body.model, served.model_id)
        if body.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported for chat by this server; "
                                "/v1/completions has them.", param="logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        # Without max_tokens a chat answer may fill the rest of the context (the engine stops there).
        params = _sampling(body, max_tokens, served.context_length,
                           served.template.end_markers)  # where the template's next section begins
        prompt = await asyncio.to_thread(_chat_prompt, body, served)
        _check_length(prompt, served.context_length, "messages")
        return await _respond(request, served, [_Prompt(prompt, "")], params, bool(body.stream),
                              bool((body.stream_options or {}).get("include_usage")), chat=True)

    # vLLM's tokenizer endpoints, so clients such as lm-evaluation-harness
    # (tokenizer_backend=remote) tokenize exactly as the served model does.
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return _tokenizer_info(served)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        tokens = await asyncio.to_thread(_tokenize, served.tokenizer, body.prompt, body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.context_length}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        vocab = served.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"Token ids must be in [0, {vocab}).", param="tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Any:
        served.check_model(body.model, served.classifier_id)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input must be a text or a non-empty list of texts.", param="input")
        if len(texts) > max_classify_texts:
            raise APIError(413, f"This request has {len(texts)} texts to classify; this server takes "
                                f"at most {max_classify_texts} per request (--max-classify-texts). "
                                f"Send them in smaller requests.", param="input", code="too_many_texts")
        empty = next((i for i, text in enumerate(texts) if not text.strip()), None)
        if empty is not None:
            raise APIError(400, f"input[{empty}] is empty; there is nothing to classify.", param="input")
        classifier = served.classifier
        lengths = await asyncio.to_thread(_classify_lengths, classifier, texts)
        if sum(lengths) > max_classify_tokens:
            raise APIError(413, f"This request has {sum(lengths)} tokens to classify; this server takes "
                                f"at most {max_classify_tokens} per request (--max-classify-tokens). "
                                f"Send fewer or shorter texts.", param="input", code="too_many_tokens")
        fixed = classifier.max_length if classifier.pooling == "last" else None
        steps = [partial(classifier.predict_proba, texts[a:b], batch_size=b - a)
                 for a, b in _classify_batches(lengths, fixed)]
        # On the engine's worker, like all model compute: one batch per turn, between the
        # generations' turns, so streams go on meanwhile.
        future = engine.run_in_turns(steps, served.timeout)
        try:
            finished, parts = await _job_result(request, future)
        except TimeoutError:
            raise _timeout_error(served.timeout, "send fewer texts per request") from None
        except ValueError as err:
            raise APIError(400, str(err), param="input") from None
        except Exception as err:
            raise APIError(500, f"Classification failed: {type(err).__name__}: {err}",
                           type="server_error") from None
        if not finished:  # the client left; nobody reads this answer
            return JSONResponse({}, status_code=499)
        labels = classifier.labels
        rows = [row for part in parts for row in part.tolist()]
        data = [{"index": i, "label": labels[max(range(len(row)), key=row.__getitem__)],
                 "probabilities": dict(zip(labels, row))} for i, row in enumerate(rows)]
        return {"id": "clf-" + uuid.uuid4().hex[:24], "object": "classification",
                "model": served.classifier_id, "labels": labels, "data": data}

    return app


# ------------------------------------------------------------------------------------
# the HTTP server: connection limits under the app

@dataclass(frozen=True)
class ConnectionLimits:
    """How the HTTP server holds connections, so that slow or idle clients cannot use it up.

    `header_timeout`: seconds a connection may take to send a request's headers,
    counted from when it opened or from the end of its previous response; then it is
    closed. `keep_alive_timeout`: seconds an idle connection is kept open between
    requests. `max_connections`: connections held at once (kept below the process's
    file-descriptor limit, see `connection_budget`); a new connection beyond it
    closes the oldest one that is still sending its headers or idle, and is refused
    with 503 only when every connection is busy with a request.
    """

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        _positive("header_timeout", self.header_timeout)
        _positive("keep_alive_timeout", self.keep_alive_timeout)
        if self.max_connections < 1:
            raise BadInputError(f"max_connections must be at least 1, got {self.max_connections}")


def connection_budget(max_connections: int) -> tuple[int, int]:
    """(connections, accepts per turn of the event loop) that fit this process's
    file-descriptor limit.

    The connections stay a quarter of the limit (at least 2 * FD_BASE) below it. The
    event loop accepts at most the second number of connections at a time (uvicorn's
    `backlog`), before the limit can close any, so a burst of them fits in what is left.
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no such limit here (Windows)
        return max_connections, 2048
    if soft == resource.RLIM_INFINITY:
        return max_connections, 2048
    room = soft - max(2 * FD_BASE, soft // 4)
    if room < 1:
        raise BadInputError(f"this process may open only {soft} files (ulimit -n), too few to serve "
                            f"connections: raise the limit (e.g. ulimit -n 4096)")
    connections = min(max_connections, room)
    if connections < max_connections:
        log.warning("serving at most %d connections, not %d: this process may open %d files "
                    "(ulimit -n)", connections, max_connections, soft)
    return connections, max(8, min(2048, (soft - connections - FD_BASE) // 3))


def _refusal(status: int, reason: str, error: APIError) -> bytes:
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n")
    return head.encode("latin-1") + body


def _guarded_protocol(limits: ConnectionLimits, max_connections: int) -> type:
    """uvicorn's HTTP protocol class with a header timeout and a connection limit.

    uvicorn times out idle keep-alive connections but not a connection that is
    sending its headers, however slowly, nor one that sends nothing at all; this
    subclass arms a timer whenever a connection is waiting for a request's headers
    and closes the connection when it fires first.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # h11, or httptools if installed

    refusal = _refusal(503, "Service Unavailable", APIError(
        503, f"The server is at its limit of {max_connections} connections (--max-connections), all "
             f"busy; try again shortly.", type="server_error", code="too_many_connections"))

    class GuardedHTTPProtocol(AutoHTTPProtocol):
        refused, warned_at = 0, -math.inf  # refusals since the last warning, and when that was

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.waiting_since: float | None = None  # waiting for a request's headers since
            self._header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._wait_for_headers()
            live = [c for c in self.connections
                    if isinstance(c, GuardedHTTPProtocol) and not c.transport.is_closing()]
            if len(live) <= max_connections:
                return
            idle = [c for c in live if c is not self and c.waiting_since is not None]
            if idle:  # a slow or idle connection makes room for this one
                oldest = min(idle, key=lambda c: c.waiting_since)
                log.debug("closing the connection from %s to make room", oldest.client)
                oldest.transport.close()
            else:
                self._warn_refused()
                self._stop_waiting()
                transport.write(refusal)
                transport.close()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are complete
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Waiting for the next request, unless a pipelined one has already begun.
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            self.waiting_since = time.monotonic()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def _stop_waiting(self) -> None:
            self.waiting_since = None
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        @classmethod
        def _warn_refused(cls) -> None:
            cls.refused += 1
            if time.monotonic() - cls.warned_at >= 10:  # at most one line every 10 s in a flood
                log.warning("refused %d connection(s): all %d are busy (--max-connections)",
                            cls.refused, max_connections)
                cls.refused, cls.warned_at = 0, time.monotonic()

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.waiting_since is not None and not self.transport.is_closing():
                log.debug("closing the connection from %s: no request headers in %g s",
                          self.client, limits.header_timeout)
                self.transport.close()

    return GuardedHTTPProtocol


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                  limits: ConnectionLimits | None = None, log_level: str = "warning"):
    """uvicorn's settings to serve `app` with `limits` (the defaults when None)."""
    import uvicorn

    limits = limits or ConnectionLimits()
    connections, backlog = connection_budget(limits.max_connections)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, backlog=backlog,
                          http=_guarded_protocol(limits, connections),
                          timeout_keep_alive=limits.keep_alive_timeout)


def _uvicorn_server(config):
    """A uvicorn server whose listening sockets queue LISTEN_QUEUE connections.

    asyncio uses uvicorn's `backlog` both as the kernel's queue of connections not
    yet accepted and as how many it accepts at a time. The second must stay small
    under a low file-descriptor limit; the first need not, and a short queue makes
    a busy server drop new clients' connection attempts (they retry a second
    later). So the queue is lengthened once the server listens.
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            for server in getattr(self, "servers", ()):
                for listener in server.sockets:
                    with socket.fromfd(listener.fileno(), listener.family, listener.type) as same:
                        same.listen(max(LISTEN_QUEUE, config.backlog))

    return Server(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          limits: ConnectionLimits | None = None, log_level: str = "warning") -> None:
    """Serve `app` in the foreground until interrupted (what `gptforge serve` runs)."""
    _uvicorn_server(server_config(app, host, port, limits, log_level)).run()


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      startup_timeout: float = 30.0,
                      limits: ConnectionLimits | None = None) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL, stops on exit.

    Port 0 picks a free port. `limits` as for `serve`. For notebooks, tests and
    benchmarks; `gptforge serve` runs uvicorn in the foreground instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = _uvicorn_server(server_config(app, host, port, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="gptforge-server")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start; see the log above")
        time.sleep(0.02)
    bound = sock.getsockname()
    name = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    try:
        yield f"http://{name}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
