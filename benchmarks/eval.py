"""`gptforge eval` against lm-evaluation-harness's Hugging Face backend: examples per second.

Both score the same multiple-choice task (a jsonl generated here: `--items` questions of
four choices, {"query", "choices", "gold"} lines, and the same task as lm-eval YAML) with
the same model: random weights at GPT-2 small's shape, saved by gptforge and converted by
`gptforge convert --to hf`, which both then load. Each engine runs in its own fresh
process with the same thread count and batch size, the engines alternating round by round;
the time counted is the evaluation only (after the model is loaded), and the accuracies must
agree.

    PYTHONPATH=src GPTFORGE_DATA_MIRROR=../shared/data python benchmarks/eval.py --items 300 --threads 2 --rounds 3

Needs lm-eval with its hf extra (`pip install 'lm-eval[hf]'`) and, while `convert --to hf`
writes no GPT-2 tokenizer files, GPT-2's vocabulary from gptforge's download registry.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mib, run_json

ENGINES = ["gptforge", "lm-eval"]
WORDS = ("the a of to and in is was that for it with as his on be at by had not are but from or "
         "have an they which one you were all her she there would their we him been has when who "
         "will no more if out so said what up its about than into them can only other new some "
         "could time these two may then do first any my now such like our over man me even most "
         "made after also did many before must through back years where much your way well down "
         "should because each just those people how too little state good very make world still "
         "own see men work long get here between both life being under never day same another "
         "know while last might us great old year off come since against go came right used take").split()


def make_task(folder: Path, items: int, seed: int = 0) -> Path:
    """`items` random questions of four choices as a jsonl, and the same task as lm-eval YAML."""
    rng = random.Random(seed)
    lines = []
    for _ in range(items):
        query = " ".join(rng.choices(WORDS, k=rng.randint(12, 30))).capitalize()
        choices = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(4)]
        lines.append(json.dumps({"query": query, "choices": choices, "gold": rng.randrange(4)}))
    data = folder / "bench_mc.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "bench_mc.yaml").write_text(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
""", encoding="utf-8")
    return data


def make_model(folder: Path) -> Path:
    """Random gpt2-small weights saved by gptforge, converted to Hugging Face's format, with
    GPT-2's tokenizer files beside them."""
    import torch

    from gptforge import GPTModel
    from gptforge.checkpoint import save_model
    from gptforge.cli import main as gptforge_main
    from gptforge.config import GPTConfig

    torch.manual_seed(123)
    save_model(GPTModel(GPTConfig.from_name("gpt2-small")), folder / "gptforge")
    hf = folder / "hf"
    if gptforge_main(["convert", str(folder / "gptforge"), str(hf), "--to", "hf"]) != 0:
        raise SystemExit("gptforge convert --to hf failed")
    if not (hf / "tokenizer.json").exists():  # convert does not write GPT-2's yet
        script = Path(__file__).resolve().parents[1] / "scripts" / "make_tokenizer_fixtures.py"
        spec = importlib.util.spec_from_file_location("make_tokenizer_fixtures", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for path in module.build_fixture("gpt2", folder / "tokenizer").iterdir():
            shutil.copy(path, hf / path.name)
    return hf


def worker(engine: str, model_dir: Path, task_dir: Path, threads: int, batch_size: int) -> dict:
    """Evaluate in this process; the model is loaded before the clock starts."""
    import os

    import torch

    torch.set_num_threads(threads)
    data = task_dir / "bench_mc.jsonl"
    items = sum(1 for line in data.read_text().splitlines() if line.strip())
    if engine == "gptforge":
        from gptforge.evaluation import evaluate_tasks
        from gptforge.loader import load, tokenizer_for

        model, tokenizer = load(model_dir, dtype=torch.float32), tokenizer_for(model_dir)
        start = time.perf_counter()
        run = evaluate_tasks(model, tokenizer, [str(data)], batch_size=batch_size)
        seconds = time.perf_counter() - start
        acc = next(r for r in run.results if r.metric == "acc").value
    else:
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size)
        manager = TaskManager(include_path=str(task_dir))
        start = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=manager, batch_size=batch_size)
        seconds = time.perf_counter() - start
        acc = out["results"]["bench_mc"]["acc,none"]
    return {"engine": engine, "items": items, "seconds": seconds, "items_per_s": items / seconds,
            "acc": acc, "threads": threads, "batch_size": batch_size, "peak_rss_mib": round(peak_rss_mib())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=300, help="questions in the task (default 300)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads in each process (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each engine, alternating (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="both engines' batch size (default 16)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the model and task, kept (default: a temporary one)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--task-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.task_dir, args.threads, args.batch_size)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="gptforge-eval-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(work) if not (work / "hf" / "config.json").exists() else work / "hf"
    task_dir = work / "task"
    task_dir.mkdir(exist_ok=True)
    make_task(task_dir, args.items)
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for round_ in range(args.rounds):  # alternate, each round starting with the other engine
        for engine in ENGINES if round_ % 2 == 0 else ENGINES[::-1]:
            record = run_json(__file__, "--worker", engine, "--model-dir", str(model_dir),
                              "--task-dir", str(task_dir), "--threads", str(args.threads),
                              "--batch-size", str(args.batch_size))
            runs[engine].append(record)
            print(json.dumps(record), file=sys.stderr)
    medians = {engine: statistics.median(r["items_per_s"] for r in records) for engine, records in runs.items()}
    print(f"{args.items} items x 4 choices, gpt2-small shape (random weights, float32), "
          f"{args.threads} thread(s) in each process, batch size {args.batch_size}, {args.rounds} rounds "
          f"alternating, each run in its own process\n")
    print("| engine | items/s (median) | runs | accuracy | peak RSS (MiB) |")
    print("|---|--:|---|--:|--:|")
    for engine, records in runs.items():
        each = ", ".join(f"{r['items_per_s']:.1f}" for r in records)
        print(f"| {engine} | {medians[engine]:.1f} | {each} | {records[0]['acc']:.4f} | "
              f"{max(r['peak_rss_mib'] for r in records)} |")
    accuracies = {r["acc"] for records in runs.values() for r in records}
    agree = max(accuracies) - min(accuracies) < 1e-9
    print(f"\ngptforge eval / lm-eval hf: {medians['gptforge'] / medians['lm-eval']:.2f}x items/s (medians); "
          f"accuracies {'agree' if agree else 'DIFFER'}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
