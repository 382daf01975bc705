"""lm-evaluation-harness through `gptforge serve`: the same tasks, run by lm-eval on the
model converted to Hugging Face's format (its `hf` backend) and on `gptforge serve`
(its `local-completions` backend), give the same answers.

A tiny random GPT-2 model, a 10-question multiple-choice task, a perplexity task over the
questions and a short generation task, written here as lm-eval YAML + jsonl; everything offline.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'gptforge[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'gptforge[serve]'")
pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'lm-eval[api,hf]'")
pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate: pip install 'lm-eval[hf]'")
pytest.importorskip("tenacity", reason="lm-eval's API backends need tenacity: pip install 'lm-eval[api]'")

from conftest import save_lm_and_classifier  # noqa: E402
from gptforge.cli import main  # noqa: E402
from gptforge.config import GPTConfig  # noqa: E402
from gptforge.serve.app import background_server, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "loud"], 0),
    ("Two plus two equals", ["three", "four", "five", "seven"], 1),
    ("The opposite of hot is", ["cold", "warm"], 0),
    ("Ice is made of frozen", ["sand", "water", "iron"], 1),
    ("A cat says", ["woof", "moo", "meow"], 2),
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Bees make", ["milk", "honey"], 1),
    ("The sun rises in the", ["west", "north", "east"], 2),
    ("A week has seven", ["days", "hours", "years"], 0),
    ("Fish live in", ["trees", "water", "deserts", "clouds"], 1),
]


def write_tasks(root: Path) -> Path:
    """A multiple-choice task and a generation task over the same jsonl, as lm-eval YAML."""
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps({"query": q, "choices": c, "gold": g}) + "\n"
                            for q, c, g in QUESTIONS), encoding="utf-8")
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{query}}}}"
"""
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
""", encoding="utf-8")
    (root / "tiny_gen.yaml").write_text(f"""task: tiny_gen
{common}output_type: generate_until
doc_to_target: "{{{{choices[gold]}}}}"
generation_kwargs:
  until: [".", "\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""", encoding="utf-8")
    (root / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
{common}output_type: loglikelihood_rolling
doc_to_target: "{{{{query}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""", encoding="utf-8")
    return data


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("lm-eval")
    lm_dir = save_lm_and_classifier(root, CFG)["lm"]
    hf_dir = root / "tiny-hf"
    assert main(["convert", str(lm_dir), str(hf_dir), "--to", "hf"]) == 0
    if not (hf_dir / "tokenizer.json").exists():
        # `convert --to hf` does not write GPT-2's tokenizer files yet: take GPT-2's
        # Hugging Face tokenizer from the test fixtures.
        for path in tokenizer_dir("gpt2").iterdir():
            shutil.copy(path, hf_dir / path.name)
    tasks = root / "tasks"
    tasks.mkdir()
    data = write_tasks(tasks)
    return {"lm": lm_dir, "hf": hf_dir, "tasks": tasks, "data": data}


@pytest.fixture(scope="module")
def url(setup):
    with background_server(create_app(setup["lm"], model_id="tiny-lm")) as base:
        yield base


def evaluate(model: str, model_args: dict, tasks_dir: Path, monkeypatch, batch_size: int = 4) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
                           task_manager=TaskManager(include_path=str(tasks_dir)), batch_size=batch_size,
                           log_samples=True, device="cpu", random_seed=0, numpy_random_seed=0,
                           torch_random_seed=0, fewshot_random_seed=0)


def loglikelihoods(results: dict) -> list[list[float]]:
    """Each question's log-likelihood of each choice, in the questions' order."""
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def generations(results: dict) -> list[str]:
    samples = sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


@pytest.fixture(scope="module")
def hf_results(setup):
    with pytest.MonkeyPatch.context() as mp:
        return evaluate("hf", {"pretrained": str(setup["hf"]), "dtype": "float32"}, setup["tasks"], mp)


@pytest.mark.parametrize("backend, batch_size", [("huggingface", 4), ("remote", 1)])
def test_local_completions_through_the_server_equals_the_hf_backend(setup, url, hf_results, monkeypatch,
                                                                     backend, batch_size):
    args = {"model": "tiny-lm", "base_url": f"{url}/v1/completions", "tokenizer_backend": backend,
            "max_length": CFG.context_length, "max_retries": 1}
    if backend == "huggingface":
        args["tokenizer"] = str(setup["hf"])
    served = evaluate("local-completions", args, setup["tasks"], monkeypatch, batch_size)
    ours, theirs = loglikelihoods(served), loglikelihoods(hf_results)
    assert len(ours) == len(QUESTIONS) and [len(x) for x in ours] == [len(q[1]) for q in QUESTIONS]
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4)
        assert all(math.isfinite(x) and x < 0 for x in a)
    # The same accuracy (and standard error): the metrics are made from the same answers.
    assert served["results"]["tiny_mc"] == hf_results["results"]["tiny_mc"]
    # Greedy generation cut at the task's stop sequences: the same texts, the same score.
    assert generations(served) == generations(hf_results)
    assert any(generations(served))
    assert served["results"]["tiny_gen"] == hf_results["results"]["tiny_gen"]
    # Rolling log-likelihoods of whole texts (from the end-of-text token): the same perplexities.
    ppl, hf_ppl = served["results"]["tiny_ppl"], hf_results["results"]["tiny_ppl"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ppl[metric] == pytest.approx(hf_ppl[metric], rel=1e-5)
    assert hf_ppl["word_perplexity,none"] > 1000  # a random model: each word is a surprise


def test_the_server_scores_what_lm_eval_expects(url, setup):
    """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens=1) read back its way: the
    continuation's log-likelihood is token_logprobs[ctxlen:-1]."""
    import httpx
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from gptforge.tokenizer import text_to_ids

    context, continuation = text_to_ids("The sky on a clear day is"), text_to_ids(" blue")
    payload = {"model": "tiny-lm", "prompt": [context + continuation], "temperature": 0,
               "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    out = httpx.post(f"{url}/v1/completions", json=payload, timeout=60).json()
    (ll, _), = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[len(context)])
    scored = httpx.post(f"{url}/v1/completions", json={**payload, "max_tokens": 0}, timeout=60).json()
    assert ll == pytest.approx(sum(scored["choices"][0]["logprobs"]["token_logprobs"][len(context):]),
                               abs=1e-5)


def test_gptforge_eval_gives_the_same_accuracy(setup, hf_results, tmp_path):
    """`gptforge eval --tasks file.jsonl` on the gptforge model: lm-eval's accuracy (the
    served model's equals it, above)."""
    pytest.importorskip("gptforge.evaluation")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(setup["lm"]), "--tasks", str(setup["data"]), "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    acc = next(r for r in results if r["metric"] == "acc")
    assert acc["n"] == len(QUESTIONS)
    assert acc["value"] == pytest.approx(hf_results["results"]["tiny_mc"]["acc,none"], abs=1e-9)
