"""Benchmarks (gptforge.evaluation, `gptforge eval` / `gptforge report`) and bits per byte.

The data sets are stand-ins in each upstream format written by tests/make_eval_fixtures.py
and served through gptforge's own download function as a data mirror. Expected scores are
computed here with a plain forward pass over context + continuation, not with the code under
test; prompts are checked against lm-evaluation-harness's own templates and helpers.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from gptforge import GPTConfig, GPTModel, get_tokenizer
from gptforge.cli import main
from gptforge.download import MIRROR_ENV
from gptforge.errors import BadInputError
from gptforge.evaluation import evaluate_tasks, fewshot_prompts, load_task, score_requests
from gptforge.evaluation.harness import task_metrics
from gptforge.evaluation.scoring import Score
from gptforge.evaluation.tasks import multiple_choice_item

sys.path.insert(0, str(Path(__file__).parent))
import make_eval_fixtures as fixtures  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ALL_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada", "mmlu"]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    return fixtures.write_fixtures(tmp_path_factory.mktemp("eval-mirror"))


@pytest.fixture(autouse=True)
def _eval_data(mirror, tmp_path, monkeypatch):
    """Every test reads the stand-in files through the download function, into its own cache."""
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))


def tiny_gpt(context_length: int = 96, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50257, context_length=context_length, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0)
    return GPTModel(cfg).eval()


def plain_loglikelihood(model, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether it is the greedy path, from one plain forward."""
    ids = (ctx_ids + cont_ids)[-(model.cfg.context_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    n = len(cont_ids)
    rows = logp[-n:]
    targets = torch.tensor(ids[-n:])
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def gpt2_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    enc = get_tokenizer()
    ctx = enc.encode_ordinary(context)
    return ctx, enc.encode_ordinary(context + continuation)[len(ctx):]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MC_ROWS = [
    {"query": "The capital of France is", "choices": ["Paris", "a small green frog", "Berlin"], "gold": 0},
    {"query": "Two plus two equals", "choices": ["four", "five"], "gold": 0},
    {"query": "Water is", "choices": ["wet", "dry", "made of cheese and café crème"], "gold": 2},
    {"query": "Question: which is an animal?\nAnswer:", "choices": ["cat", "stone"], "gold": 1},
]


def test_scores_match_a_plain_forward_pass(tmp_path):
    """Each choice's log-likelihood, through the shared-context KV cache and any batch size, is
    what a plain forward over context + continuation gives; acc and acc_norm follow from it."""
    model = tiny_gpt()
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    expected = []
    for row in MC_ROWS:
        expected.append([plain_loglikelihood(model, *gpt2_pair(row["query"], " " + c))[0] for c in row["choices"]])
    for batch_size in (1, 2, 16):
        run = evaluate_tasks(model, get_tokenizer(), [str(path)], batch_size=batch_size)
        got = {r.metric: r for r in run.results}
        acc = [float(max(range(len(e)), key=e.__getitem__) == row["gold"]) for e, row in zip(expected, MC_ROWS)]
        normed = [[ll / len(c) for ll, c in zip(e, row["choices"])] for e, row in zip(expected, MC_ROWS)]
        acc_norm = [float(max(range(len(n)), key=n.__getitem__) == row["gold"]) for n, row in zip(normed, MC_ROWS)]
        assert got["acc"].value == pytest.approx(sum(acc) / 4)
        assert got["acc_norm"].value == pytest.approx(sum(acc_norm) / 4)
        mean = sum(acc) / 4
        assert got["acc"].stderr == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / 3 / 4))
        assert got["acc"].n == 4 and got["acc"].shots == 0
        requests = [(row["query"], " " + c) for row in MC_ROWS for c in row["choices"]]
        scores = score_requests(model, get_tokenizer(), requests, batch_size=batch_size)
        assert [s.logprob for s in scores] == pytest.approx([x for e in expected for x in e], abs=1e-4)


def test_a_context_longer_than_the_model_is_cut_from_the_left():
    model = tiny_gpt(context_length=16)
    context = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    requests = [(context, " sixteen"), (context, " and then some more words"), ("", " hello")]
    scores = score_requests(model, get_tokenizer(), requests, batch_size=4)
    for (ctx, cont), score in zip(requests[:2], scores):
        assert score.logprob == pytest.approx(plain_loglikelihood(model, *gpt2_pair(ctx, cont))[0], abs=1e-4)
    # An empty context is the end-of-text token alone, as lm-eval does it.
    eot = get_tokenizer().eot_token
    assert scores[2].logprob == pytest.approx(
        plain_loglikelihood(model, [eot], get_tokenizer().encode_ordinary(" hello"))[0], abs=1e-4)


def test_length_normalization_can_change_the_pick():
    """acc takes the highest log-likelihood, acc_norm the highest per character of the choice."""
    from gptforge.evaluation.tasks import TaskData

    item = multiple_choice_item("Q:", ["no", "a much longer answer"], gold=1)

    data = TaskData("t", [item], {"": [item]})
    # -4 / 2 chars = -2 per char against -20 / 20 chars = -1 per char.
    results = task_metrics(data, [item], [[Score(-4.0, False, 1), Score(-20.0, False, 4)]], shots=0)
    values = {r.metric: r.value for r in results}
    assert values == {"acc": 0.0, "acc_norm": 1.0}


def test_fewshot_prompts_are_drawn_as_lm_eval_draws_them(tmp_path):
    """Seeded draws in item order, joined by blank lines: HellaSwag's draw one more and drop
    the item (lm-eval's path for configs without a test split), ARC's and LAMBADA's draw just
    the shots; MMLU's are its subject's first dev questions after the description."""
    hella = load_task("hellaswag", shots=2)
    rows = [json.loads(line) for line in fixtures._jsonl(fixtures.HELLASWAG_TRAIN).splitlines()]
    rnd = random.Random(1234)
    prompts = fewshot_prompts(hella, 2, seed=1234)
    for item, prompt in zip(hella.items, prompts):
        picks = rnd.sample(range(len(rows)), 3)[:2]  # no training row equals a validation item
        shots = ""
        for i in picks:
            row = rows[i]
            shots += (f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()} "
                      f"{row['endings'][row['label']]}\n\n")
        assert prompt.contexts == (shots + item.contexts[0],)
        assert prompt.targets == item.targets
    assert fewshot_prompts(hella, 2, seed=1234) == prompts  # seeded: the same again
    assert fewshot_prompts(hella, 2, seed=7) != prompts

    arc = load_task("arc_easy", shots=1)
    rnd = random.Random(1234)
    for item, prompt in zip(arc.items, fewshot_prompts(arc, 1)):
        shot = arc.pools[""][rnd.sample(range(len(arc.pools[""])), 1)[0]]
        assert prompt.contexts[0] == shot.example + "\n\n" + item.contexts[0]

    lambada = load_task("lambada", shots=3)
    rnd = random.Random(1234)
    for item, prompt in zip(lambada.items, fewshot_prompts(lambada, 3)):
        shots = "".join(x.example + "\n\n" for x in rnd.sample(lambada.items, 3))
        assert prompt.contexts[0] == shots + item.contexts[0]
        assert "  " in shots  # lm-eval's example: context, the delimiter, then " word"

    mmlu = load_task("mmlu", shots=2)
    first = fewshot_prompts(mmlu, 2)[0].contexts[0]
    dev = fixtures.MMLU["astronomy"]["dev"]
    expected = "The following are multiple choice questions (with answers) about astronomy.\n\n" + "".join(
        f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans}\n\n" for q, a, b, c, d, ans in dev[:2])
    assert first.startswith(expected) and first.endswith("\nD. Venus\nAnswer:")
    biology = [p for p in fewshot_prompts(mmlu, 1) if p.group == "college_biology"][0].contexts[0]
    assert "about college biology.\n\nMade-up biology question 0?" in biology

    wino = fewshot_prompts(load_task("winogrande", shots=1), 1)[0]
    assert len(wino.contexts) == 2 and wino.contexts[0].startswith("Made-up sentence")
    mine = load_task(str(write_jsonl(tmp_path / "four.jsonl", MC_ROWS)))
    for item, prompt in zip(mine.items, fewshot_prompts(mine, 3)):
        assert item.example not in prompt.contexts[0]  # a local file never shows an item itself
    with pytest.raises(BadInputError, match="shots"):
        fewshot_prompts(mine, 4)  # 4 items: at most 3 others to show


def test_prompts_match_lm_eval_templates():
    """The prompts of each task as lm-evaluation-harness's own templates and helpers write them."""
    pytest.importorskip("lm_eval")
    jinja2 = pytest.importorskip("jinja2")
    import importlib.util

    import lm_eval
    import yaml

    root = Path(lm_eval.__file__).parent / "tasks"

    def module(path: Path):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    hella_utils = module(root / "hellaswag" / "utils.py")
    for row, item in zip(fixtures.HELLASWAG_VAL, load_task("hellaswag").items):
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        assert item.contexts[0] == hella_utils.preprocess(row["activity_label"] + ": " + ctx)
        assert item.targets == tuple(" " + hella_utils.preprocess(e) for e in row["endings"])

    wino = module(root / "winogrande" / "preprocess_winogrande.py")
    for row, item in zip(fixtures.WINOGRANDE["dev"], load_task("winogrande").items):
        assert item.contexts == tuple(wino.doc_to_choice(row))
        assert item.targets == (" " + wino.doc_to_target(row),)
        assert item.gold == wino.doc_to_text(row)

    def template(path: Path) -> str:
        text = path.read_text()
        return yaml.safe_load("\n".join(line for line in text.splitlines() if "!function" not in line))["doc_to_text"]

    arc = jinja2.Template(template(root / "arc" / "arc_easy.yaml"))
    for row, item in zip(fixtures.ARC["Easy-Test"], load_task("arc_easy").items):
        assert item.contexts[0] == arc.render(question=row["question"]["stem"])
    piqa = jinja2.Template(template(root / "piqa" / "piqa.yaml"))
    for row, item in zip(fixtures.PIQA["valid"][0], load_task("piqa").items):
        assert item.contexts[0] == piqa.render(**row)
    mmlu = jinja2.Template(template(root / "mmlu" / "default" / "_default_template_yaml"))
    items = load_task("mmlu").items
    for row, item in zip(fixtures.MMLU["astronomy"]["test"], items):
        prompt = mmlu.render(question=row[0], choices=row[1:5])
        assert item.description + item.contexts[0] == \
            "The following are multiple choice questions (with answers) about astronomy.\n\n" + prompt
        assert item.targets == (" A", " B", " C", " D")


def test_lambada_last_word_accuracy_and_perplexity(tmp_path, monkeypatch):
    """A last word the model's greedy decoding gives counts as right, any other as wrong; the
    perplexity is exp(-mean log-likelihood) of the last words."""
    model = tiny_gpt()
    enc = get_tokenizer()
    texts, hits = [], []
    for i in range(40):  # find contexts whose greedy next token is a plain " word"
        context = f"Story number {i} ends with the word"
        with torch.no_grad():
            nxt = int(model(torch.tensor([enc.encode_ordinary(context)]))[0, -1].argmax())
        word = enc.decode([nxt])
        if word.startswith(" ") and word[1:].isalpha() and enc.encode_ordinary(context + word)[-1] == nxt:
            texts.append(context + word)
            hits.append(1.0)
        if len(texts) == 3:
            break
    assert len(texts) == 3, "the random model should give some plain words greedily"
    texts += ["Story number 99 ends with the word zzqqxx", "Another story ends with the word xyzzy"]
    hits += [0.0, 0.0]
    mirror = tmp_path / "mirror"
    (mirror / "eval" / "lambada").mkdir(parents=True)
    write_jsonl(mirror / "eval" / "lambada" / "lambada_test.jsonl", [{"text": t} for t in texts])
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    got = {r.metric: r for r in evaluate_tasks(model, enc, ["lambada"]).results}
    assert got["acc"].value == pytest.approx(sum(hits) / len(hits))
    lls = [plain_loglikelihood(model, *gpt2_pair(t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]))[0] for t in texts]
    assert got["perplexity"].value == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)
    assert got["perplexity"].stderr > 0


def test_bits_per_byte_of_a_known_text():
    from gptforge.evaluate import evaluate_string

    model = tiny_gpt(context_length=16)
    text = "Naïve café owners count bytes, not characters: é is two bytes in UTF-8. " * 4
    result = evaluate_string(model, text, batch_size=2)
    ids = get_tokenizer().encode(text)
    n_windows = (len(ids) - 16 - 1) // 16 + 1
    targets = ids[1:1 + 16 * n_windows]
    n_bytes = len(get_tokenizer().decode_bytes(targets))
    assert result["tokens"] == len(targets) and result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (n_bytes * math.log(2)))
    assert n_bytes > len(get_tokenizer().decode(targets))  # the accented letters count twice


def test_every_task_runs_end_to_end_and_writes_a_report_card(tmp_path, capsys):
    """`gptforge eval` on two saved models over every task, then `gptforge report` on both runs."""
    from gptforge.checkpoint import save_model

    jsonl = write_jsonl(tmp_path / "mine.jsonl", MC_ROWS)
    runs = []
    for seed in (0, 1):
        run = save_model(tiny_gpt(context_length=256, seed=seed), tmp_path / f"run{seed}")
        tasks = ",".join(ALL_TASKS + [str(jsonl)])
        assert main(["eval", "--model", str(run), "--tasks", tasks, "--shots", "1", "--batch-size", "5"]) == 0
        runs.append(run)
    record = json.loads((runs[0] / "eval.json").read_text())
    assert record["model"] == str(runs[0]) and record["gptforge_version"] and record["date"]
    seen = {(r["task"], r["metric"]) for r in record["results"]}
    assert ("hellaswag", "acc_norm") in seen and ("lambada", "perplexity") in seen and ("mine", "acc") in seen
    assert ("winogrande", "acc_norm") not in seen
    for r in record["results"]:
        assert r["shots"] == 1 and r["n"] > 0 and 0 <= r["value"] and r["data_sha256"]
        assert all(len(h) == 64 for h in r["data_sha256"].values())
    mmlu = next(r for r in record["results"] if r["task"] == "mmlu")
    assert mmlu["n"] == 5
    md = (runs[0] / "eval.md").read_text()
    assert "| hellaswag | acc_norm (%) | 1 |" in md and "| lambada | perplexity (lower is better) | 1 |" in md

    # Another task later adds to the card, and the same task again replaces its entries.
    assert main(["eval", "--model", str(runs[0]), "--tasks", "piqa", "--limit", "2"]) == 0
    record2 = json.loads((runs[0] / "eval.json").read_text())
    assert len(record2["results"]) == len(record["results"]) + 2
    assert main(["eval", "--model", str(runs[0]), "--tasks", "piqa", "--limit", "1"]) == 0
    record3 = json.loads((runs[0] / "eval.json").read_text())
    assert len(record3["results"]) == len(record2["results"])
    assert [r["n"] for r in record3["results"] if r["task"] == "piqa" and r["shots"] == 0] == [1, 1]

    capsys.readouterr()
    chart = tmp_path / "chart.png"
    assert main(["report", str(runs[0]), str(runs[1]), "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "run0" in out and "run1" in out and "hellaswag acc_norm % (1-shot)" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clear_errors_for_an_unknown_task_and_a_malformed_line(tmp_path, capsys):
    from gptforge.checkpoint import save_model

    run = save_model(tiny_gpt(), tmp_path / "run")
    assert main(["eval", "--model", str(run), "--tasks", "hellaswag,nosuchtask"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nosuchtask'" in err and "hellaswag" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC_ROWS[0]) + "\n{\"query\": \"x\", \"choices\": [\"a\", \n", encoding="utf-8")
    assert main(["eval", "--model", str(run), "--tasks", str(bad)]) == 2
    assert "line 2: not JSON" in capsys.readouterr().err
    write_jsonl(bad, [MC_ROWS[0], {"query": "x", "choices": ["a", "b"], "gold": 5}])
    assert main(["eval", "--model", str(run), "--tasks", str(bad)]) == 2
    assert "item 2: gold 5 does not index its 2 choices" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "eval.json" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama3", "gemma3"])
def test_decoder_families_with_their_own_tokenizer(arch, tokenizer_dir):
    """Llama-style models score through the same code: the tokenizer's BOS goes before every
    context (as transformers' tokenizer adds it, which lm-eval uses), and Gemma's sliding
    window masks the cached context per row."""
    from gptforge.decoder import DecoderModel
    from gptforge.families import DecoderConfig
    from gptforge.hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir("llama3"))
    assert tokenizer.bos_id is not None
    preset = {"llama3": "llama-3.2-1b", "gemma3": "gemma-3-270m"}[arch]
    cfg = DecoderConfig.from_name(preset).replace(
        vocab_size=tokenizer.n_vocab, context_length=64, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=8, hidden_dim=64, **({"sliding_window": 6, "layer_types": None, "global_every": 2}
                                      if arch == "gemma3" else {}))
    torch.manual_seed(0)
    model = DecoderModel(cfg).eval()
    requests = [(row["query"], " " + c) for row in MC_ROWS for c in row["choices"]]
    scores = score_requests(model, tokenizer, requests, batch_size=3)
    for (ctx, cont), score in zip(requests, scores):
        ctx_ids = tokenizer.encode_ordinary(ctx)
        cont_ids = tokenizer.encode_ordinary(ctx + cont)[len(ctx_ids):]
        assert score.logprob == pytest.approx(
            plain_loglikelihood(model, [tokenizer.bos_id] + ctx_ids, cont_ids)[0], abs=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_loglikelihoods_equal_lm_evaluation_harness(family, tokenizer_dir, tmp_path):
    """lm-evaluation-harness's own HFLM, on a tiny random transformers model, gives the same
    log-likelihoods and greedy flags as gptforge on that model loaded through gptforge.load
    (trailing spaces moved, an empty context, Llama's BOS)."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    import shutil

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gptforge import load
    from gptforge.loader import tokenizer_for

    torch.manual_seed(0)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=50257))
    else:
        vocab = json.loads((tokenizer_dir("llama3") / "tokenizer.json").read_text())["model"]["vocab"]
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(vocab) + 256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    out = tmp_path / "tiny-hf"
    hf.save_pretrained(out)
    for file in tokenizer_dir(family).iterdir():
        shutil.copy(file, out / file.name)
    requests = [("The capital of France is", " Paris"), ("The capital of France is ", "a small green frog"),
                ("Water is", " made of cheese and café crème"), ("", " hello there"),
                ("Question: two plus two?\nAnswer:", " four")]
    lm = HFLM(pretrained=str(out), batch_size=4, device="cpu", dtype="float32")
    reference = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    ours = score_requests(load(out, dtype=torch.float32), tokenizer_for(out), requests, batch_size=3)
    assert [s.logprob for s in ours] == pytest.approx([ll for ll, _ in reference], abs=1e-4)
    assert [s.greedy for s in ours] == [g for _, g in reference]


def _lm_eval_local_tasks(folder: Path) -> list[str]:
    """lm-eval task configs that read the stand-in files (converted to the Hugging Face layouts
    lm-eval's own configs expect) with lm-eval's own prompts, choices, targets and helpers."""
    import shutil

    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    shutil.copy(root / "hellaswag" / "utils.py", folder / "utils.py")
    shutil.copy(root / "winogrande" / "preprocess_winogrande.py", folder / "preprocess_winogrande.py")

    def data(name: str, rows: list[dict]) -> str:
        return str(write_jsonl(folder / f"{name}.jsonl", rows))

    def config(source: str, name: str, files: dict[str, str], extra: str = "") -> str:
        kept, in_tag = [], False
        for line in (root / source).read_text().splitlines():
            if line.startswith("tag:"):
                in_tag = True
                continue
            if in_tag and line.startswith("  - "):
                continue
            in_tag = False
            if not line.startswith(("task:", "dataset_path:", "dataset_name:", "include:")):
                kept.append(line)
        split_files = "".join(f"    {split}: {path}\n" for split, path in files.items())
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"{split_files}" + "\n".join(kept) + "\n" + extra)
        return name

    def arc(rows):
        return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]

    def piqa(rows, labels):
        return [dict(r, label=int(label)) for r, label in zip(rows, labels)]

    def hella(rows):
        return [dict(r, label=str(r["label"])) for r in rows]

    def mmlu(subject, split):
        return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans)}
                for q, a, b, c, d, ans in fixtures.MMLU[subject][split]]

    names = [
        config("hellaswag/hellaswag.yaml", "x_hellaswag", {"validation": data("hv", hella(fixtures.HELLASWAG_VAL)),
                                                           "train": data("ht", hella(fixtures.HELLASWAG_TRAIN))}),
        config("arc/arc_easy.yaml", "x_arc_easy", {"test": data("ae", arc(fixtures.ARC["Easy-Test"])),
                                                   "train": data("at", arc(fixtures.ARC["Easy-Train"]))}),
        config("piqa/piqa.yaml", "x_piqa", {"validation": data("pv", piqa(*fixtures.PIQA["valid"])),
                                            "train": data("pt", piqa(*fixtures.PIQA["train"]))}),
        config("winogrande/default.yaml", "x_winogrande", {"validation": data("wv", fixtures.WINOGRANDE["dev"]),
                                                           "train": data("wt", fixtures.WINOGRANDE["train_xl"])}),
        config("lambada/lambada_openai.yaml", "x_lambada", {"test": data("l", fixtures.LAMBADA)}),
    ]
    for subject in fixtures.MMLU:
        names.append(config("mmlu/default/_default_template_yaml", f"x_mmlu_{subject}",
                            {"test": data(f"m-{subject}", mmlu(subject, "test")),
                             "dev": data(f"md-{subject}", mmlu(subject, "dev"))},
                            f'description: "The following are multiple choice questions (with answers) about '
                            f'{subject.replace("_", " ")}.\\n\\n"\n'))
    return names


def test_every_task_matches_lm_evaluation_harness(tokenizer_dir, tmp_path, monkeypatch):
    """lm-eval itself, run two-shot on the same stand-in data (its own task configs, few-shot
    sampler and metrics, on a tiny random transformers GPT-2), builds the same requests, prompts
    and shots included, and reports the same scores as gptforge. (Zero-shot prompts are the
    ends of these; test_prompts_match_lm_eval_templates checks them on their own.)"""
    shots = 2
    lm_eval = pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    import shutil

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gptforge import load

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's (tiny) perplexity bootstrap in this process
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=512))
    model_dir = tmp_path / "tiny-hf"
    hf.save_pretrained(model_dir)
    for file in tokenizer_dir("gpt2").iterdir():
        shutil.copy(file, model_dir / file.name)
    folder = tmp_path / "lm-eval-tasks"
    folder.mkdir()
    names = _lm_eval_local_tasks(folder)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32"),
                                  tasks=names, num_fewshot=shots, task_manager=TaskManager(include_path=str(folder)),
                                  log_samples=True, bootstrap_iters=2, fewshot_random_seed=1234)

    ours_model = load(model_dir, dtype=torch.float32)
    run = evaluate_tasks(ours_model, get_tokenizer(), ALL_TASKS, shots=shots, batch_size=4)
    ours = {(r.task, r.metric): r for r in run.results}
    for task in ["hellaswag", "arc_easy", "piqa", "winogrande", "lambada"]:
        theirs = out["results"][f"x_{task}"]
        prompts = fewshot_prompts(load_task(task, shots), shots)
        samples = sorted(out["samples"][f"x_{task}"], key=lambda s: s["doc_id"])
        assert [[tuple(a) for a in s["arguments"]] for s in samples] == [p.requests() for p in prompts], task
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in theirs:
                assert ours[task, metric].value == pytest.approx(theirs[f"{metric},none"], rel=1e-4), (task, metric)
                if metric != "perplexity":  # lm-eval bootstraps that one; the rest are closed-form
                    assert ours[task, metric].stderr == pytest.approx(theirs[f"{metric}_stderr,none"]), (task, metric)
    mmlu_prompts = fewshot_prompts(load_task("mmlu", shots), shots)
    n_right, stderrs, sizes = 0.0, [], []
    for subject in fixtures.MMLU:
        samples = sorted(out["samples"][f"x_mmlu_{subject}"], key=lambda s: s["doc_id"])
        mine = [p.requests() for p in mmlu_prompts if p.group == subject]
        assert [[tuple(a) for a in s["arguments"]] for s in samples] == mine, subject
        n_right += out["results"][f"x_mmlu_{subject}"]["acc,none"] * len(samples)
        stderrs.append(out["results"][f"x_mmlu_{subject}"]["acc_stderr,none"])
        sizes.append(len(samples))
    from lm_eval.api.metrics import pooled_sample_stderr

    assert ours["mmlu", "acc"].value == pytest.approx(n_right / ours["mmlu", "acc"].n)
    assert ours["mmlu", "acc"].stderr == pytest.approx(float(pooled_sample_stderr(stderrs, sizes)))
