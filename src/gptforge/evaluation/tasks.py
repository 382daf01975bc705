"""The benchmark tasks: each one's upstream files read into prompts, as lm-evaluation-harness words them.

A task turns its data set into `Item`s. An item is one question with its choices already
worded as log-likelihood requests: `contexts` (one shared by every choice, or one per choice
for Winogrande's partial evaluation) and `targets` (the continuations scored, each with its
leading " "; one per choice, or one shared). The prompts follow lm-evaluation-harness 0.4
(`lm_eval/tasks/<task>/*.yaml`):

- hellaswag: "<activity>: <ctx_a> <Ctx_b>" with the WikiHow "[title]" and "[...]" artifacts
  cleaned, each ending scored after it; validation split, shots from train.
- arc_easy / arc_challenge: "Question: <stem>\\nAnswer:", each option's text scored; test
  split, shots from train.
- piqa: "Question: <goal>\\nAnswer:", sol1 and sol2 scored; validation split, shots from train.
- winogrande: the option fills the blank, and the rest of the sentence after the blank is
  what is scored (the same suffix under each option's context); dev split, shots from
  train_xl.
- lambada: OpenAI's LAMBADA test set (lm-eval's lambada_openai); the text up to its last
  " " is the context, the last word (with its space) the target: accuracy is whether greedy
  decoding gives exactly that word, perplexity is exp(-mean log-likelihood) of it.
- mmlu: "The following are multiple choice questions (with answers) about <subject>.\\n\\n"
  then "<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", scoring " A" .. " D"; test
  split, shots the subject's first dev questions, in order.
- a path to a .jsonl file: one {"query": str, "choices": [str, ...], "gold": int} per line,
  " " + each choice scored after the query; shots drawn from the same file, never the item
  itself.

Shots come from the training split (HellaSwag, ARC, PIQA, Winogrande), the subject's dev
questions (MMLU) or the evaluated set itself (LAMBADA, a local file).

Every file comes through `gptforge.download` (registry names in `TASKS`), so a
mirror (`GPTFORGE_DATA_MIRROR`) or a file saved by hand in the cache works offline.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from gptforge.errors import BadInputError, NotFoundError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Item:
    """One evaluation question as log-likelihood requests (see the module docstring).

    `gold` is the index of the right choice; `choice_lengths` the characters of each choice's
    text without the delimiter (what lm-eval's acc_norm divides by); `example` the item worded
    as a solved few-shot example; `description` the text put before the shots (MMLU's);
    `group` names the pool its shots come from (an MMLU subject).
    """

    contexts: tuple[str, ...]
    targets: tuple[str, ...]
    gold: int
    choice_lengths: tuple[int, ...]
    example: str
    description: str = ""
    group: str = ""

    @property
    def n_choices(self) -> int:
        return max(len(self.contexts), len(self.targets))

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair of each choice."""
        n = self.n_choices
        return [(self.contexts[i if len(self.contexts) > 1 else 0],
                 self.targets[i if len(self.targets) > 1 else 0]) for i in range(n)]

    def with_prefix(self, prefix: str) -> Item:
        """This item with `prefix` (description and shots) before every context."""
        return replace(self, contexts=tuple(prefix + c for c in self.contexts))


@dataclass(frozen=True)
class TaskData:
    """A task's items, the few-shot pools by group, and the files they came from (path -> sha256).

    `kind` is "multiple_choice" or "last_word"; `metrics` the metrics it reports;
    `sampler` how shots are drawn ("random": seeded, lm-eval's default; "first_n": in file
    order); `leave_out_item` draws one shot more and drops the item itself from the draw, as
    lm-eval does for the tasks whose config names no test split (see `harness.fewshot_prompts`).
    """

    name: str
    items: list[Item]
    pools: dict[str, list[Item]]
    kind: str = "multiple_choice"
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    sampler: str = "random"
    leave_out_item: bool = False
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """Where a benchmark's data comes from: the registry names (`gptforge.download.RESOURCES`)
    of its evaluated files and of its few-shot files (fetched only when shots are asked
    for; none: the evaluated set is the pool), how they are read, and whether a draw leaves
    the item out (`TaskData.leave_out_item`)."""

    eval_files: tuple[str, ...]
    shot_files: tuple[str, ...]
    read: Callable[[list[Path]], list[Item]]
    kind: str = "multiple_choice"
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    leave_out_item: bool = False


TASKS: dict[str, TaskSpec] = {
    # lm-eval's hellaswag, piqa and winogrande configs name no test split, which makes its
    # sampler take the leave-the-item-out path (fewshot split None == test split None).
    "hellaswag": TaskSpec(("hellaswag-val",), ("hellaswag-train",), lambda p: hellaswag_items(p[0]),
                          leave_out_item=True),
    "arc_easy": TaskSpec(("arc-easy-test",), ("arc-easy-train",), lambda p: arc_items(p[0])),
    "arc_challenge": TaskSpec(("arc-challenge-test",), ("arc-challenge-train",), lambda p: arc_items(p[0])),
    "piqa": TaskSpec(("piqa-valid", "piqa-valid-labels"), ("piqa-train", "piqa-train-labels"),
                     lambda p: piqa_items(p[0], p[1]), leave_out_item=True),
    "winogrande": TaskSpec(("winogrande-dev",), ("winogrande-train-xl",), lambda p: winogrande_items(p[0]),
                           metrics=("acc",), leave_out_item=True),
    # LAMBADA has only its test set, so shots come from it too; lm-eval does not leave the
    # passage itself out of the draw (its config names a test split), and neither does this.
    "lambada": TaskSpec(("lambada-openai-test",), (), lambda p: lambada_items(p[0]),
                        kind="last_word", metrics=("perplexity", "acc")),
    # MMLU's one archive holds both the test questions and the dev questions its shots come from.
    "mmlu": TaskSpec(("mmlu-data",), (), lambda p: mmlu_splits(p[0])[0], metrics=("acc",)),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def _fetch(name: str, cache_dir, progress: bool) -> Path:
    from gptforge.download import RESOURCES, download, extract_member

    if RESOURCES[name].member is not None:
        return extract_member(name, cache_dir=cache_dir, progress=progress)
    return download(name, cache_dir=cache_dir, progress=progress)


def _read_jsonl(path: Path, what: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}, line {number}: not JSON ({exc.msg}); {what} must hold one "
                                    "JSON object per line") from None
            if not isinstance(row, dict):
                raise BadInputError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object; "
                                    f"{what} must hold one JSON object per line")
            rows.append(row)
    return rows


def _field(row: dict, key: str, kind: type, path: Path, number: int):
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadInputError(f"{path}, item {number}: {key!r} must be a {kind.__name__}, not {value!r}")
    return value


def multiple_choice_item(query: str, choices: Sequence[str], gold: int, description: str = "",
                         group: str = "") -> Item:
    """An item that scores " " + each choice after `query` (the plain multiple-choice form)."""
    return Item(contexts=(query,), targets=tuple(TARGET_DELIMITER + c for c in choices), gold=gold,
                choice_lengths=tuple(len(c) for c in choices),
                example=query + TARGET_DELIMITER + choices[gold], description=description, group=group)


# -- HellaSwag ---------------------------------------------------------------------------------

def _hellaswag_clean(text: str) -> str:
    """lm-eval's cleaning of HellaSwag text: WikiHow's " [title]" becomes ". ", other
    bracketed tags go, doubled spaces are halved."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_items(path: Path) -> list[Item]:
    """HellaSwag items from rowanz/hellaswag's jsonl (ctx_a, ctx_b, activity_label, endings, label)."""
    items = []
    for number, row in enumerate(_read_jsonl(path, "a HellaSwag file"), 1):
        endings = _field(row, "endings", list, path, number)
        ctx = _field(row, "ctx_a", str, path, number) + " " + _field(row, "ctx_b", str, path, number).capitalize()
        query = _hellaswag_clean(_field(row, "activity_label", str, path, number) + ": " + ctx)
        label = row.get("label")
        if label is None or str(label) not in {str(i) for i in range(len(endings))}:
            raise BadInputError(f"{path}, item {number}: label {label!r} does not index its {len(endings)} endings")
        items.append(multiple_choice_item(query, [_hellaswag_clean(e) for e in endings], int(label)))
    return items


# -- ARC ---------------------------------------------------------------------------------------

def arc_items(path: Path) -> list[Item]:
    """ARC items from AI2's jsonl ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"})."""
    items = []
    for number, row in enumerate(_read_jsonl(path, "an ARC file"), 1):
        question = _field(row, "question", dict, path, number)
        choices = _field(question, "choices", list, path, number)
        labels = [c.get("label") for c in choices]
        if row.get("answerKey") not in labels:
            raise BadInputError(f"{path}, item {number}: answerKey {row.get('answerKey')!r} is not one of "
                                f"the labels {labels}")
        query = f"Question: {_field(question, 'stem', str, path, number)}\nAnswer:"
        items.append(multiple_choice_item(query, [str(c.get("text", "")) for c in choices],
                                          labels.index(row["answerKey"])))
    return items


# -- PIQA --------------------------------------------------------------------------------------

def piqa_items(path: Path, labels_path: Path) -> list[Item]:
    """PIQA items from ybisk's `<split>.jsonl` (goal, sol1, sol2) and `<split>-labels.lst` (0 or 1 a line)."""
    rows = _read_jsonl(path, "a PIQA file")
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise BadInputError(f"{labels_path} holds {len(labels)} labels for the {len(rows)} questions of {path}: "
                            "the two files are not from the same split")
    items = []
    for number, (row, label) in enumerate(zip(rows, labels), 1):
        if label not in ("0", "1"):
            raise BadInputError(f"{labels_path}, line {number}: label {label!r}, not 0 or 1")
        query = f"Question: {_field(row, 'goal', str, path, number)}\nAnswer:"
        items.append(multiple_choice_item(query, [_field(row, "sol1", str, path, number),
                                                  _field(row, "sol2", str, path, number)], int(label)))
    return items


# -- Winogrande --------------------------------------------------------------------------------

def winogrande_items(path: Path) -> list[Item]:
    """Winogrande items from the release's jsonl (sentence with one "_", option1, option2, answer "1"/"2").

    Partial evaluation: each option fills the blank to make a context, and the sentence's
    rest after the blank, the same under both, is the continuation scored.
    """
    items = []
    for number, row in enumerate(_read_jsonl(path, "a Winogrande file"), 1):
        sentence = _field(row, "sentence", str, path, number)
        if "_" not in sentence:
            raise BadInputError(f"{path}, item {number}: the sentence has no blank '_'")
        answer = str(row.get("answer", ""))
        if answer not in ("1", "2"):
            raise BadInputError(f"{path}, item {number}: answer {row.get('answer')!r}, not '1' or '2'")
        blank = sentence.index("_")
        options = [_field(row, "option1", str, path, number), _field(row, "option2", str, path, number)]
        contexts = tuple(sentence[:blank] + option for option in options)
        suffix = sentence[blank + 1:].strip()
        gold = int(answer) - 1
        items.append(Item(contexts=contexts, targets=(TARGET_DELIMITER + suffix,), gold=gold,
                          choice_lengths=tuple(len(c) for c in contexts),
                          example=contexts[gold] + TARGET_DELIMITER + suffix))
    return items


# -- LAMBADA -----------------------------------------------------------------------------------

def lambada_items(path: Path) -> list[Item]:
    """LAMBADA items from OpenAI's lambada_test.jsonl ({"text": ...}): the last word is the target."""
    items = []
    for number, row in enumerate(_read_jsonl(path, "a LAMBADA file"), 1):
        text = _field(row, "text", str, path, number)
        words = text.split(" ")
        if len(words) < 2:
            raise BadInputError(f"{path}, item {number}: the text has no last word after a space")
        context, target = " ".join(words[:-1]), " " + words[-1]
        # lm-eval words a solved example as context + target delimiter + target (two spaces).
        items.append(Item(contexts=(context,), targets=(target,), gold=0, choice_lengths=(len(target),),
                          example=context + TARGET_DELIMITER + target))
    return items


# -- MMLU --------------------------------------------------------------------------------------

def _mmlu_item(row: list[str], subject: str, where: str) -> Item:
    if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
        raise BadInputError(f"{where}: an MMLU row is question, four options and the answer letter, not {row!r}")
    question, options, answer = row[0], row[1:5], row[5].strip()
    query = question.strip() + "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", options)) + "\nAnswer:"
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return multiple_choice_item(query, ["A", "B", "C", "D"], "ABCD".index(answer), description, group=subject)


def mmlu_splits(tar_path: Path) -> tuple[list[Item], dict[str, list[Item]]]:
    """MMLU's test items (subjects in name order) and each subject's dev questions, from
    hendrycks' data.tar (data/test/<subject>_test.csv, data/dev/<subject>_dev.csv)."""
    splits: dict[str, dict[str, list[Item]]] = {"test": {}, "dev": {}}
    try:
        with tarfile.open(tar_path) as archive:
            for member in archive.getmembers():
                match = re.fullmatch(r"(?:\./)?data/(test|dev)/(\w+)_(test|dev)\.csv", member.name)
                if not member.isfile() or match is None or match.group(1) != match.group(3):
                    continue
                split, subject = match.group(1), match.group(2)
                text = archive.extractfile(member).read().decode("utf-8")
                rows = csv.reader(io.StringIO(text))
                splits[split][subject] = [_mmlu_item(row, subject, f"{tar_path}:{member.name}, row {n}")
                                          for n, row in enumerate(rows, 1) if row]
    except tarfile.TarError as exc:
        raise BadInputError(f"{tar_path} is not MMLU's data.tar ({exc}); delete it and download it again") from None
    if not splits["test"]:
        raise BadInputError(f"{tar_path} holds no data/test/<subject>_test.csv files: it is not MMLU's data.tar")
    items = [item for subject in sorted(splits["test"]) for item in splits["test"][subject]]
    return items, splits["dev"]


# -- a local multiple-choice file ---------------------------------------------------------------

def jsonl_items(path: Path) -> list[Item]:
    """Items from a local jsonl file of {"query": str, "choices": [str, ...], "gold": int} lines."""
    items = []
    rows = _read_jsonl(path, "a multiple-choice task file")
    if not rows:
        raise BadInputError(f"{path} holds no items: write one JSON object per line")
    for number, row in enumerate(rows, 1):
        query = _field(row, "query", str, path, number)
        choices = _field(row, "choices", list, path, number)
        gold = _field(row, "gold", int, path, number)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise BadInputError(f"{path}, item {number}: 'choices' must be a list of at least two strings")
        if not 0 <= gold < len(choices):
            raise BadInputError(f"{path}, item {number}: gold {gold} does not index its {len(choices)} choices")
        items.append(multiple_choice_item(query, choices, gold))
    return items


def is_task_file(name: str) -> bool:
    """Whether a task name is a path to a local jsonl task file rather than a benchmark's name."""
    return name.endswith(".jsonl") or os.sep in name or "/" in name


def check_task(name: str) -> None:
    """Raise `BadInputError` (or `NotFoundError`) now for a task name that `load_task` would refuse:
    an unknown benchmark, a missing file, or a malformed line of a local task file."""
    if is_task_file(name):
        path = Path(name)
        if not path.is_file():
            raise NotFoundError(f"task file {path} does not exist; give a benchmark ({', '.join(TASK_NAMES)}) "
                                "or a .jsonl file of {\"query\", \"choices\", \"gold\"} lines")
        jsonl_items(path)
    elif name not in TASKS:
        raise BadInputError(f"unknown task {name!r}; the tasks are {', '.join(TASK_NAMES)}, or a path to a "
                            ".jsonl file of {\"query\", \"choices\", \"gold\"} lines")


def load_task(name: str, shots: int = 0, *, cache_dir: str | os.PathLike | None = None,
              progress: bool = False) -> TaskData:
    """Read one task's items (and, with `shots`, its few-shot pools), downloading files as needed.

    `name` is one of `TASK_NAMES` or a path to a local .jsonl file (see the module docstring).
    Raises `BadInputError` for an unknown name or a malformed file.
    """
    from gptforge.fileio import file_sha256

    check_task(name)
    if is_task_file(name):
        path = Path(name)
        items = jsonl_items(path)
        return TaskData(path.stem, items, {"": items}, leave_out_item=True, files={path.name: file_sha256(path)})
    spec = TASKS[name]
    eval_paths = [_fetch(r, cache_dir, progress) for r in spec.eval_files]
    shot_paths = [_fetch(r, cache_dir, progress) for r in spec.shot_files] if shots else []
    files = {p.name: file_sha256(p) for p in eval_paths + shot_paths}
    if name == "mmlu":
        items, dev = mmlu_splits(eval_paths[0])
        return TaskData(name, items, dev, metrics=spec.metrics, sampler="first_n", files=files)
    items = spec.read(eval_paths)
    pool = items if not spec.shot_files else spec.read(shot_paths) if shots else []
    return TaskData(name, items, {"": pool}, kind=spec.kind, metrics=spec.metrics,
                    leave_out_item=spec.leave_out_item, files=files)
