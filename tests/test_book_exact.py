"""`pretrain(..., book_exact=True)` against the book's own chapter-5 code.

The reference is the `llms_from_scratch` package (`pip install --no-deps llms-from-scratch`),
set up with the chapter's settings by `book_setup` in benchmarks/book_exact.py (the benchmark
that runs the whole chapter): GPT-2 small at context 256 with dropout 0.1 and no QKV bias,
The Verdict split 90/10 into windows of 256 tokens, batch 2, AdamW (lr 4e-4, weight decay 0.1),
`torch.manual_seed(123)` before the loaders and again before the model. Both sides train 10
steps; every training step's loss and the two evaluations in them (after the 1st and the 6th
step) must agree to the 3 decimals the book prints.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("llms_from_scratch")

from gptforge.config import book_config  # noqa: E402
from gptforge.errors import BadInputError  # noqa: E402
from gptforge.model import GPTModel  # noqa: E402
from gptforge.pretrain import PretrainData, pretrain  # noqa: E402
from gptforge.training import TrainConfig, Trainer  # noqa: E402

STEPS = 10


def _book_benchmark():
    """benchmarks/book_exact.py as a module (benchmarks/ is not a package), for the book's setup."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "book_exact.py"
    spec = importlib.util.spec_from_file_location("book_exact_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BOOK = _book_benchmark()


class _Enough(Exception):
    """Raised by the book side's optimizer after STEPS updates."""


@pytest.fixture
def two_threads():
    kept = torch.get_num_threads()
    torch.set_num_threads(min(2, kept))
    yield
    torch.set_num_threads(kept)


@pytest.fixture
def book_tokenizer():
    """tiktoken's "gpt2" encoding for the book's code, which would download it otherwise:
    gptforge's tokenizer (the same BPE, the same ids), registered under that name."""
    import tiktoken.registry

    had = "gpt2" in tiktoken.registry.ENCODINGS
    yield BOOK.offline_gpt2_encoding()
    if not had:
        del tiktoken.registry.ENCODINGS["gpt2"]


def book_run(text: str, tokenizer, shape: dict) -> tuple[list[float], list[tuple[float, float]]]:
    """The book's train_model_simple on `text` for STEPS steps: each step's training loss
    and each evaluation's (train, val) losses."""
    import llms_from_scratch.ch05 as ch05

    model, train_loader, val_loader, optimizer = BOOK.book_setup(text, **shape)
    steps: list[float] = []
    evals: list[tuple[float, float]] = []
    book_loss = ch05.calc_loss_batch

    def watched_loss(*args):  # the book's own loss; training ones recorded
        loss = book_loss(*args)
        if model.training:
            steps.append(loss.item())
        return loss

    def watched_evaluate(*args):
        evals.append(book_evaluate(*args))
        return evals[-1]

    book_evaluate = ch05.evaluate_model
    book_step = optimizer.step

    def step_then_stop(*args, **kwargs):
        book_step(*args, **kwargs)
        if len(steps) == STEPS:
            raise _Enough

    with pytest.MonkeyPatch.context() as mp, pytest.raises(_Enough):
        mp.setattr(ch05, "calc_loss_batch", watched_loss)
        mp.setattr(ch05, "evaluate_model", watched_evaluate)
        mp.setattr(optimizer, "step", step_then_stop)
        ch05.train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=2,
                                eval_freq=5, eval_iter=5, start_context="Every effort moves you",
                                tokenizer=tokenizer)
    return steps, evals


def gptforge_run(tmp_path, shape: dict, **cfg) -> tuple[list[float], list[tuple[float, float]]]:
    """pretrain(..., book_exact=True) for STEPS steps: the same two lists."""
    steps: list[float] = []
    one_step = Trainer._train_step

    def watched_step(self, micro_batches):
        steps.append(one_step(self, micro_batches))
        return steps[-1]

    torch.manual_seed(0)  # whatever the caller's seed: book_exact draws the weights again
    model = GPTModel(book_config("gpt2-small", 256, **shape), init="torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_train_step", watched_step)
        result = pretrain(model, PretrainData(), TrainConfig(max_steps=STEPS, device="cpu", **cfg),
                          tmp_path / "run", base_model="init:gpt2-small", book_exact=True)
    return steps, [(r["train_loss"], r["val_loss"]) for r in result.history]


def rounded(values) -> list[str]:
    return [f"{v:.3f}" for v in values]


@pytest.mark.needs_data("the-verdict", "gpt2-encoder", "gpt2-vocab")
def test_first_steps_match_the_books_code(fetch, tmp_path, two_threads, book_tokenizer):
    text = fetch("the-verdict").read_text(encoding="utf-8")
    book_steps, book_evals = book_run(text, book_tokenizer, {})
    ours_steps, ours_evals = gptforge_run(tmp_path, {})
    assert len(book_steps) == len(ours_steps) == STEPS
    assert rounded(ours_steps) == rounded(book_steps)
    assert len(book_evals) == len(ours_evals) == 2  # after the 1st and the 6th step
    assert [rounded(e) for e in ours_evals] == [rounded(e) for e in book_evals]
    # Not just rounding luck: the two runs are the same computation.
    assert max(abs(a - b) for a, b in zip(ours_steps, book_steps)) < 2e-4


def test_book_exact_refuses_what_the_book_cannot_do(tmp_path):
    model = GPTModel(book_config("gpt2-small", 32, n_layers=1, emb_dim=32, n_heads=2), init="torch")
    with pytest.raises(BadInputError, match="trained model"):
        pretrain(model, PretrainData(), TrainConfig(max_steps=1), tmp_path / "a",
                 base_model=str(tmp_path / "some-run"), book_exact=True)
    tied = GPTModel(book_config("gpt2-small", 32, n_layers=1, emb_dim=32, n_heads=2, tie_weights=True))
    with pytest.raises(BadInputError, match="untied"):
        pretrain(tied, PretrainData(), TrainConfig(max_steps=1), tmp_path / "b", book_exact=True)
    with pytest.raises(BadInputError, match="float32"):
        pretrain(model, PretrainData(), TrainConfig(max_steps=1, precision="bf16"), tmp_path / "c",
                 book_exact=True)


# A small model (1 layer, 32 wide, context 32) on The Verdict: 9 steps an epoch with batch 16,
# 12 steps, evaluations every 2, checkpoints every 3, dropout on.
SMALL_RUN = ["pretrain", "--book-exact", "--n-layers", "1", "--emb-dim", "32", "--n-heads", "2",
             "--context-length", "32", "--batch-size", "16", "--max-steps", "12", "--eval-every", "2",
             "--eval-batches", "2", "--save-every", "3", "--no-progress", "--device", "cpu"]


def _gptforge(args: list[str], fault: str | None = None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    env.pop("GPTFORGE_FAULT", None)
    if fault:
        env["GPTFORGE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "gptforge.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _history(run) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("book") / "reference"
    done = _gptforge([*SMALL_RUN, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


@pytest.mark.needs_data("the-verdict", "gpt2-encoder", "gpt2-vocab")
def test_cli_prints_the_books_lines(small_reference):
    out, stdout = small_reference
    lines = [line for line in stdout.splitlines() if line.startswith("Ep ")]
    # The book counts steps from 0, evaluates every --eval-every, and adds no final evaluation.
    assert [line.split(":")[0] for line in lines] == [f"Ep 1 (Step {s:06d})" for s in (0, 2, 4, 6, 8)] + \
        [f"Ep 2 (Step {s:06d})" for s in (10,)]
    assert all(line.count("loss") == 2 and "tok/s" not in line for line in lines)
    assert [r["step"] for r in _history(out)] == [1, 3, 5, 7, 9, 11]
    assert sum(line.startswith("Every effort moves you") for line in stdout.splitlines()) == 1  # one epoch


@pytest.mark.needs_data("the-verdict", "gpt2-encoder", "gpt2-vocab")
@pytest.mark.parametrize("point", ["step:4:KILL", "step:5:INT", "epoch_end:1:INT", "eval:4:TERM"])
def test_a_stopped_book_exact_run_resumes_exactly(tmp_path, small_reference, point):
    from gptforge import load

    reference, _ = small_reference
    run = tmp_path / "run"
    stopped = _gptforge([*SMALL_RUN, "--out", str(run)], fault=point)
    assert stopped.returncode in (130, -9), stopped.stderr[-2000:]
    resumed = _gptforge(["pretrain", "--resume", str(run), "--no-progress"])  # the run knows its mode
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "--book-exact run" in resumed.stdout
    assert _history(run) == _history(reference)
    ours, theirs = load(run).state_dict(), load(reference).state_dict()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.needs_data("the-verdict", "gpt2-encoder", "gpt2-vocab")
def test_a_run_keeps_its_mode_on_resume(tmp_path, small_reference):
    from gptforge import load

    reference, _ = small_reference
    plain = tmp_path / "plain"
    done = _gptforge([*[a for a in SMALL_RUN if a != "--book-exact"], "--max-steps", "3", "--out", str(plain)])
    assert done.returncode == 0, done.stderr[-2000:]
    refused = _gptforge(["pretrain", "--resume", str(plain), "--book-exact", "--max-steps", "4"])
    assert refused.returncode == 2 and "without --book-exact" in refused.stderr
    model = load(reference, for_training=True)
    with pytest.raises(BadInputError, match="started with book_exact"):
        pretrain(model, PretrainData(), TrainConfig(max_steps=13), reference, resume=True)
