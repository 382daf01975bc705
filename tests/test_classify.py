"""Text classification: the book's spam split, batching, pooling, what trains, the two commands."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import current_checkpoint
from gptforge import GPTConfig, GPTModel, load
from gptforge.checkpoint import ClassifierSettings, RunMeta, save_model
from gptforge.cli import main
from gptforge.finetune.classify import (
    ClassificationDataset,
    TextClassifier,
    TextSplits,
    balance_classes,
    class_logits,
    label_names,
    load_for_training,
    pad_batch,
    pool_logits,
    prepare_classifier,
    read_examples,
    read_sms_spam,
    shuffle_split,
    sms_spam_splits,
    train_classifier,
)
from gptforge.finetune.lora import LoRALinear
from gptforge.training import TrainConfig

# sha256 over "split<TAB>label<TAB>text\n" of every example, computed from the book's own
# pandas code (read_csv, sample(747, random_state=123), concat, sample(frac=1,
# random_state=123), 70/10/20) run with pandas 3.1.1: with quoting=csv.QUOTE_NONE, and
# with read_csv's default quoting (what the book ran).
PANDAS_SPLIT_SHA256 = {
    False: "32a86eb1d576d24366ae707f35123443d225b0b8b7bf9c77445db9039c027e90",
    True: "825fb7d8c7229b0b7006dea173f1d5a85ff1321847e4c9f5551d2ee3a279257f",
}
TINY = ["--init", "gpt2-small", "--n-layers", "1", "--emb-dim", "16", "--n-heads", "2",
        "--context-length", "64", "--trainable", "all", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread_each")  # tiny models: one thread (conftest)


def _fingerprint(splits: TextSplits) -> str:
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for text, label in getattr(splits, split):
            h.update(f"{split}\t{label}\t{text}\n".encode())
    return h.hexdigest()


def _tiny_model(context_length: int = 32) -> GPTModel:
    return GPTModel(GPTConfig(context_length=context_length, emb_dim=16, n_heads=2, n_layers=2,
                              drop_rate=0.0))


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("Label", "Text")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _toy_rows(n: int = 24) -> list[tuple[str, str]]:
    """(label, text) rows that a tiny model can tell apart: sunny vs rainy words."""
    good = ["sunny warm day", "bright sun and blue sky", "clear skies all week", "hot and sunny"]
    bad = ["heavy rain again", "grey drizzle and wind", "storm clouds, rain later", "wet and cold rain"]
    return [("sun" if i % 2 else "rain", (good if i % 2 else bad)[i % 4] + f" {i}") for i in range(n)]


# ------------------------------------------------------------------------------------
# data

@pytest.mark.needs_data("sms-spam-collection")
def test_spam_split_follows_the_book():
    splits = sms_spam_splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1045, 149, 300)
    # The splits partition the balanced set: 747 of each class, nothing shared or lost.
    everything = Counter(splits.train + splits.val + splits.test)
    assert everything == Counter(balance_classes(read_sms_spam(), "ham", 123))
    assert Counter(label for _, label in everything.elements()) == {"ham": 747, "spam": 747}
    assert splits.label_names() == ["ham", "spam"]  # ham = 0, spam = 1 as in the book
    assert _fingerprint(sms_spam_splits()) == _fingerprint(splits)  # deterministic
    assert _fingerprint(sms_spam_splits(seed=1)) != _fingerprint(splits)


@pytest.mark.needs_data("sms-spam-collection")
@pytest.mark.parametrize("book_quoting", [False, True])
def test_spam_split_equals_pandas(book_quoting):
    assert _fingerprint(sms_spam_splits(book_quoting=book_quoting)) == PANDAS_SPLIT_SHA256[book_quoting]


def test_spam_split_equals_pandas_live():
    pd = pytest.importorskip("pandas")
    from gptforge.download import extract_member

    df = pd.read_csv(extract_member("sms-spam-collection"), sep="\t", header=None,
                     names=["Label", "Text"], quoting=csv.QUOTE_NONE)
    n_spam = int((df["Label"] == "spam").sum())
    balanced = pd.concat([df[df["Label"] == "ham"].sample(n_spam, random_state=123),
                          df[df["Label"] == "spam"]]).sample(frac=1, random_state=123)
    ours = sms_spam_splits()
    assert list(zip(balanced["Text"], balanced["Label"])) == ours.train + ours.val + ours.test


@pytest.mark.needs_data("sms-spam-collection")
def test_spam_file_quoting():
    plain, book = read_sms_spam(), read_sms_spam(book_quoting=True)
    assert len(plain) == 5574 and Counter(lbl for _, lbl in plain) == {"ham": 4827, "spam": 747}
    assert len(book) == 5572  # pandas' default quoting glues three lines into one


def test_shuffle_split_sizes_and_csv_round_trip(tmp_path):
    examples = [(f"text {i}, with \"quotes\"\nand a newline", str(i % 3)) for i in range(50)]
    splits = shuffle_split(examples)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (35, 5, 10)
    assert sorted(splits.train + splits.val + splits.test) == sorted(examples)
    splits.save(tmp_path)
    assert TextSplits.load(tmp_path) == splits
    assert read_examples(tmp_path / "train.csv") == splits.train


def test_label_names_order():
    assert label_names(["spam", "ham", "spam"]) == ["ham", "spam"]
    assert label_names(["10", "2", "1"]) == ["1", "2", "10"]


def test_tsv_and_custom_columns(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("sentiment\tsentence\npos\tgreat film\nneg\tdull\n", encoding="utf-8")
    assert read_examples(path, "sentence", "sentiment") == [("great film", "pos"), ("dull", "neg")]


def test_data_errors(tmp_path):
    path = _write_csv(tmp_path / "a.csv", [("x", "y")], header=("label", "message"))
    with pytest.raises(ValueError, match=r"no column 'Text' \(columns found: 'label', 'message'\)"):
        read_examples(path)
    empty = _write_csv(tmp_path / "b.csv", [("ham", "fine"), ("spam", "  ")])
    with pytest.raises(ValueError, match="row 2 has an empty text"):
        read_examples(empty)
    with pytest.raises(ValueError, match=r"only one class \('ham'\)"):
        TextSplits([("a", "ham"), ("b", "ham")]).label_names()
    with pytest.raises(ValueError, match="label.*'maybe'.*training data does not have"):
        ClassificationDataset([("a", "maybe")], ["ham", "spam"], what="the test data")


# ------------------------------------------------------------------------------------
# batches and pooling

def test_truncation_and_padding():
    data = ClassificationDataset([("one two three four five", "b"), ("one", "a")], ["a", "b"])
    assert data.max_length == 5  # the longest text, in tokens
    assert [len(ids) for ids, _ in data] == [5, 1]
    short = ClassificationDataset([("one two three four five", "b")], ["a", "b"], max_length=3)
    assert short[0][0].tolist() == data[0][0][:3].tolist()  # the start of the text is kept
    with pytest.raises(ValueError, match="context length"):
        ClassificationDataset([("one two", "a")], ["a", "b"], max_length=9, context_length=8)
    assert ClassificationDataset([("one two three", "a")], ["a", "b"], context_length=2).max_length == 2

    ids, lengths, labels = pad_batch([data[1], data[0]])
    assert ids.shape == (2, 5) and lengths.tolist() == [1, 5] and labels.tolist() == [0, 1]
    assert ids[0, 1:].eq(50256).all() and ids[0, 0] == data[1][0][0]  # padded on the right
    assert pad_batch([data[1]], pad_to=7)[0].shape == (1, 7)


def test_pooling_picks_positions():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)  # (B, T, C)
    lengths = torch.tensor([2, 4])
    assert torch.equal(pool_logits(logits, lengths, "last-token"), torch.stack([logits[0, 1], logits[1, 3]]))
    assert torch.equal(pool_logits(logits, lengths, "last"), logits[:, -1])
    assert torch.allclose(pool_logits(logits, lengths, "mean"),
                          torch.stack([logits[0, :2].mean(0), logits[1].mean(0)]))
    with pytest.raises(ValueError, match="pooling"):
        pool_logits(logits, lengths, "first")


@pytest.mark.parametrize("pooling", ["last-token", "mean"])
def test_padding_does_not_change_the_prediction(pooling):
    model = prepare_classifier(_tiny_model(), 3).eval()
    text = torch.tensor([[11, 22, 33]])
    padded = torch.tensor([[11, 22, 33, 50256, 50256]])
    with torch.no_grad():
        alone = class_logits(model, text, torch.tensor([3]), pooling)
        in_batch = class_logits(model, padded, torch.tensor([3]), pooling)
    assert torch.allclose(alone, in_batch, atol=1e-6)


# ------------------------------------------------------------------------------------
# what trains

def _one_step(model, tmp_path, **kwargs):
    rows = [(text, label) for label, text in _toy_rows(16)]
    cfg = TrainConfig(max_steps=1, batch_size=8, lr=1e-2, eval_every=1, eval_batches=1, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_classifier(model, TextSplits(rows), cfg, tmp_path, **kwargs)
    return before


@pytest.mark.parametrize("mode", ["last-block", "head"])
def test_frozen_parameters_stay_put(tmp_path, mode):
    model = prepare_classifier(_tiny_model(), 2, trainable=mode)
    before = _one_step(model, tmp_path)
    for name, p in model.named_parameters():
        trains = name.startswith("out_head") or (
            mode == "last-block" and (name.startswith("blocks.1.") or name.startswith("final_norm")))
        assert p.requires_grad == trains, name
        changed = not torch.equal(before[name], p.detach())
        # LayerNorm biases and the like may get zero gradient in one step; weights do change.
        if trains and name.endswith("weight"):
            assert changed, name
        if not trains:
            assert not changed, name


def _save_classifier(model, path, labels, **settings):
    meta = RunMeta(model=model.cfg, task="classifier",
                   classifier=ClassifierSettings(labels=labels, **settings))
    return save_model(model, path, meta)


def test_lora_classifier_saves_adapters_and_resumes_unmerged(tmp_path):
    model = prepare_classifier(_tiny_model(), 2, trainable="lora", lora_rank=2, lora_alpha=4.0)
    before = _one_step(model, tmp_path / "run")
    names = dict(model.named_parameters())
    assert torch.equal(before["blocks.0.attn.qkv.base.weight"], names["blocks.0.attn.qkv.base.weight"])
    assert not torch.equal(before["blocks.0.attn.qkv.B"], names["blocks.0.attn.qkv.B"])

    ids, lengths = torch.tensor([[5, 6, 7]]), torch.tensor([3])
    with torch.no_grad():
        expected = class_logits(model.eval(), ids, lengths)
        # Adapters and the new head only, over a frozen copy of the fresh base in run/base.
        current = current_checkpoint(tmp_path / "run")
        assert (current / "adapter.safetensors").is_file()
        assert not (current / "model.safetensors").exists()
        assert (tmp_path / "run" / "base" / "model.safetensors").is_file()
        merged = load(tmp_path / "run")  # a plain model, loadable by any command
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert torch.allclose(class_logits(merged.eval(), ids, lengths), expected, atol=1e-5)
        again = load_for_training(tmp_path / "run")
        assert torch.allclose(class_logits(again.eval(), ids, lengths), expected, atol=1e-5)
    restored = dict(again.named_parameters())
    assert torch.equal(restored["blocks.0.attn.qkv.A"], names["blocks.0.attn.qkv.A"])
    assert torch.equal(restored["blocks.0.attn.qkv.base.weight"], before["blocks.0.attn.qkv.base.weight"])
    assert [n for n, p in again.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]


def test_save_classifier_and_predict(tmp_path):
    model = prepare_classifier(_tiny_model(), 3)
    _save_classifier(model, tmp_path, ["a", "b", "c"], pooling="mean", max_length=8)
    clf = TextClassifier.load(tmp_path)
    probs = clf.predict_proba(["hello there", "a much longer text " * 10])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    label, p = clf.predict(["hello there"])[0]
    assert label in {"a", "b", "c"} and 0 < p <= 1


# ------------------------------------------------------------------------------------
# the commands

@pytest.mark.needs_data("sms-spam-collection")
def test_finetune_and_classify_end_to_end(tmp_path, capsys):
    run = tmp_path / "spam"
    assert main(["finetune", "classify", *TINY, "--max-steps", "3", "--eval-every", "2",
                 "--lr", "1e-3", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Classes: ham, spam. Examples: 1045 train, 149 validation, 300 test" in out
    assert "Test accuracy:" in out and "confusion matrix" in out
    for name in ("train.csv", "validation.csv", "test.csv", "loss.png", "accuracy.png",
                 "test_metrics.json", "metrics.jsonl", "gptforge.json"):
        assert (run / name).is_file(), name
    assert (current_checkpoint(run) / "model.safetensors").is_file()
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["test"]["labels"] == ["ham", "spam"] and metrics["test"]["positive_class"] == "spam"
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == 300
    for key in ("accuracy", "precision", "recall", "f1", "macro", "per_class"):
        assert key in metrics["test"]
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_accuracy", "val_accuracy", "train_loss", "val_loss"} <= set(record)

    assert main(["classify", "--model", str(run), "WINNER!! Claim your prize now", "see you at 6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["WINNER!! Claim your prize now", "see you at 6"]):
        label, prob, echoed = line.split("\t")
        assert label in {"ham", "spam"} and 0.5 <= float(prob) <= 1 and echoed == text

    inp = _write_csv(tmp_path / "in.csv", [("1", "Free entry in a weekly prize draw"), ("2", "ok lor")],
                     header=("id", "message"))
    assert main(["classify", "--model", str(run), "--file", str(inp), "--text-column", "message",
                 "--out", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["1", "2"]
    assert all(r["predicted_label"] in {"ham", "spam"} and 0.5 <= float(r["probability"]) <= 1 for r in rows)


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_resume_continues_exactly(tmp_path, trainable):
    train = _write_csv(tmp_path / "train.csv", _toy_rows(24))
    val = _write_csv(tmp_path / "val.csv", _toy_rows(8))
    common = ["finetune", "classify", *TINY, "--trainable", trainable, "--lora-rank", "2",
              "--train", str(train), "--val", str(val), "--max-steps", "6", "--batch-size", "4",
              "--eval-every", "2", "--lr", "1e-3"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--out", str(tmp_path / "paused"), "--stop-after", "3"]) == 0
    assert not (tmp_path / "paused" / "test_metrics.json").exists()
    assert main(["finetune", "classify", "--resume", str(tmp_path / "paused"), "--no-progress"]) == 0
    a, b = load(tmp_path / "straight"), load(tmp_path / "paused")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert json.loads((tmp_path / "paused" / "gptforge.json").read_text())["step"] == 6


def test_command_errors(tmp_path, capsys):
    wrong = _write_csv(tmp_path / "wrong.csv", [("ham", "hi")], header=("label", "sms"))
    assert main(["finetune", "classify", *TINY, "--data", str(wrong), "--out", str(tmp_path / "r")]) == 2
    assert "has no column 'Text' (columns found: 'label', 'sms')" in capsys.readouterr().err

    one = _write_csv(tmp_path / "one.csv", [("ham", f"message {i}") for i in range(10)])
    assert main(["finetune", "classify", *TINY, "--train", str(one), "--out", str(tmp_path / "r")]) == 2
    assert "only one class ('ham')" in capsys.readouterr().err

    lm = tmp_path / "lm"
    save_model(_tiny_model(), lm)
    assert main(["classify", "--model", str(lm), "hello"]) == 2
    assert "not a classifier" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path), "hello"]) == 2
    assert "not a classifier directory" in capsys.readouterr().err

    clf = tmp_path / "clf"
    _save_classifier(prepare_classifier(_tiny_model(), 2), clf, ["a", "b"])
    assert main(["classify", "--model", str(clf), "fine", "  "]) == 2
    assert "text 2 is empty" in capsys.readouterr().err
    blank = _write_csv(tmp_path / "blank.csv", [("a", "fine"), ("b", "")])
    assert main(["classify", "--model", str(clf), "--file", str(blank)]) == 2
    assert "row 2 has an empty text" in capsys.readouterr().err
    assert main(["classify", "--model", str(clf), "--file", str(blank), "--text-column", "msg"]) == 2
    assert "no column 'msg' (columns found: 'Label', 'Text')" in capsys.readouterr().err


def test_finetune_group_is_shared():
    from gptforge.cli.classify import add_commands
    from gptforge.cli.common import finetune_group

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    other = finetune_group(sub).add_parser("instruct")  # another task module came first
    other.set_defaults(task_name="instruct")
    add_commands(sub)
    assert parser.parse_args(["finetune", "instruct"]).task_name == "instruct"
    assert parser.parse_args(["finetune", "classify", "--init", "gpt2-small"]).init == "gpt2-small"
