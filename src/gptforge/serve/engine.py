"""The serving engine: one model, one worker thread, many requests decoded in turns.

Requests wait in a queue; the worker admits up to `max_active` of them and then
advances each by one token per turn, so a long answer never holds back a short one
and every stream sees tokens at once. The worker keeps one KV cache with a row for
each active request. A turn runs the prompts of newly admitted requests together,
right-padded, on the rows after those in use, then one batch with one new token
for each of the others, each at its own position: the linear layers (most of the
work) run once for the whole batch. When a request finishes, the last row moves
into its place, so the rows in use stay together. Only the worker thread touches
the model and the cache: the web server's event loop hands requests in and gets
`Event`s back through a callback, and never waits on model compute.

Other model work (a classify request) comes as a job of small steps: each loop of
the worker runs one step of one job, the jobs taking turns, then one generation
turn, so a large job delays each stream's next token by one small step, never by
the whole job. Jobs have deadlines and can be cancelled between steps, like
generations.

A request may ask for the log-probabilities of the tokens it generates
(`SamplingParams.logprobs`) and of its prompt's own tokens (`prompt_logprobs`): the
prompt's come from the same prefill pass that starts its generation, its logits
kept at every position instead of the last only.

`TextStream` (from gptforge.generate, shared with the command line) turns a
request's token ids into text and cuts it at the first stop sequence.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch
from torch import nn

from gptforge.errors import BadInputError
from gptforge.generate import TextStream, check_sampling, pack_chunks, sample, stop_set, use_decode_layout
from gptforge.model import GPTModel, KVCache
from gptforge.serve.logprobs import MAX_LOGPROBS, TokenLogprob, score_batches, token_logprobs
from gptforge.speculative import Sequence1, SpeculationStats, check_pair, speculate

log = logging.getLogger(__name__)

# A prefill that keeps the logits of every prompt position (for prompt_logprobs) holds
# (prompts x padded length x vocabulary) floats: at most this many positions per call.
PROMPT_LOGPROBS_TOKENS = 2048


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded: temperature 0 is greedy, `stop` ends at any of those texts.

    `logprobs`: report each generated token's log-probability with that many of the
    most likely alternatives (None: none); `prompt_logprobs`: also those of the
    prompt's tokens after the first.
    """

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadInputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise BadInputError(f"logprobs must be from 0 to {MAX_LOGPROBS}, got {self.logprobs}")
        if self.prompt_logprobs and self.logprobs is None:
            raise BadInputError("prompt_logprobs needs logprobs (how many alternatives to list)")


@dataclass(frozen=True)
class Event:
    """What the worker reports for a request: new text, and at the end why it finished.

    `finish_reason` is None while generating, then "stop" (end-of-text token or a
    stop sequence), "length" (max_tokens or the context is full), "timeout" or
    "error" (with `error` saying what went wrong). With logprobs asked for, `logprobs`
    holds those of the tokens generated since the previous event (text can lag the
    tokens: it is held back at a possible stop sequence), and the first event holds
    `prompt_logprobs`, one per prompt token, None for the first.
    """

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(eq=False)
class Job:
    """Model work other than generation, run on the worker one step per turn.

    The caller keeps only `future`: it resolves to the list of the steps' results,
    or to the error of the first step that failed, or to a TimeoutError past the
    deadline; cancelling it stops the job before its next step.
    """

    steps: Sequence[Callable[[], Any]]
    deadline: float | None
    future: concurrent.futures.Future
    results: list = field(default_factory=list)


@dataclass(eq=False)
class Generation:
    """A request inside the engine; the caller keeps it only to `cancel()` it."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    deadline: float | None
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    cached: int = 0  # positions of this request in its row of the engine's KV cache
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent in an event
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # until sent
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (e.g. its client went away); safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Engine:
    """Generate for many requests at once with one model in one worker thread.

    `submit` queues a request and returns at once; the worker calls the request's
    `on_event` (from its own thread) with text as it is generated and a final event
    with the finish reason. `run_in_turns` runs other model work as a job of small
    steps interleaved with the generation turns; `call` runs one function on the
    worker, between turns. `stats` counts requests (generations and jobs) by outcome
    ("cancelled" counts those whose client cancelled them before they finished),
    the tokens generated and the job steps run.
    """

    def __init__(self, model: GPTModel, tokenizer, eos_id: int | Collection[int] | None = None,
                 max_active: int = 16, draft: nn.Module | None = None, draft_tokens: int = 4) -> None:
        if max_active < 1:
            raise BadInputError(f"max_active must be at least 1, got {max_active}")
        if draft is not None:
            check_pair(model, draft)
            if draft_tokens < 1:
                raise BadInputError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.model = model.eval()
        # Speculative decoding while one request decodes alone (a batch already reads the
        # weights once for many tokens): the draft's one-row cache follows that request.
        self.draft = draft.eval() if draft is not None else None
        self.draft_tokens = draft_tokens
        self._drafting: tuple[Generation, Sequence1] | None = None
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_set(eos_id))  # any of them ends a generation
        self.max_active = max_active
        self.context_length = model.cfg.context_length
        self.stats: dict[str, int] = collections.Counter(
            submitted=0, completed=0, cancelled=0, timed_out=0, failed=0, tokens=0, job_steps=0,
            draft_proposed=0, draft_accepted=0)
        self._queue: collections.deque[Generation] = collections.deque()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._jobs: collections.deque[Job] = collections.deque()  # they take turns: the first goes next
        self._active: list[Generation] = []
        # The worker's own: one cache row per request it has run the prompt of, in row order.
        self._cache: KVCache | None = None
        self._rows: list[Generation] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the caller's side -----------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="gptforge-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still running end with an "error" event."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None], timeout: float | None = None) -> Generation:
        """Queue a generation for the token ids `prompt`; `timeout` (s) counts from now.

        At most `context_length - len(prompt) + 1` tokens are generated: the last
        one is sampled from a full context.
        """
        if not prompt:
            raise BadInputError("the prompt is empty: give at least one token")
        if len(prompt) > self.context_length:
            raise BadInputError(f"the prompt has {len(prompt)} tokens but the model's context length "
                             f"is {self.context_length}: shorten the prompt")
        generator = None
        if params.seed is not None:
            device = self.model.emb.tok.weight.device
            generator = torch.Generator(device=device).manual_seed(params.seed & (2**64 - 1))
        gen = Generation(list(prompt), params, on_event,
                         time.monotonic() + timeout if timeout else None,
                         TextStream(self.tokenizer, params.stop), list(prompt), generator=generator)
        with self._wake:
            self._queue.append(gen)
            self.stats["submitted"] += 1
            self._wake.notify()
        return gen

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the worker thread between two turns; returns a future of its result.

        The whole of `fn` runs at once, holding back every generation meanwhile: give
        long work to `run_in_turns` instead."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def run_in_turns(self, steps: Sequence[Callable[[], Any]],
                     timeout: float | None = None) -> concurrent.futures.Future:
        """Run `steps` on the worker, one per turn between generation turns; a future of
        the list of their results.

        Keep each step small (one batch of a classify request, say): a stream's next
        token waits for at most one step. `timeout` (s) counts from now; past it the
        future gets a TimeoutError. Cancelling the future stops the job before its
        next step.
        """
        if not steps:
            raise BadInputError("a job needs at least one step")
        future: concurrent.futures.Future = concurrent.futures.Future()
        job = Job(list(steps), time.monotonic() + timeout if timeout else None, future)
        with self._wake:
            self._jobs.append(job)
            self.stats["submitted"] += 1
            self._wake.notify()
        return future

    def snapshot(self) -> dict[str, int]:
        """The counters plus the requests queued and active right now (jobs: under way)."""
        with self._wake:
            return {**self.stats, "queued": len(self._queue), "active": len(self._active),
                    "jobs": len(self._jobs)}

    # -- the worker's side -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._queue or self._active or self._calls or self._jobs):
                    self._wake.wait()
                if self._stopping:
                    for gen in [*self._active, *self._queue]:
                        self._emit(gen, Event(finish_reason="error", error="the server is shutting down"))
                    for job in self._jobs:
                        self._settle(job, error=RuntimeError("the server is shutting down"),
                                     outcome="failed")
                    self._active.clear()
                    self._queue.clear()
                    self._jobs.clear()
                    self._rows.clear()
                    self._cache = None  # its memory goes back; a restart makes a new one
                    return
                calls, self._calls = self._calls, []
                self._drop_waiting()
                while self._queue and len(self._active) < self.max_active:
                    self._active.append(self._queue.popleft())
                active = list(self._active)
                job = self._jobs[0] if self._jobs else None
                self._jobs.rotate(-1)  # the next loop serves the next job
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # the caller gets it from the future
                        future.set_exception(err)
            if job is not None and self._job_step(job):
                with self._wake:
                    self._jobs.remove(job)
            finished = self._turn(active)
            if finished:
                with self._wake:
                    self._active = [g for g in self._active if g not in finished]

    def _drop_waiting(self) -> None:
        """Remove queued requests that were cancelled or ran out of time (lock held)."""
        now = time.monotonic()
        for gen in list(self._queue):
            if gen.cancelled:
                self._queue.remove(gen)
                self.stats["cancelled"] += 1
            elif gen.deadline is not None and now > gen.deadline:
                self._queue.remove(gen)
                self.stats["timed_out"] += 1
                self._emit(gen, Event(finish_reason="timeout"))

    def _job_step(self, job: Job) -> bool:
        """Run the next step of `job`, unless it was cancelled or is out of time; True once
        the job is over (its future settled)."""
        if job.future.cancelled():
            self.stats["cancelled"] += 1
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            self._settle(job, error=TimeoutError("the job ran past its deadline"), outcome="timed_out")
            return True
        try:
            job.results.append(job.steps[len(job.results)]())
        except Exception as err:  # the caller gets it from the future; serving goes on
            self._settle(job, error=err, outcome="failed")
            return True
        self.stats["job_steps"] += 1
        if len(job.results) < len(job.steps):
            return False
        self._settle(job, result=job.results)
        return True

    def _settle(self, job: Job, result: Any = None, error: BaseException | None = None,
                outcome: str = "completed") -> None:
        """Give `job`'s future its result or error and count the outcome."""
        try:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile
            outcome = "cancelled"
        self.stats[outcome] += 1

    def _turn(self, active: list[Generation]) -> list[Generation]:
        """Generate one token for every active request; return those that finished.

        Requests new to the worker first run their prompts, together. The others each
        feed one token, all in one batch: the weights are read once for all of them.
        """
        finished, live = [], []
        now = time.monotonic()
        for gen in active:
            if gen.cancelled:
                self.stats["cancelled"] += 1
                finished.append(gen)
            elif gen.deadline is not None and now > gen.deadline:
                self.stats["timed_out"] += 1
                self._emit(gen, Event(gen.text.finish(), "timeout", gen.generated))
                finished.append(gen)
            else:
                live.append(gen)
        self._free_rows(finished)
        decoding = list(self._rows)  # rows 0 .. n-1; the prompts get the rows after them
        prompts = [gen for gen in live if gen not in decoding]
        if self._drafting is not None and self._drafting[0] not in decoding:
            self._drafting = None  # its request finished: the next solo one starts afresh
        decode = self._speculate if self._speculates(decoding) else self._decode
        for group, step in ((prompts, self._prefill), (decoding, decode)):
            if not group:
                continue
            try:
                tokens = step(group)
            except Exception as err:  # report it to these requests and keep serving the others
                log.exception("generation failed")
                for gen in group:
                    self.stats["failed"] += 1
                    self._emit(gen, Event(finish_reason="error", completion_tokens=gen.generated,
                                          error=f"{type(err).__name__}: {err}"))
                finished += group
                continue
            if step == self._speculate:  # one request, one token or more
                if any(self._report(group[0], token) for token in tokens):
                    finished.append(group[0])
                continue
            finished += [gen for gen, token in zip(group, tokens) if self._report(gen, token)]
        self._free_rows(finished)
        return finished

    def _speculates(self, decoding: list[Generation]) -> bool:
        """Whether this turn's decoding is one request that speculative decoding can serve:
        a draft is loaded, the request is alone, wants no logprobs and has room for drafts."""
        if self.draft is None or len(decoding) != 1:
            return False
        gen = decoding[0]
        return (gen.params.logprobs is None and gen.params.max_tokens - gen.generated >= 2
                and len(gen.tokens) + 2 <= self.context_length)

    @torch.inference_mode()
    def _speculate(self, group: list[Generation]) -> list[int]:
        """One draft-then-verify round for the one decoding request (on cache row 0): the
        tokens it keeps, appended to the request's tokens."""
        gen = group[0]
        if self._drafting is None or self._drafting[0] is not gen:
            draft_ctx = min(self.context_length, self.draft.cfg.context_length)
            use_decode_layout(self.draft)
            pack_chunks(self.model)  # the model's check of the draft's tokens
            self._drafting = (gen, Sequence1(self.draft, self.draft.new_cache(1, draft_ctx)))
        small = self._drafting[1]
        p = gen.params
        k = min(self.draft_tokens, p.max_tokens - gen.generated - 1,
                self.context_length - len(gen.tokens) - 1,
                self.draft.cfg.context_length - len(gen.tokens) - 1)
        if k < 1:
            return self._decode(group)
        big = Sequence1(self.model, self._cache.rows(0, 1), gen.cached)
        stats = SpeculationStats()
        kept = speculate(big, small, gen.tokens, k, p.temperature == 0.0, p.temperature, p.top_k,
                         p.top_p, gen.generator, stats)
        self.stats["draft_proposed"] += stats.proposed
        self.stats["draft_accepted"] += stats.accepted
        gen.cached = big.cached
        gen.tokens += kept
        return kept

    def _report(self, gen: Generation, token: int) -> bool:
        """Send `gen`'s new token on as text; True once `gen` is finished."""
        gen.generated += 1
        self.stats["tokens"] += 1
        if token in self.stop_ids:
            text, reason = gen.text.finish(), "stop"
        else:
            text, stopped = gen.text.push(token)
            room_left = len(gen.tokens) <= self.context_length
            if stopped:
                reason = "stop"
            elif gen.generated >= gen.params.max_tokens or not room_left:
                text, reason = text + gen.text.finish(), "length"
            else:
                reason = None
        if reason is None:
            if text:
                self._emit(gen, Event(text, None, gen.generated))
            return False  # a cancel that came meanwhile is counted on the next turn
        self.stats["completed"] += 1
        self._emit(gen, Event(text, reason, gen.generated))
        return True

    def _emit(self, gen: Generation, event: Event) -> None:
        if gen.logprobs or gen.prompt_logprobs is not None:  # they go with the next event
            event = dataclasses.replace(event, logprobs=tuple(gen.logprobs),
                                        prompt_logprobs=gen.prompt_logprobs)
            gen.logprobs, gen.prompt_logprobs = [], None
        try:
            gen.on_event(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed)
            log.debug("dropping a generation whose receiver failed", exc_info=True)
            gen.cancel()

    def _prefill(self, group: list[Generation]) -> list[int]:
        """Run the prompts of newly admitted requests on the cache rows after those in use
        and sample each request's first token: those that want their prompt's logprobs
        in calls of their own (at most PROMPT_LOGPROBS_TOKENS positions each), the others
        all in one call."""
        plain = [gen for gen in group if not gen.params.prompt_logprobs]
        scored = [gen for gen in group if gen.params.prompt_logprobs]
        parts = [plain] if plain else []
        if scored:
            parts += [scored[a:b] for a, b in score_batches([len(g.prompt) for g in scored],
                                                            PROMPT_LOGPROBS_TOKENS)]
        first: dict[Generation, int] = {}
        for part in parts:
            first.update(zip(part, self._prefill_part(part)))
        return [first[gen] for gen in group]

    @torch.inference_mode()
    def _prefill_part(self, group: list[Generation]) -> list[int]:
        """Run these prompts, right-padded, in one call on the next free cache rows; the
        logits at every position when they want their prompt's logprobs, else only each
        prompt's last."""
        model = self.model
        start, lengths = len(self._rows), [len(gen.prompt) for gen in group]
        self._reserve(start + len(group))
        use_decode_layout(model)  # cheap when already done; undone if the model trained since
        width = max(lengths)
        device = self._cache.k.device
        ids = torch.tensor([gen.prompt + [0] * (width - len(gen.prompt)) for gen in group],
                           device=device)  # (n, T): padding sits after each prompt, unseen by it
        last = torch.tensor(lengths, device=device) - 1  # each prompt's last token
        rows = self._cache.rows(start, start + len(group))
        if group[0].params.prompt_logprobs:  # then all of them do
            every = model(ids, rows, positions=0)  # (n, T, V)
            for row, gen in enumerate(group):
                n = len(gen.prompt)
                gen.prompt_logprobs = (None, *token_logprobs(every[row, :n - 1], ids[row, 1:n],
                                                             gen.params.logprobs))
            logits = every[torch.arange(len(group), device=device), last]  # (n, V)
        else:
            logits = model(ids, rows, positions=0, logits_at=last)[:, 0]  # (n, V)
        tokens = self._sample(group, logits)
        for gen in group:
            gen.cached = len(gen.prompt)
        self._rows += group
        return tokens

    def _reserve(self, rows: int) -> None:
        """Make room for `rows` requests in the cache, growing it by doubling (up to
        `max_active` rows), so a quiet server holds the cache of a few requests, not of all."""
        have = 0 if self._cache is None else self._cache.batch_size
        if rows <= have:
            return
        cache = self.model.new_cache(min(self.max_active, max(rows, 2 * have)), self.context_length)
        if self._cache is not None:  # the rows in use keep their keys and values
            cache.k[:, :have], cache.v[:, :have] = self._cache.k, self._cache.v
        self._cache = cache

    @torch.inference_mode()
    def _decode(self, group: list[Generation]) -> list[int]:
        """Feed every decoding request its newest token at its own position, all in one
        call on cache rows 0 .. n-1 (theirs, in order); sample each one's next token."""
        device = self._cache.k.device
        newest = torch.tensor([[gen.tokens[-1]] for gen in group], device=device)  # (n, 1)
        cached = [gen.cached for gen in group]
        # One shared position (e.g. a single request) takes the model's unmasked fast path.
        positions = cached[0] if len(set(cached)) == 1 else torch.tensor(cached, device=device)
        logits = self.model(newest, self._cache.rows(0, len(group)), positions=positions)[:, -1]  # (n, V)
        tokens = self._sample(group, logits)
        for gen in group:
            gen.cached += 1
        return tokens

    def _sample(self, group: list[Generation], logits: torch.Tensor) -> list[int]:
        """Sample each request's next token from its row of `logits` (n, V), with its own
        settings and generator, and append it to the request's tokens."""
        tokens = []
        for row, gen in enumerate(group):
            p = gen.params
            token = sample(logits[row:row + 1], p.temperature, p.top_k, p.top_p, gen.generator)  # (1,)
            if p.logprobs is not None:
                gen.logprobs += token_logprobs(logits[row:row + 1], token, p.logprobs)
            token = int(token[0])
            gen.tokens.append(token)
            tokens.append(token)
        return tokens

    @torch.inference_mode()
    def _free_rows(self, gens: list[Generation]) -> None:
        """Give back the cache rows of these requests: the last row in use moves into each
        hole, so that the rows in use stay 0 .. n-1, one view for the decoding call."""
        for gen in gens:
            if gen not in self._rows:  # never prefilled, or its prompt step failed
                continue
            hole, last = self._rows.index(gen), len(self._rows) - 1
            if hole != last:
                self._cache.copy_row(last, hole, self._rows[last].cached)
                self._rows[hole] = self._rows[last]
            self._rows.pop()
