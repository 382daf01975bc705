"""Instruction fine-tuning speed and memory: full fine-tuning against LoRA, and what sorting saves.

A randomly initialised gpt2-small (context 1024) is trained on real batches of 8 entries of
instruction-data.json (the book's collate: each batch padded to its own longest example,
so sequences are short), through the shared Trainer, for a few steps:

- tokens/s (input tokens, padding included, as the Trainer counts them) over the steps
  after the first, for full fine-tuning and for LoRA (rank 16, alpha 16);
- peak RSS of each configuration, each in its own fresh process, and the bytes of
  parameters + gradients + AdamW state they need.

Then, for the 110 test entries, what sorting by length saves where the result does not
depend on batch composition: padding and time of the reference-loss pass (batches of 8
in file order against sorted), and greedy generation one prompt at a time against
batches of equal-length prompts.

    python benchmarks/instruct.py --steps 4 [--gen-prompts 24 --gen-tokens 16] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _model(seed: int = 123):
    import torch

    from gptforge import GPTConfig, GPTModel

    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_name("gpt2-small", drop_rate=0.0))


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_worker(kind: str, steps: int, rank: int) -> dict:
    """Train `steps` steps (full or LoRA) in this process; return speed and memory."""
    from gptforge.finetune.instruct import (
        InstructionDataset,
        instruction_collate,
        instruction_loss,
        load_instruction_data,
        split_data,
    )
    from gptforge.finetune.lora import apply_lora, count_trainable
    from gptforge.training import TrainConfig, Trainer

    rss_start = _peak_rss_mib()
    model = _model()
    if kind == "lora":
        apply_lora(model, rank=rank, alpha=float(rank))
    trainable, total = count_trainable(model)
    rss_model = _peak_rss_mib()
    splits = split_data(load_instruction_data())
    records: list[dict] = []
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=5e-5, weight_decay=0.1,
                      eval_every=10 ** 9, eval_batches=1, keep_last=0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, InstructionDataset(splits.train), InstructionDataset(splits.val),
                          instruction_loss, cfg, out, save_model=lambda *a, **k: None,
                          collate_fn=instruction_collate(1024), on_eval=records.append)
        trainer.plot = lambda: None  # no matplotlib in the memory figure
        start = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - start
    # parameters (fp32) + gradients and two AdamW moments for every trainable one
    state_bytes = 4 * total + 3 * 4 * trainable
    return {
        "kind": kind, "steps": result.step, "trainable_params": trainable, "total_params": total,
        "tokens_per_s": records[-1]["tokens_per_s"],  # steps 2..N (the first is a warm-up)
        "tokens_seen": result.tokens_seen, "seconds": round(seconds, 1),
        "param_grad_adam_mib": round(state_bytes / 2 ** 20, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "rss_after_model_mib": round(rss_model, 1), "rss_at_start_mib": round(rss_start, 1),
    }


def sorting_worker(gen_prompts: int, gen_tokens: int) -> dict:
    """Reference-loss pass and generation with and without length sorting."""
    import torch
    import torch.nn.functional as F

    from gptforge.data import ResumableBatchSampler
    from gptforge.finetune.instruct import (
        IGNORE_INDEX,
        InstructionDataset,
        collate_instructions,
        generate_responses,
        length_sorted_batches,
        load_instruction_data,
        response_loss,
        split_data,
    )
    from gptforge.finetune.templates import get_template
    from gptforge.tokenizer import get_tokenizer

    model = _model().eval()
    test = split_data(load_instruction_data()).test
    items = InstructionDataset(test).items
    lengths = [len(ids) for ids, _ in items]
    file_order = [list(range(i, min(i + 8, len(items)))) for i in range(0, len(items), 8)]
    sorted_order = length_sorted_batches(lengths, 8)
    out: dict = {"test_entries": len(test), "unpadded_input_tokens": sum(lengths)}
    # For comparison, the padding of training batches as the shuffled sampler makes them.
    train = InstructionDataset(split_data(load_instruction_data()).train).items
    sampler = ResumableBatchSampler(len(train), 8, shuffle=True, drop_last=True, seed=123)
    batches = list(sampler)
    out["train_epoch"] = {
        "unpadded_input_tokens": sum(len(train[i][0]) for b in batches for i in b),
        "input_tokens": sum(len(b) * max(len(train[i][0]) for i in b) for b in batches),
        "input_tokens_if_padded_to_1024": len(batches) * 8 * 1024,
    }

    def loss_pass(batches) -> tuple[float, int, float]:
        total, count, padded = 0.0, 0, 0
        start = time.perf_counter()
        with torch.no_grad():
            for idx in batches:
                inputs, targets = collate_instructions([items[i] for i in idx], mask_prompt=True)
                logits = model(inputs)
                total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((targets != IGNORE_INDEX).sum())
                padded += inputs.numel()
        return total / count, padded, time.perf_counter() - start

    loss_pass(file_order[:1])  # warm-up
    file_loss, file_tokens, file_s = loss_pass(file_order)
    sorted_loss, sorted_tokens, sorted_s = loss_pass(sorted_order)
    library = response_loss(model, test)["mean_loss"]
    out["loss_pass"] = {"file_order": {"input_tokens": file_tokens, "seconds": round(file_s, 2)},
                        "sorted": {"input_tokens": sorted_tokens, "seconds": round(sorted_s, 2)},
                        "mean_loss_file_order": file_loss, "mean_loss_sorted": sorted_loss,
                        "mean_loss_response_loss": library}

    prompts = test[:gen_prompts]
    timings = {}
    answers = {}
    for batch_size in (1, 8):
        start = time.perf_counter()
        answers[batch_size] = generate_responses(model, prompts, max_new_tokens=gen_tokens,
                                                 batch_size=batch_size)
        timings[batch_size] = time.perf_counter() - start
    template, tok = get_template("alpaca"), get_tokenizer()
    prompt_lengths = [len(tok.encode_ordinary(template.prompt(e))) for e in prompts]
    out["generation"] = {
        "prompts": len(prompts), "new_tokens_each": gen_tokens,
        "batches_of_equal_length": len(length_sorted_batches(prompt_lengths, 8, same_length=True)),
        "one_at_a_time_s": round(timings[1], 2), "equal_length_batches_s": round(timings[8], 2),
        "same_answers": [a["model_response"] for a in answers[1]] ==
                        [a["model_response"] for a in answers[8]],
    }
    return out


def run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gen-prompts", type=int, default=24)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", choices=["full", "lora", "sorting"], help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker in ("full", "lora"):
        print(json.dumps(train_worker(args.worker, args.steps, args.rank)))
        return
    if args.worker == "sorting":
        print(json.dumps(sorting_worker(args.gen_prompts, args.gen_tokens)))
        return

    results = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": "cuda" if torch.cuda.is_available() else "cpu"}
    threads = ["--threads", str(args.threads)] if args.threads else []
    for kind in ("full", "lora"):
        results[kind] = run_worker(["--worker", kind, "--steps", str(args.steps), "--rank", str(args.rank),
                                    *threads])
        r = results[kind]
        print(f"{kind:>4}: {r['tokens_per_s']:8.0f} tokens/s | trainable {r['trainable_params']:,} of "
              f"{r['total_params']:,} | params+grads+AdamW {r['param_grad_adam_mib']:.0f} MiB | "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    full, lora = results["full"], results["lora"]
    print(f"LoRA: {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x the tokens/s, "
          f"{full['peak_rss_mib'] - lora['peak_rss_mib']:.0f} MiB less peak RSS, "
          f"{full['param_grad_adam_mib'] - lora['param_grad_adam_mib']:.0f} MiB less "
          f"parameter/gradient/optimizer memory")
    s = results["sorting"] = run_worker(["--worker", "sorting", "--gen-prompts", str(args.gen_prompts),
                                         "--gen-tokens", str(args.gen_tokens), *threads])
    lp, g = s["loss_pass"], s["generation"]
    te = s["train_epoch"]
    print(f"one training epoch: {te['input_tokens']} input tokens in batches padded to their longest "
          f"example ({te['unpadded_input_tokens']} without padding, "
          f"{te['input_tokens_if_padded_to_1024']} if padded to 1024)")
    print(f"reference-loss pass over {s['test_entries']} test entries "
          f"({s['unpadded_input_tokens']} input tokens without padding): "
          f"file order {lp['file_order']['input_tokens']} input tokens in {lp['file_order']['seconds']} s, "
          f"sorted {lp['sorted']['input_tokens']} in {lp['sorted']['seconds']} s; mean loss "
          f"{lp['mean_loss_file_order']:.6f} vs {lp['mean_loss_sorted']:.6f}")
    print(f"generation of {g['prompts']} answers x {g['new_tokens_each']} tokens: one at a time "
          f"{g['one_at_a_time_s']} s, {g['batches_of_equal_length']} equal-length batches "
          f"{g['equal_length_batches_s']} s; same answers: {g['same_answers']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
