"""The HTTP server: OpenAI-compatible endpoints and a chat page, on FastAPI.

`create_app` loads a language model (and optionally a classifier) and returns the
ASGI app. Generation runs in `Engine`'s worker thread; the handlers here only
tokenize, validate, hand requests to the engine and turn its events into JSON or
server-sent events, so the event loop never waits on the model.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with
`stream`), `GET /v1/models`, `POST /v1/classify`, `GET /health`, and the page at `/`.
Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptforge.checkpoint import RunMeta
from gptforge.errors import BadInputError
from gptforge.model import GPTModel
from gptforge.serve.engine import Engine, Event, SamplingParams

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
# Paths open without the API key: the page itself (it asks for the key) and the health check.
OPEN_PATHS = frozenset({"/", "/health"})
# Chat answers end where the model starts writing the template's next section.
CHAT_STOPS: dict[str, tuple[str, ...]] = {
    "alpaca": ("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_CHECK_S = 0.25  # how often a non-streamed request checks that its client is still there


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


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


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str]


# ------------------------------------------------------------------------------------
# the guard in front of every request: API key, then body size

class RequestGuard:
    """ASGI middleware: checks the API key (Bearer) and caps the request body size.

    The body is read up to `max_body_bytes` before the app sees it, so an
    oversized body is refused with 413 whether or not it declares its length.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

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
            return await too_large.response()(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await too_large.response()(scope, receive, send)
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
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())


# ------------------------------------------------------------------------------------
# the served models

class ServedModels:
    """The loaded models, their ids and the engine that runs them."""

    def __init__(self, model: GPTModel, model_id: str, meta: RunMeta | None, engine: Engine,
                 tokenizer, classifier=None, classifier_id: str | None = None,
                 timeout: float | None = None) -> None:
        from gptforge.finetune.instruct import template_of

        self.model, self.model_id, self.meta, self.engine = model, model_id, meta, engine
        self.tokenizer = tokenizer
        self.template = template_of(meta)
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
    if isinstance(source, GPTModel):
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
              extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    if body.n not in (None, 1):
        raise APIError(400, f"Only n=1 is supported, got n={body.n}.", param="n")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported by this server.", param="logprobs")
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
    return SamplingParams(max_tokens=max_tokens or default_max_tokens, temperature=temperature,
                          top_k=body.top_k, top_p=body.top_p, stop=tuple(stop) + extra_stop,
                          seed=body.seed)


def _check_length(prompt: list[int], context_length: int, param: str) -> None:
    if len(prompt) > context_length:
        raise APIError(400, f"This model's maximum context length is {context_length} tokens, "
                            f"but the {param} has {len(prompt)} tokens. Shorten the {param}.",
                       param=param, code="context_length_exceeded")


def _completion_prompt(body: CompletionRequest, served: ServedModels) -> list[int]:
    from gptforge.tokenizer import EOT_ID, text_to_ids

    if body.echo:
        raise APIError(400, "echo is not supported by this server.", param="echo")
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"Send one prompt per request (got {len(prompt)}).", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = text_to_ids(prompt, served.tokenizer)
    else:
        ids = list(prompt)
        vocab = served.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"Token ids must be in [0, {vocab}).", param="prompt")
    return ids or [EOT_ID]  # an empty prompt starts from <|endoftext|>, as GPT-2 was trained


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


async def _events(request: Request, served: ServedModels, prompt: list[int], params: SamplingParams,
                  watch_disconnect: bool) -> AsyncIterator[Event]:
    """Run a generation on the engine and yield its events until it finishes.

    Leaving early (the client went away, or this task was cancelled) cancels the
    generation, so the engine stops spending steps on it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    try:
        gen = served.engine.submit(prompt, params, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e),
                                   served.timeout)
    except ValueError as err:
        raise APIError(400, str(err)) from None
    try:
        next_check = loop.time() + DISCONNECT_CHECK_S
        while True:
            if not watch_disconnect:
                # A streaming response learns of a disconnect from Starlette, which cancels us.
                event = await queue.get()
            else:  # a plain response has to ask, every DISCONNECT_CHECK_S
                try:
                    event = await asyncio.wait_for(queue.get(), max(0.0, next_check - loop.time()))
                except asyncio.TimeoutError:
                    event = None
                if loop.time() >= next_check:
                    if await request.is_disconnected():
                        return
                    next_check = loop.time() + DISCONNECT_CHECK_S
                if event is None:
                    continue
            yield event
            if event.finish_reason is not None:
                return
    finally:
        gen.cancel()


def _usage(prompt: list[int], completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
            "total_tokens": len(prompt) + completion_tokens}


def _failure(event: Event, timeout: float | None) -> APIError | None:
    if event.finish_reason == "timeout":
        return APIError(504, f"The request took longer than this server's limit of {timeout:g} s; "
                             f"ask for fewer tokens (max_tokens) or try again.",
                        type="timeout_error", code="timeout")
    if event.finish_reason == "error":
        return APIError(500, f"Generation failed: {event.error}", type="server_error")
    return None


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _respond(request: Request, served: ServedModels, prompt: list[int], params: SamplingParams,
                   stream: bool, include_usage: bool, chat: bool) -> Any:
    """The whole answer as one JSON object, or a stream of chunks ending in `data: [DONE]`."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": served.model_id}

    if not stream:
        pieces, last = [], Event()
        async for event in _events(request, served, prompt, params, watch_disconnect=True):
            pieces.append(event.text)
            last = event
        if last.finish_reason is None:  # the client left; nobody reads this answer
            return JSONResponse({}, status_code=499)
        failure = _failure(last, served.timeout)
        if failure:
            raise failure
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**head, "choices": [choice], "usage": _usage(prompt, last.completion_tokens)}

    head["object"] = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice]})

    async def body() -> AsyncIterator[str]:
        if chat:
            yield chunk("", role=True)
        async for event in _events(request, served, prompt, params, watch_disconnect=False):
            if event.text:
                yield chunk(event.text)
            if event.finish_reason is None:
                continue
            failure = _failure(event, served.timeout)
            if failure:
                yield _sse(failure.body())
            else:
                yield chunk(None, event.finish_reason)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(prompt, event.completion_tokens)})
            yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------
# the app

def create_app(model_dir: str | os.PathLike | GPTModel, classifier_dir: str | os.PathLike | None = None,
               api_key: str | None = None, *, timeout: float | None = None,
               max_body_bytes: int = 1_000_000, device: str = "cpu", max_active: int = 16,
               model_id: str | None = None) -> FastAPI:
    """Build the server app for a language model and, optionally, a classifier.

    `model_dir` is a run directory, checkpoint or preset name (anything `gptforge
    generate --model` takes) or a loaded GPTModel; `classifier_dir` a classifier
    run directory. When `api_key` is set, every request but the page and
    `/health` must send `Authorization: Bearer <api_key>`. `timeout` (seconds,
    None = no limit) bounds each generation, queueing included; `max_body_bytes`
    bounds request bodies; `max_active` is how many generations advance together.
    The engine's worker starts and stops with the app (its lifespan).
    """
    from gptforge.tokenizer import EOT_ID, get_tokenizer

    if max_body_bytes < 1:
        raise BadInputError(f"max_body_bytes must be positive, got {max_body_bytes}")
    model, meta = _load_language_model(model_dir, device)
    classifier, classifier_id = None, None
    if classifier_dir is not None:
        from gptforge.finetune.classify import TextClassifier

        classifier = TextClassifier.load(classifier_dir, device)  # labels, pooling, max_length
    lm_id = model_id or ("gptforge" if isinstance(model_dir, GPTModel) else _source_id(model_dir))
    if classifier_dir is not None:
        classifier_id = _source_id(classifier_dir)
        classifier_id = classifier_id + "-classifier" if classifier_id == lm_id else classifier_id
    tokenizer = get_tokenizer()
    engine = Engine(model, tokenizer, eos_id=EOT_ID, max_active=max_active)
    served = ServedModels(model, lm_id, meta, engine, tokenizer, classifier, classifier_id, timeout)
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
    app.add_middleware(RequestGuard, api_key=api_key or None, max_body_bytes=max_body_bytes)

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
    async def health() -> dict[str, Any]:
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
        params = _sampling(body, body.max_tokens, COMPLETION_MAX_TOKENS)
        prompt = _completion_prompt(body, served)
        _check_length(prompt, served.context_length, "prompt")
        return await _respond(request, served, prompt, params, bool(body.stream),
                              bool((body.stream_options or {}).get("include_usage")), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        served.check_model(body.model, served.model_id)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        # Without max_tokens a chat answer may fill the rest of the context (the engine stops there).
        params = _sampling(body, max_tokens, served.context_length,
                           CHAT_STOPS.get(served.template.name, ()))
        prompt = _chat_prompt(body, served)
        _check_length(prompt, served.context_length, "messages")
        return await _respond(request, served, prompt, params, bool(body.stream),
                              bool((body.stream_options or {}).get("include_usage")), chat=True)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        served.check_model(body.model, served.classifier_id)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input must be a text or a non-empty list of texts.", param="input")
        classifier = served.classifier
        try:  # on the engine's worker, like all model compute
            probs = await asyncio.wrap_future(engine.call(lambda: classifier.predict_proba(texts)))
        except ValueError as err:  # e.g. an empty text
            raise APIError(400, str(err), param="input") from None
        labels = classifier.labels
        data = [{"index": i, "label": labels[max(range(len(row)), key=row.__getitem__)],
                 "probabilities": dict(zip(labels, row))} for i, row in enumerate(probs.tolist())]
        return {"id": "clf-" + uuid.uuid4().hex[:24], "object": "classification",
                "model": served.classifier_id, "labels": labels, "data": data}

    return app


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      startup_timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL, stops on exit.

    Port 0 picks a free port. For notebooks, tests and benchmarks; `gptforge serve`
    runs uvicorn in the foreground instead.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
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
