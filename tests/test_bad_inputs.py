"""Every input is checked where it enters: a table of bad command-line inputs, one row each.

Each row runs `gptforge.cli.main([...])` and expects exit status 2, one message on stderr
that names the problem (the row's substring), and no traceback. Argparse refuses a bad flag
value by raising SystemExit(2) after printing its message; the library's own checks come
back as `error: ...` from `main`. Almost every row fails before any training starts; the few
that reach data or a model use tiny ones made once for the module.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gptforge import GPTConfig, GPTModel
from gptforge.checkpoint import ClassifierSettings, RunMeta, save_model
from gptforge.cli import main
from gptforge.data import prepare_token_file
from gptforge.finetune.classify import prepare_classifier

TINY_CFG = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
SHAPE = ["--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "32"]
QUIET = ["--no-progress", "--max-steps", "1", "--device", "cpu"]  # a regression trains one step, not ten epochs
PRETRAIN = ["pretrain", *SHAPE, *QUIET, "--text", "{text}", "--out", "{out}"]
CLASSIFY = ["finetune", "classify", "--init", "gpt2-small", *SHAPE, *QUIET, "--out", "{out}"]
INSTRUCT = ["finetune", "instruct", "--model", "{m}", *QUIET, "--max-test", "0", "--out", "{out}"]


def _words(n: int, seed: int = 0) -> str:
    """A deterministic English-looking text of n words (about n tokens)."""
    rng = random.Random(seed)
    vocab = ("the a painter quick brown fox jumps over lazy dog and then runs far away into "
             "morning light while every effort moves you toward something new").split()
    return " ".join(rng.choice(vocab) for _ in range(n)) + "\n"


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_meta(model_dir: Path, edit) -> Path:
    path = model_dir / "gptforge.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))
    return model_dir


def _without(meta: dict, key: str) -> dict:
    meta.pop(key)
    return meta


def _model_field(meta: dict, name: str, value) -> dict:
    meta["model"][name] = value
    return meta


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """Tiny models, a short training run and data files, good and bad, made once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    f = {}

    # Models: a good one, and copies damaged in each way a directory can be.
    m = save_model(GPTModel(GPTConfig(**TINY_CFG)), root / "model")
    f["m"] = m
    weights = (m / "model.safetensors").read_bytes()
    for name, content in (("truncated", weights[:len(weights) // 2]), ("empty_weights", b""),
                          ("garbage_weights", b"not a safetensors file " * 40)):
        (_copy_model(m, root / name) / "model.safetensors").write_bytes(content)
        f[name] = root / name
    f["no_model_key"] = _edit_meta(_copy_model(m, root / "no_model_key"), lambda d: _without(d, "model"))
    f["string_layers"] = _edit_meta(_copy_model(m, root / "string_layers"),
                                    lambda d: _model_field(d, "n_layers", "2"))
    f["misfit"] = _edit_meta(_copy_model(m, root / "misfit"), lambda d: _model_field(d, "n_layers", 3))
    f["huge_context"] = _edit_meta(_copy_model(m, root / "huge_context"),
                                   lambda d: _model_field(d, "context_length", 10**12))
    f["text_dropout"] = _edit_meta(_copy_model(m, root / "text_dropout"),
                                   lambda d: _model_field(d, "drop_rate", "high"))
    (_copy_model(m, root / "list_meta") / "gptforge.json").write_text("[1, 2, 3]")
    f["list_meta"] = root / "list_meta"
    (_copy_model(m, root / "broken_meta") / "gptforge.json").write_text("{not json")
    f["broken_meta"] = root / "broken_meta"
    nan_model = GPTModel(GPTConfig(**TINY_CFG))
    with torch.no_grad():
        nan_model.blocks[0].ff.fc.weight.fill_(float("nan"))
    f["nan_weights"] = save_model(nan_model, root / "nan_weights")

    # A classifier, saved as `gptforge finetune classify` saves one (no training needed).
    clf = prepare_classifier(GPTModel(GPTConfig(**TINY_CFG)), 2)
    meta = RunMeta(model=clf.cfg, task="classifier", classifier=ClassifierSettings(labels=["ham", "spam"]))
    f["cls"] = save_model(clf, root / "classifier", meta)

    # Texts.
    f["text"] = root / "text.txt"
    f["text"].write_text(_words(3000))
    (root / "short.txt").write_text("A short text of a few tokens.\n")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n  \n\n")
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, ol\xe9.\n".encode("latin-1") * 20)
    (root / "binary.txt").write_bytes(b"GIF89a\x00\x00\x01\x00" * 50)
    (root / "empty_dir").mkdir()
    (root / "only_dirs" / "sub").mkdir(parents=True)
    for name in ("short", "empty", "blank", "latin1", "binary"):
        f[name] = root / f"{name}.txt"
    f["empty_dir"], f["only_dirs"] = root / "empty_dir", root / "only_dirs"

    # Token files: a good one, one cut short, one whose summary is garbage.
    f["tokens"] = root / "tokens.bin"
    prepare_token_file([f["text"]], f["tokens"], num_threads=1)
    tokens = f["tokens"].read_bytes()
    (root / "cut.bin").write_bytes(tokens[:len(tokens) // 2 + 1])
    shutil.copy(str(f["tokens"]) + ".json", root / "cut.bin.json")
    shutil.copy(f["tokens"], root / "badsummary.bin")
    (root / "badsummary.bin.json").write_text("{tokens: many}")
    f["cut_tokens"], f["bad_summary"] = root / "cut.bin", root / "badsummary.bin"

    # Classification tables.
    rows = "".join(f"{'spam' if i % 2 else 'ham'},message number {i}\n" for i in range(20))
    tables = {"cls_csv": "Label,Text\n" + rows,
              "one_class": "Label,Text\n" + "".join(f"ham,message {i}\n" for i in range(20)),
              "wrong_columns": "Lbl,Txt\nham,hi\n", "header_only": "Label,Text\n",
              "empty_text_row": "Label,Text\nham,\nspam,x\n", "empty_csv": ""}
    for name, content in tables.items():
        (root / f"{name}.csv").write_text(content)
        f[name] = root / f"{name}.csv"
    (root / "latin1.csv").write_bytes("Label,Text\nham,caf\xe9\nspam,ol\xe9\n".encode("latin-1"))
    f["latin1_csv"] = root / "latin1.csv"

    # Instruction data and responses.
    entries = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(20)]
    json_files = {"instr": entries, "instr_dict": {"instruction": "x"}, "instr_no_output": [{"instruction": "x"}],
                  "instr_number": [{"instruction": "x", "output": 3}], "instr_empty": [],
                  "instr_one": entries[:1],
                  "resp": [{**e, "model_response": e["output"]} for e in entries[:3]],
                  "resp_dict": {"a": 1}, "resp_no_key": entries[:2], "resp_numbers": [1, 2],
                  "resp_empty": []}
    for name, content in json_files.items():
        (root / f"{name}.json").write_text(json.dumps(content))
        f[name] = root / f"{name}.json"
    for name, content in (("instr_broken", b"{not json"), ("resp_broken", b"[{]"),
                          ("instr_latin1", '[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))):
        (root / f"{name}.json").write_bytes(content)
        f[name] = root / f"{name}.json"
    (root / "instr_broken.jsonl").write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    f["instr_broken_jsonl"] = root / "instr_broken.jsonl"

    # A training run of one step, and copies with damaged run files.
    run = root / "run"
    assert main(["pretrain", *SHAPE, *QUIET, "--text", str(f["text"]), "--batch-size", "2",
                 "--eval-batches", "1", "--out", str(run)]) == 0
    f["run"] = run
    for name, content in (("run_garbage_state", b"garbage" * 10), ("run_empty_state", b"")):
        shutil.copytree(run, root / name)
        for state in (root / name).rglob("training_state.pt"):
            state.write_bytes(content)
        f[name] = root / name
    shutil.copytree(run, root / "run_bad_config")
    (root / "run_bad_config" / "train_config.json").write_text("{epochs: ")
    f["run_bad_config"] = root / "run_bad_config"
    return SimpleNamespace(**{k: str(v) for k, v in f.items()})


def row(id: str, argv: list[str], expect: str):
    return pytest.param(argv, expect, id=id)


CASES = [
    # --- pretrain: training settings (each TrainConfig flag) ---
    row("batch-size-0", [*PRETRAIN, "--batch-size", "0"], "--batch-size"),
    row("grad-accum-0", [*PRETRAIN, "--grad-accum", "0"], "--grad-accum"),
    row("eval-every-0", [*PRETRAIN, "--eval-every", "0"], "--eval-every"),
    row("max-steps-negative", [*PRETRAIN, "--max-steps", "-5"], "--max-steps"),
    row("epochs-0", [*PRETRAIN, "--epochs", "0"], "--epochs"),
    row("lr-inf", [*PRETRAIN, "--lr", "inf"], "--lr: must be a finite number"),
    row("lr-nan", [*PRETRAIN, "--lr", "nan"], "--lr: must be a finite number"),
    row("lr-negative", [*PRETRAIN, "--lr", "-1"], "--lr: must be a number above 0"),
    row("lr-not-a-number", [*PRETRAIN, "--lr", "fast"], "--lr: must be a number"),
    row("min-lr-above-lr", [*PRETRAIN, "--min-lr", "1"], "--min-lr must be a finite number from 0 to --lr"),
    row("weight-decay-negative", [*PRETRAIN, "--weight-decay", "-1"], "--weight-decay"),
    row("betas-out-of-range", [*PRETRAIN, "--betas", "1.5", "0.9"], "--betas must be two numbers in [0, 1)"),
    row("grad-clip-negative", [*PRETRAIN, "--grad-clip", "-1"], "--grad-clip"),
    row("warmup-negative", [*PRETRAIN, "--warmup-steps", "-1"], "--warmup-steps"),
    row("keep-last-negative", [*PRETRAIN, "--keep-last", "-1"], "--keep-last"),
    row("num-workers-negative", [*PRETRAIN, "--num-workers", "-1"], "--num-workers"),
    row("save-every-0", [*PRETRAIN, "--save-every", "0"], "--save-every"),
    row("eval-batches-0", [*PRETRAIN, "--eval-batches", "0"], "--eval-batches"),
    row("stop-after-0", [*PRETRAIN, "--stop-after", "0"], "--stop-after"),
    row("max-tokens-0", [*PRETRAIN, "--max-tokens", "0"], "--max-tokens"),
    row("seed-negative", [*PRETRAIN, "--seed", "-1"], "--seed: must be a whole number from 0"),
    row("precision-unknown", [*PRETRAIN, "--precision", "fp8"], "invalid choice: 'fp8'"),
    row("device-unknown", [*PRETRAIN, "--device", "toaster"], "'toaster' is not a device"),
    row("device-cpu-index", [*PRETRAIN, "--device", "cpu:3"], "the CPU is one device"),
    # --- pretrain: data and windows ---
    row("train-ratio-above-1", [*PRETRAIN, "--train-ratio", "1.5"], "--train-ratio: must be a number in (0, 1]"),
    row("train-ratio-0", [*PRETRAIN, "--train-ratio", "0"], "--train-ratio: must be a number in (0, 1]"),
    row("train-ratio-nan", [*PRETRAIN, "--train-ratio", "nan"], "--train-ratio: must be a finite number"),
    row("stride-0", [*PRETRAIN, "--stride", "0"], "--stride: must be a positive integer"),
    row("stride-negative", [*PRETRAIN, "--stride", "-3"], "--stride: must be a positive integer"),
    row("data-is-a-text-file", ["pretrain", *SHAPE, *QUIET, "--data", "{text}", "--out", "{out}"],
        "is not a token file made by `gptforge prepare`"),
    row("data-missing", ["pretrain", *SHAPE, *QUIET, "--data", "{out}.bin", "--out", "{out}"],
        "not found: make one with `gptforge prepare`"),
    row("data-cut-short", ["pretrain", *SHAPE, *QUIET, "--data", "{cut_tokens}", "--out", "{out}"],
        "the file was cut off"),
    row("data-summary-garbage", ["pretrain", *SHAPE, *QUIET, "--data", "{bad_summary}", "--out", "{out}"],
        "badsummary.bin.json is not valid JSON"),
    row("data-is-a-directory", ["pretrain", *SHAPE, *QUIET, "--data", "{empty_dir}", "--out", "{out}"],
        "is a directory, not a token file"),
    row("text-and-data", [*PRETRAIN, "--data", "{tokens}"], "not both"),
    row("text-token-file", ["pretrain", *SHAPE, *QUIET, "--text", "{tokens}", "--out", "{out}"],
        "is a token file made by `gptforge prepare`, not text: train on it with `gptforge pretrain --data"),
    row("text-latin1", ["pretrain", *SHAPE, *QUIET, "--text", "{latin1}", "--out", "{out}"],
        "latin1.txt is not UTF-8 text: the byte at offset 3"),
    row("text-binary", ["pretrain", *SHAPE, *QUIET, "--text", "{binary}", "--out", "{out}"],
        "binary.txt holds NUL bytes"),
    row("text-empty-directory", ["pretrain", *SHAPE, *QUIET, "--text", "{empty_dir}", "--out", "{out}"],
        "empty_dir' holds no files"),
    row("text-glob-no-match", ["pretrain", *SHAPE, *QUIET, "--text", "{empty_dir}/*.txt", "--out", "{out}"],
        "no file matches"),
    row("text-glob-only-directories", ["pretrain", *SHAPE, *QUIET, "--text", "{only_dirs}/*", "--out", "{out}"],
        "matches only directories"),
    row("text-empty-file", ["pretrain", *SHAPE, *QUIET, "--text", "{empty}", "--out", "{out}"],
        "hold no text to train on"),
    row("text-blank-file", ["pretrain", *SHAPE, *QUIET, "--text", "{blank}", "--out", "{out}"],
        "hold no text to train on"),
    row("text-too-short-to-train", ["pretrain", *SHAPE, *QUIET, "--text", "{short}", "--out", "{out}"],
        "that needs 33 (32 input tokens plus 1 target)"),
    row("validation-split-too-short", [*PRETRAIN, "--train-ratio", "0.999"],
        "the validation split of"),
    row("sample-prompt-empty", [*PRETRAIN, "--sample-prompt", " "], "--sample-prompt is empty"),
    # --- pretrain: the model's shape and memory ---
    row("dropout-1", [*PRETRAIN, "--dropout", "1"], "--dropout: must be a dropout rate in [0, 1)"),
    row("dropout-nan", [*PRETRAIN, "--dropout", "nan"], "--dropout: must be a finite number"),
    row("heads-do-not-divide", ["pretrain", "--n-layers", "2", "--emb-dim", "32", "--n-heads", "3", *QUIET,
                                "--text", "{text}", "--out", "{out}"], "must be divisible by n_heads"),
    row("context-length-0", ["pretrain", "--context-length", "0", *QUIET], "--context-length: must be a positive"),
    row("context-length-huge", ["pretrain", "--n-layers", "2", "--emb-dim", "32", "--n-heads", "2",
                                "--context-length", "100000000000", *QUIET, "--out", "{out}"],
        "context_length must be a whole number from 1 to 1,048,576"),
    row("layers-huge", ["pretrain", "--n-layers", "100000", "--emb-dim", "32", "--n-heads", "2", *QUIET,
                        "--out", "{out}"], "n_layers must be a whole number from 1 to 1,024"),
    row("model-too-big-for-memory", ["pretrain", "--n-layers", "1024", "--emb-dim", "8192", "--n-heads", "8",
                                     *QUIET, "--out", "{out}"], "to train with AdamW"),
    row("shape-of-a-loaded-model", ["pretrain", "--model", "{m}", "--n-layers", "3", *QUIET, "--out", "{out}"],
        "shape a new model"),
    row("context-of-a-loaded-model", ["pretrain", "--model", "{m}", "--context-length", "64", *QUIET,
                                      "--out", "{out}"], "the loaded model"),
    row("preset-unknown", ["pretrain", "--model", "gpt9", *QUIET, "--out", "{out}"], "gpt9"),
    # --- pretrain: run directories ---
    row("out-holds-a-run", [*PRETRAIN[:-1], "{run}"], "already holds a run"),
    row("out-holds-a-model", [*PRETRAIN[:-1], "{m}"], "holds a model already"),
    row("out-is-a-file", [*PRETRAIN[:-1], "{text}"], "is a file, not a directory"),
    row("resume-not-a-run", ["pretrain", "--resume", "{m}", "--no-progress"], "holds no train_config.json"),
    row("resume-missing", ["pretrain", "--resume", "{out}", "--no-progress"], "is not a model checkpoint"),
    row("resume-with-new-data", ["pretrain", "--resume", "{run}", "--text", "{text}", "--no-progress"],
        "--text describes a new run"),
    row("resume-train-config-garbage", ["pretrain", "--resume", "{run_bad_config}", "--no-progress"],
        "train_config.json is not valid JSON"),
    row("resume-training-state-garbage", ["pretrain", "--resume", "{run_garbage_state}", "--no-progress"],
        "training_state.pt"),
    row("resume-training-state-empty", ["pretrain", "--resume", "{run_empty_state}", "--no-progress"],
        "training_state.pt"),
    # --- damaged model directories (through several commands) ---
    row("weights-truncated", ["generate", "--model", "{truncated}", "--prompt", "hi"], "model.safetensors"),
    row("weights-empty", ["pretrain", "--model", "{empty_weights}", *QUIET, "--out", "{out}"], "model.safetensors"),
    row("weights-garbage", ["evaluate", "--model", "{garbage_weights}", "--text", "{text}"], "model.safetensors"),
    row("weights-nan", ["generate", "--model", "{nan_weights}", "--prompt", "hi"], "NaN"),
    # With the sha256 check off, the parse itself must still refuse the damaged file.
    row("weights-truncated-unverified", ["--no-verify", "generate", "--model", "{truncated}", "--prompt", "hi"],
        "is not a readable safetensors file"),
    row("weights-empty-unverified", ["--no-verify", "evaluate", "--model", "{empty_weights}", "--text", "{text}"],
        "is not a readable safetensors file"),
    row("weights-garbage-unverified", ["--no-verify", "ask", "hi", "--model", "{garbage_weights}"],
        "is not a readable safetensors file"),
    row("meta-without-model", ["generate", "--model", "{no_model_key}", "--prompt", "hi"], "no 'model' object"),
    row("meta-string-n-layers", ["info", "{string_layers}"], "n_layers must be a whole number"),
    row("meta-is-a-list", ["generate", "--model", "{list_meta}", "--prompt", "hi"], "holds a list"),
    row("meta-broken-json", ["ask", "hi", "--model", "{broken_meta}"], "is not valid JSON"),
    row("meta-does-not-fit-weights", ["generate", "--model", "{misfit}", "--prompt", "hi"],
        "does not fit its config"),
    row("meta-huge-context", ["generate", "--model", "{huge_context}", "--prompt", "hi"],
        "context_length must be a whole number from 1 to"),
    row("meta-text-dropout", ["generate", "--model", "{text_dropout}", "--prompt", "hi"],
        "drop_rate must be a number in [0, 1)"),
    row("model-is-an-empty-directory", ["generate", "--model", "{empty_dir}", "--prompt", "hi"],
        "the directory is empty"),
    row("model-is-a-text-file", ["generate", "--model", "{text}", "--prompt", "hi"], "is not a model checkpoint"),
    # --- generate: sampling ---
    row("max-new-tokens-0", ["generate", "--model", "{m}", "--prompt", "hi", "--max-new-tokens", "0"],
        "--max-new-tokens: must be a positive integer"),
    row("temperature-negative", ["generate", "--model", "{m}", "--prompt", "hi", "--temperature", "-1"],
        "temperature must be >= 0"),
    row("temperature-nan", ["generate", "--model", "{m}", "--prompt", "hi", "--temperature", "nan"],
        "--temperature must be a finite number"),
    row("temperature-inf", ["generate", "--model", "{m}", "--prompt", "hi", "--temperature", "inf"],
        "--temperature must be a finite number"),
    row("top-k-0", ["generate", "--model", "{m}", "--prompt", "hi", "--top-k", "0"], "top_k must be a positive"),
    row("top-p-0", ["generate", "--model", "{m}", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    row("top-p-above-1", ["generate", "--model", "{m}", "--prompt", "hi", "--top-p", "2"], "top_p must be in"),
    row("seed-too-big", ["generate", "--model", "{m}", "--prompt", "hi", "--seed", "99999999999999999999"],
        "--seed: must be a whole number from 0 to 4294967295"),
    row("prompt-empty", ["generate", "--model", "{m}", "--prompt", ""], "the prompt is empty"),
    row("prompt-longer-than-context", ["generate", "--model", "{m}", "--prompt", "word " * 100], "context length"),
    row("generate-device-unknown", ["generate", "--model", "{m}", "--prompt", "hi", "--device", "toaster"],
        "'toaster' is not a device"),
    row("device-meta", ["generate", "--model", "{m}", "--prompt", "hi", "--device", "meta"],
        "gptforge runs on cpu, cuda, cuda:N or mps"),
    row("quantize-unknown", ["generate", "--model", "{m}", "--prompt", "hi", "--quantize", "int4"],
        "invalid choice: 'int4'"),
    # --- info, download, convert, merge-lora ---
    row("info-unknown", ["info", "gpt5"], "gpt5"),
    row("download-unknown", ["download", "gpt9"], "unknown download 'gpt9'"),
    row("download-format-unknown", ["download", "the-verdict", "--format", "tf"], "invalid choice: 'tf'"),
    row("convert-format-unknown", ["convert", "{m}", "{out}", "--to", "onnx"], "invalid choice: 'onnx'"),
    row("convert-source-missing", ["convert", "{out}-none", "{out}"], "cannot load"),
    row("convert-out-is-a-file", ["convert", "{m}", "{text}"], "is a file, not a directory"),
    row("convert-onto-itself", ["convert", "{m}", "{m}"], "is the model being read"),
    row("merge-lora-not-lora", ["merge-lora", "{m}", "{out}"], "is not a LoRA run"),
    # --- prepare and evaluate ---
    row("prepare-latin1", ["prepare", "{latin1}", "--out", "{out}.bin"], "is not UTF-8 text"),
    row("prepare-empty-directory", ["prepare", "{empty_dir}", "--out", "{out}.bin"], "holds no files"),
    row("prepare-glob-no-match", ["prepare", "{empty_dir}/*.txt", "--out", "{out}.bin"], "no file matches"),
    row("prepare-threads-0", ["prepare", "{text}", "--out", "{out}.bin", "--threads", "0"],
        "--threads: must be a positive integer"),
    row("prepare-out-is-a-directory", ["prepare", "{text}", "--out", "{empty_dir}"], "is an existing directory"),
    row("prepare-out-below-a-file", ["prepare", "{text}", "--out", "{text}/tokens.bin"], "is a file"),
    row("prepare-out-is-an-input", ["prepare", "{text}", "--out", "{text}"], "is one of the inputs"),
    row("evaluate-context-0", ["evaluate", "--model", "{m}", "--text", "{text}", "--context-length", "0"],
        "--context-length: must be a positive integer"),
    row("evaluate-context-above-model", ["evaluate", "--model", "{m}", "--text", "{text}",
                                         "--context-length", "1000"], "to the model's context length (32)"),
    row("evaluate-batch-0", ["evaluate", "--model", "{m}", "--text", "{text}", "--batch-size", "0"], "--batch-size"),
    row("evaluate-latin1", ["evaluate", "--model", "{m}", "--text", "{latin1}"], "latin1.txt is not UTF-8"),
    row("evaluate-too-short", ["evaluate", "--model", "{m}", "--text", "{short}"], "short.txt has"),
    row("evaluate-empty", ["evaluate", "--model", "{m}", "--text", "{empty}"], "empty.txt is empty"),
    row("evaluate-a-classifier", ["evaluate", "--model", "{cls}", "--text", "{text}"], "is a classifier"),
    # --- a classifier where a language model is needed ---
    row("generate-with-a-classifier", ["generate", "--model", "{cls}", "--prompt", "hi"], "is a classifier"),
    row("ask-a-classifier", ["ask", "hi", "--model", "{cls}"], "is a classifier"),
    row("pretrain-a-classifier", ["pretrain", "--model", "{cls}", *QUIET, "--text", "{text}", "--out", "{out}"],
        "is a classifier"),
    row("instruct-tune-a-classifier", ["finetune", "instruct", "--model", "{cls}", *QUIET, "--data", "{instr}",
                                       "--out", "{out}"], "is a classifier"),
    row("responses-scored-by-a-classifier", ["evaluate-responses", "{resp}", "--model", "{cls}"],
        "is a classifier"),
    # --- finetune classify ---
    row("classify-data-missing", [*CLASSIFY, "--data", "{out}.csv"], "no table at"),
    row("classify-data-latin1", [*CLASSIFY, "--data", "{latin1_csv}"], "latin1.csv is not UTF-8 text"),
    row("classify-data-directory", [*CLASSIFY, "--data", "{empty_dir}"], "is a directory"),
    row("classify-one-class", [*CLASSIFY, "--data", "{one_class}"],
        "one_class.csv: the training data has only one class"),
    row("classify-wrong-columns", [*CLASSIFY, "--data", "{wrong_columns}"], "has no column 'Text'"),
    row("classify-header-only", [*CLASSIFY, "--data", "{header_only}"], "has a header but no rows"),
    row("classify-empty-text", [*CLASSIFY, "--data", "{empty_text_row}"], "row 1 has an empty text"),
    row("classify-empty-file", [*CLASSIFY, "--data", "{empty_csv}"], "empty_csv.csv is empty"),
    row("classify-same-columns", [*CLASSIFY, "--data", "{cls_csv}", "--text-column", "Label"],
        "both name 'Label'"),
    row("classify-max-length-above-context", [*CLASSIFY, "--data", "{cls_csv}", "--max-length", "100"],
        "max_length must be between 1 and the model's context length"),
    row("classify-dropout-2", [*CLASSIFY, "--data", "{cls_csv}", "--dropout", "2"], "--dropout"),
    row("classify-lora-alpha-0", [*CLASSIFY, "--data", "{cls_csv}", "--trainable", "lora", "--lora-alpha", "0"],
        "--lora-alpha: must be a number above 0"),
    row("classify-lora-rank-0", [*CLASSIFY, "--data", "{cls_csv}", "--lora-rank", "0"], "--lora-rank"),
    row("classify-split-seed-negative", [*CLASSIFY, "--data", "{cls_csv}", "--split-seed", "-1"], "--split-seed"),
    row("classify-batch-bigger-than-data", [*CLASSIFY, "--data", "{cls_csv}", "--batch-size", "100"],
        "fewer than one batch of 100"),
    row("classify-init-unknown", ["finetune", "classify", "--init", "gpt9", *QUIET, "--data", "{cls_csv}",
                                  "--out", "{out}"], "unknown model preset 'gpt9'"),
    row("classify-model-and-init", [*CLASSIFY, "--model", "{m}", "--data", "{cls_csv}"], "not both"),
    row("classify-shape-without-init", ["finetune", "classify", "--model", "{m}", "--n-layers", "3", *QUIET,
                                        "--data", "{cls_csv}", "--out", "{out}"], "use them with --init"),
    row("classify-data-and-train", [*CLASSIFY, "--data", "{cls_csv}", "--train", "{cls_csv}"], "not both"),
    row("classify-val-without-train", [*CLASSIFY, "--val", "{cls_csv}"], "--val and --test need --train"),
    row("classify-too-big-for-memory", ["finetune", "classify", "--init", "gpt2-small", "--n-layers", "1024",
                                        "--emb-dim", "8192", "--n-heads", "8", *QUIET, "--data", "{cls_csv}",
                                        "--out", "{out}"], "GiB"),
    row("classify-resume-an-lm", ["finetune", "classify", "--resume", "{m}", "--no-progress"], "not a classifier"),
    row("classify-resume-with-new-data", ["finetune", "classify", "--resume", "{run}", "--data", "{cls_csv}",
                                          "--no-progress"], "--data describes a new run"),
    # --- classify ---
    row("classify-nothing", ["classify", "--model", "{cls}"], "nothing to classify"),
    row("classify-empty-text-arg", ["classify", "--model", "{cls}", ""], "text 1 is empty"),
    row("classify-file-missing", ["classify", "--model", "{cls}", "--file", "{out}.csv"], "no table at"),
    row("classify-file-latin1", ["classify", "--model", "{cls}", "--file", "{latin1_csv}"], "is not UTF-8 text"),
    row("classify-file-no-column", ["classify", "--model", "{cls}", "--file", "{wrong_columns}"], "--text-column"),
    row("classify-out-without-file", ["classify", "--model", "{cls}", "--out", "{out}.csv", "hi"], "give --file too"),
    row("classify-out-is-a-directory", ["classify", "--model", "{cls}", "--file", "{cls_csv}",
                                        "--out", "{empty_dir}"], "is an existing directory"),
    row("classify-out-is-the-file", ["classify", "--model", "{cls}", "--file", "{cls_csv}", "--out", "{cls_csv}"],
        "is the --file being read"),
    row("classify-with-an-lm", ["classify", "--model", "{m}", "hi"], "not a classifier"),
    row("classify-batch-0", ["classify", "--model", "{cls}", "--batch-size", "0", "hi"], "--batch-size"),
    # --- finetune instruct ---
    row("instruct-data-missing", [*INSTRUCT, "--data", "{out}.json"], "no instruction data at"),
    row("instruct-data-directory", [*INSTRUCT, "--data", "{empty_dir}"], "is a directory"),
    row("instruct-data-broken-json", [*INSTRUCT, "--data", "{instr_broken}"], "instr_broken.json: not valid JSON"),
    row("instruct-data-broken-jsonl", [*INSTRUCT, "--data", "{instr_broken_jsonl}"], "line 2: not valid JSON"),
    row("instruct-data-latin1", [*INSTRUCT, "--data", "{instr_latin1}"], "instr_latin1.json is not UTF-8"),
    row("instruct-data-not-a-list", [*INSTRUCT, "--data", "{instr_dict}"], "expected a list of entries"),
    row("instruct-data-no-output", [*INSTRUCT, "--data", "{instr_no_output}"], "entry 0 has no 'output' key"),
    row("instruct-data-number-output", [*INSTRUCT, "--data", "{instr_number}"], "it must be text"),
    row("instruct-data-empty", [*INSTRUCT, "--data", "{instr_empty}"], "instr_empty.json holds no entries"),
    row("instruct-data-one-entry", [*INSTRUCT, "--data", "{instr_one}"], "its training split"),
    row("instruct-max-test-negative", [*INSTRUCT, "--data", "{instr}", "--max-test", "-1"], "--max-test"),
    row("instruct-lora-alpha-alone", [*INSTRUCT, "--data", "{instr}", "--lora-alpha", "4"],
        "--lora-alpha needs --lora-rank"),
    row("instruct-lora-alpha-inf", [*INSTRUCT, "--data", "{instr}", "--lora-rank", "2", "--lora-alpha", "inf"],
        "--lora-alpha: must be a finite number"),
    row("instruct-dropout-1", [*INSTRUCT, "--data", "{instr}", "--dropout", "1"], "--dropout"),
    row("instruct-batch-bigger-than-data", [*INSTRUCT, "--data", "{instr}", "--batch-size", "100"],
        "fewer than one batch of 100"),
    row("instruct-template-unknown", [*INSTRUCT, "--data", "{instr}", "--template", "chatml"],
        "invalid choice: 'chatml'"),
    row("instruct-resume-not-instruct", ["finetune", "instruct", "--resume", "{run}", "--no-progress"],
        "is not an instruction fine-tuning run"),
    row("instruct-resume-with-new-model", ["finetune", "instruct", "--resume", "{run}", "--model", "{m}",
                                           "--no-progress"], "--model describes a new run"),
    # --- chat and ask ---
    row("chat-history-negative", ["chat", "--model", "{m}", "--history", "-1"], "--history"),
    row("chat-temperature-nan", ["chat", "--model", "{m}", "--temperature", "nan"], "--temperature"),
    row("chat-model-missing", ["chat", "--model", "{out}"], "cannot load"),
    row("ask-empty-instruction", ["ask", " ", "--model", "{m}"], "the instruction is empty"),
    row("ask-top-k-0", ["ask", "hi", "--model", "{m}", "--top-k", "0"], "top_k must be a positive"),
    row("ask-device-unknown", ["ask", "hi", "--model", "{m}", "--device", "toaster"], "is not a device"),
    # --- evaluate-responses ---
    row("responses-missing", ["evaluate-responses", "{out}.json"], "no responses file at"),
    row("responses-broken-json", ["evaluate-responses", "{resp_broken}"], "resp_broken.json is not valid JSON"),
    row("responses-not-a-list", ["evaluate-responses", "{resp_dict}"], "must hold a JSON list"),
    row("responses-not-objects", ["evaluate-responses", "{resp_numbers}"], "entry 0 is an int"),
    row("responses-no-response-key", ["evaluate-responses", "{resp_no_key}"], "resp_no_key.json: entry 0 has no"),
    row("responses-empty", ["evaluate-responses", "{resp_empty}"], "holds no entries"),
    row("responses-out-is-a-directory", ["evaluate-responses", "{resp}", "--out", "{empty_dir}"],
        "is an existing directory"),
    row("judge-without-model", ["evaluate-responses", "{resp}", "--judge-url", "http://127.0.0.1:9"],
        "needs both --judge-url and --judge-model"),
    row("judge-url-not-a-url", ["evaluate-responses", "{resp}", "--judge-url", "localhost", "--judge-model", "x"],
        "--judge-url: must be an http:// or https:// URL"),
    row("judge-timeout-negative", ["evaluate-responses", "{resp}", "--judge-timeout", "-1"], "--judge-timeout"),
    row("judge-retries-negative", ["evaluate-responses", "{resp}", "--judge-retries", "-1"], "--judge-retries"),
    row("judge-backoff-nan", ["evaluate-responses", "{resp}", "--judge-backoff", "nan"], "--judge-backoff"),
    row("judge-seed-negative", ["evaluate-responses", "{resp}", "--judge-seed", "-1"], "--judge-seed"),
    row("responses-batch-0", ["evaluate-responses", "{resp}", "--model", "{m}", "--batch-size", "0"], "--batch-size"),
    # --- serve (its checks run before anything loads or listens) ---
    row("serve-port-too-big", ["serve", "--model", "{m}", "--port", "99999"], "--port"),
    row("serve-max-active-0", ["serve", "--model", "{m}", "--max-active", "0"], "--max-active"),
]


def run_cli(argv: list[str]) -> int:
    """`main(argv)`'s exit status; argparse's refusals exit with SystemExit(2)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("argv, expect", CASES)
def test_bad_input_is_one_clear_error(argv, expect, files, tmp_path, capsys, monkeypatch):
    # `--no-verify` sets GPTFORGE_NO_VERIFY in os.environ for the process. Setting it here first
    # makes monkeypatch restore the variable as it was (normally unset) after each row.
    monkeypatch.setenv("GPTFORGE_NO_VERIFY", "0")
    monkeypatch.delenv("GPTFORGE_NO_VERIFY")
    values = {**vars(files), "out": str(tmp_path / "out")}
    argv = [arg.format(**values) for arg in argv]
    capsys.readouterr()
    status = run_cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert status == 2, err
    assert "error:" in err
    assert expect in err, err


def test_no_row_leaves_verification_off():
    import os

    assert os.environ.get("GPTFORGE_NO_VERIFY") != "1"


def test_the_table_is_large():
    """The table covers every command; the report quotes how many bad inputs it tries."""
    commands = {next(a for a in p.values[0] if not a.startswith("-")) for p in CASES}
    assert {"pretrain", "generate", "info", "prepare", "evaluate", "download", "convert", "merge-lora",
            "finetune", "classify", "chat", "ask", "evaluate-responses", "serve"} <= commands
    assert len(CASES) >= 60


def test_an_allocation_failure_says_how_much_memory_the_model_needs(files, tmp_path, capsys, monkeypatch):
    """A model that passes the memory estimate but still cannot be allocated (another process
    took the memory meanwhile) gets the same message, not the allocator's."""
    import gptforge.pretrain

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(gptforge.pretrain, "GPTModel", refuse)
    status = run_cli(["pretrain", *SHAPE, *QUIET, "--text", files.text, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "to train with AdamW" in err and "DefaultCPUAllocator" not in err


@pytest.mark.parametrize("cfg", [dict(), dict(qkv_bias=False, tie_weights=False),
                                 dict(vocab_size=99, context_length=17, emb_dim=64, n_heads=2, n_layers=3)])
def test_the_memory_estimate_counts_the_parameters_exactly(cfg):
    config = GPTConfig(**cfg)
    with torch.device("meta"):
        model = GPTModel(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
