"""Run tasks on a model: few-shot prompts, scoring, and each metric with its standard error.

Metrics are lm-evaluation-harness's:

- `acc`: the share of items whose right choice has the highest log-likelihood (for LAMBADA:
  whose last word greedy decoding reproduces exactly);
- `acc_norm`: the same with each log-likelihood divided by its choice's length in characters
  (lm-eval's `acc_norm`; the same as bytes for ASCII text);
- `perplexity` (LAMBADA): exp(-mean log-likelihood of the last word).

The standard error of a mean is the sample standard deviation (n - 1) over sqrt(n), as
lm-eval's `mean_stderr`; MMLU's is pooled over its subjects as lm-eval pools a group's
(`pooled_sample_stderr`); perplexity's comes from the delta method, exp(-m) times the standard
error of the mean log-likelihood m, where lm-eval bootstraps (they agree to within the
bootstrap's own noise on sets this size).

Shots are drawn as lm-eval draws them (see `fewshot_prompts`): one `random.Random(seed)` per
task (seed 1234, lm-eval's default), sampled in item order; MMLU takes the subject's first dev
questions.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from gptforge.errors import BadInputError
from gptforge.evaluation.scoring import Score, Throughput, score_requests
from gptforge.evaluation.tasks import FEWSHOT_DELIMITER, Item, TaskData, load_task

DEFAULT_SEED = 1234


@dataclass(frozen=True)
class MetricResult:
    """One metric of one task: its value, standard error, number of items and shots."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int
    shots: int
    data_sha256: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"task": self.task, "metric": self.metric, "value": self.value, "stderr": self.stderr,
                "n": self.n, "shots": self.shots, "data_sha256": dict(self.data_sha256)}


def mean_stderr(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1) over sqrt(n): lm-eval's `mean_stderr`; None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float | None:
    """A group's standard error from its parts' (lm-eval's `pooled_sample_stderr`)."""
    if sum(sizes) - len(sizes) <= 0:
        return None
    variance = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(variance / sum(sizes))


def fewshot_prompts(task: TaskData, shots: int, seed: int = DEFAULT_SEED) -> list[Item]:
    """The task's items with their description and `shots` solved examples put before each context.

    Examples are joined by a blank line. They are drawn as lm-eval 0.4 draws them: one
    `random.Random(seed)` per task, drawing in item order; `random.sample(pool, shots)`, or,
    for a task that leaves the item out, `shots + 1` examples with the item dropped and the
    first `shots` kept (drawn again from the pool without the item if that leaves too few);
    MMLU's `first_n` takes the first examples of the subject's pool.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise BadInputError(f"--shots must be a whole number of at least 0, not {shots!r}")
    rnd = random.Random(seed)
    out = []
    for item in task.items:
        pool = task.pools.get(item.group, [])
        others = [x for x in pool if x != item] if task.leave_out_item or task.sampler == "first_n" else pool
        if len(others) < shots:
            raise BadInputError(f"{task.name}: {shots} shots asked for, but only {len(others)} examples can be "
                                "drawn for an item; ask for fewer --shots")
        if shots == 0:
            chosen = []
        elif task.sampler == "first_n":
            chosen = others[:shots]
        elif task.leave_out_item:
            chosen = [x for x in rnd.sample(pool, min(shots + 1, len(pool))) if x != item][:shots]
            if len(chosen) < shots:  # the item was in the pool more than once
                chosen = rnd.sample(others, shots)
        else:
            chosen = rnd.sample(pool, shots)
        prefix = item.description + "".join(x.example + FEWSHOT_DELIMITER for x in chosen)
        out.append(item.with_prefix(prefix))
    return out


def _limited(task: TaskData, limit: int | None) -> TaskData:
    """The first `limit` items (of each MMLU subject, as lm-eval limits each subtask)."""
    if limit is None:
        return task
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadInputError(f"--limit must be a whole number of at least 1, not {limit!r}")
    counts: dict[str, int] = {}
    kept = []
    for item in task.items:
        counts[item.group] = counts.get(item.group, 0) + 1
        if counts[item.group] <= limit:
            kept.append(item)
    return replace(task, items=kept)


def task_metrics(task: TaskData, items: Sequence[Item], scores: Sequence[Sequence[Score]],
                 shots: int) -> list[MetricResult]:
    """Each of the task's metrics from the scores of every item's choices."""
    per_item: dict[str, list[float]] = {m: [] for m in task.metrics}
    logprobs: list[float] = []
    for item, choice_scores in zip(items, scores):
        lls = [s.logprob for s in choice_scores]
        if task.kind == "last_word":
            logprobs.append(lls[0])
            per_item["acc"].append(float(choice_scores[0].greedy))
            continue
        best = max(range(len(lls)), key=lambda i: lls[i])
        per_item["acc"].append(float(best == item.gold))
        if "acc_norm" in per_item:
            normed = [ll / length for ll, length in zip(lls, item.choice_lengths)]
            per_item["acc_norm"].append(float(max(range(len(normed)), key=lambda i: normed[i]) == item.gold))
    results = []
    n = len(items)
    for metric in task.metrics:
        if metric == "perplexity":
            mean_ll = sum(logprobs) / n
            se = mean_stderr(logprobs)
            value = math.exp(-mean_ll)
            results.append(MetricResult(task.name, metric, value, None if se is None else value * se, n, shots,
                                        task.files))
            continue
        values = per_item[metric]
        stderr = mean_stderr(values)
        if task.name == "mmlu":
            stderr = _mmlu_stderr(items, values)
        results.append(MetricResult(task.name, metric, sum(values) / n, stderr, n, shots, task.files))
    return results


def _mmlu_stderr(items: Sequence[Item], values: Sequence[float]) -> float | None:
    by_subject: dict[str, list[float]] = {}
    for item, value in zip(items, values):
        by_subject.setdefault(item.group, []).append(value)
    parts = [(mean_stderr(v), len(v)) for v in by_subject.values()]
    if any(se is None for se, _ in parts):
        return mean_stderr(values)
    return pooled_stderr([se for se, _ in parts], [n for _, n in parts])


@dataclass
class EvalRun:
    """What `evaluate_tasks` returns: every metric, and the speed of the scoring."""

    results: list[MetricResult]
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], shots: int = 0, limit: int | None = None, *,
                   batch_size: int = 16, seed: int = DEFAULT_SEED, cache_dir=None,
                   on_progress: Callable[[str, int, int, float], None] | None = None,
                   on_task: Callable[[str, int], None] | None = None) -> EvalRun:
    """Evaluate a language model on tasks (benchmark names or .jsonl paths; see `gptforge.evaluation.tasks`).

    `shots` solved examples go before each question, `limit` keeps the first items of each
    task, `batch_size` continuations share a forward pass (a question's choices are never
    split between passes, so one with more choices than that gets a pass of its own). `on_task(name, n_requests)` is
    called before a task is scored and `on_progress(name, n_requests, n_tokens, tokens_per_s)`
    after each batch (for a progress bar). Files are downloaded as needed.
    """
    from gptforge.data import check_language_model

    check_language_model(model)
    if not tasks:
        raise BadInputError("no tasks given: name at least one")
    loaded = [_limited(load_task(name, shots, cache_dir=cache_dir), limit) for name in tasks]
    model.eval()
    meter = Throughput()
    results: list[MetricResult] = []
    for task in loaded:
        items = fewshot_prompts(task, shots, seed)
        requests = [r for item in items for r in item.requests()]
        if on_task is not None:
            on_task(task.name, len(requests))

        def progress(n_requests: int, n_tokens: int, name: str = task.name) -> None:
            rate = meter.add(n_tokens)
            if on_progress is not None:
                on_progress(name, n_requests, n_tokens, rate)

        flat = score_requests(model, tokenizer, requests, batch_size=batch_size, on_progress=progress)
        scores, start = [], 0
        for item in items:
            scores.append(flat[start:start + item.n_choices])
            start += item.n_choices
        results += task_metrics(task, items, scores, shots)
    return EvalRun(results, meter.tokens, time.perf_counter() - meter.start)
