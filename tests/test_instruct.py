"""Instruction fine-tuning: prompt format, the book's split, the collate's masks, LoRA, and the
commands (`finetune instruct`, `ask`, `chat`, `merge-lora`, `evaluate-responses`) end to end."""

from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import current_checkpoint
from gptforge import GPTConfig, GPTModel, load, read_run
from gptforge.checkpoint import RunMeta, save_model
from gptforge.cli import main
from gptforge.finetune.instruct import (
    IGNORE_INDEX,
    InstructionDataset,
    chat_prompt,
    check_entries,
    collate_instructions,
    encode_entry,
    generate_responses,
    length_sorted_batches,
    load_instruction_data,
    read_splits,
    response_loss,
    split_data,
    write_splits,
)
from gptforge.finetune.lora import apply_lora, count_trainable, merge_lora
from gptforge.finetune.templates import get_template
from gptforge.tokenizer import EOT_ID, get_tokenizer

ENTRY = {"instruction": "Convert 45 kilometers to meters.", "input": "",
         "output": "45 kilometers is 45000 meters."}
ENTRY_WITH_INPUT = {"instruction": "Rewrite the sentence using a simile.",
                    "input": "The car is very fast.", "output": "The car is as fast as lightning."}


def tiny_model(context_length: int = 128, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(context_length=context_length, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
    return GPTModel(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(tiny_model(), path)
    return path


@pytest.fixture(scope="module")
def instruction_data(fetch):
    """The book's instruction-data.json, fetched by gptforge (the test skips if it cannot be)."""
    return load_instruction_data(fetch("instruction-data"))


# ------------------------------------------------------------------------------------
# prompt format and data

def test_alpaca_prompt_byte_for_byte():
    t = get_template("alpaca")
    assert t.full(ENTRY) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nConvert 45 kilometers to meters."
        "\n\n### Response:\n45 kilometers is 45000 meters.")
    assert t.prompt(ENTRY_WITH_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile."
        "\n\n### Input:\nThe car is very fast.\n\n### Response:\n")


def test_phi3_prompt_byte_for_byte():
    t = get_template("phi3")
    assert t.full(ENTRY_WITH_INPUT) == ("<|user|>\nRewrite the sentence using a simile.\n"
                                        "The car is very fast.\n<|assistant|>\n"
                                        "The car is as fast as lightning.")
    assert t.prompt(ENTRY) == "<|user|>\nConvert 45 kilometers to meters.\n<|assistant|>\n"


def test_book_split_sizes_and_order(instruction_data, tmp_path):
    data = instruction_data
    assert len(data) == 1100
    splits = split_data(data)
    assert (len(splits.train), len(splits.test), len(splits.val)) == (935, 110, 55)
    assert splits.train == data[:935]
    assert splits.test == data[935:1045]
    assert splits.val == data[1045:]
    write_splits(splits, tmp_path)
    assert read_splits(tmp_path) == splits
    assert json.loads((tmp_path / "test.json").read_text())[0] == data[935]


def test_user_data_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Say hi.", "output": "Hi."}, ENTRY_WITH_INPUT]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.jsonl", "d.json"):
        loaded = load_instruction_data(tmp_path / name)
        assert loaded[0] == {"instruction": "Say hi.", "input": "", "output": "Hi."}
        assert loaded[1] == ENTRY_WITH_INPUT


def test_bad_entries_are_named():
    with pytest.raises(ValueError, match=r"entry 1 has no 'output' key"):
        check_entries([ENTRY, {"instruction": "x", "input": ""}], "mine.json")
    with pytest.raises(ValueError, match=r"entry 0 has no 'instruction' key"):
        check_entries([{"prompt": "x", "output": "y"}])
    with pytest.raises(ValueError, match="list of entries"):
        check_entries({"instruction": "x"})


# ------------------------------------------------------------------------------------
# collate

def test_collate_matches_the_book():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    E, X = EOT_ID, IGNORE_INDEX
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]
    assert targets.tolist() == [[1, 2, 3, 4, E], [6, E, X, X, X], [8, 9, E, X, X]]


def test_collate_masks_prompt_and_truncates():
    E, X = EOT_ID, IGNORE_INDEX
    batch = [([0, 1, 2, 3, 4], 3), ([5, 6], 1), ([7, 8, 9], 2)]
    _, targets = collate_instructions(batch, mask_prompt=True)
    # prompt of 3 tokens: the targets 1 and 2 are prompt tokens; 3, 4 and the end remain
    assert targets.tolist() == [[X, X, 3, 4, E], [6, E, X, X, X], [X, 9, E, X, X]]
    inputs, targets = collate_instructions(batch, mask_prompt=True, max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, E], [7, 8, 9]]
    assert targets.tolist() == [[X, X, 3], [6, E, X], [X, 9, E]]
    _, unmasked = collate_instructions(batch, mask_prompt=False)
    assert unmasked.tolist() == [[1, 2, 3, 4, E], [6, E, X, X, X], [8, 9, E, X, X]]


def test_collate_on_real_entries_keeps_exactly_the_response():
    tok, template = get_tokenizer(), get_template("alpaca")
    ds = InstructionDataset([ENTRY, ENTRY_WITH_INPUT], template)
    inputs, targets = collate_instructions([ds[0], ds[1]], mask_prompt=True)
    for row, entry in enumerate((ENTRY, ENTRY_WITH_INPUT)):
        kept = targets[row][targets[row] != IGNORE_INDEX].tolist()
        assert kept[-1] == EOT_ID and EOT_ID not in kept[:-1]
        assert tok.decode(kept[:-1]) == entry["output"]
        ids, prompt_len = encode_entry(entry, template, tok)
        assert tok.decode(ids[:prompt_len]) == template.prompt(entry)
        assert inputs[row, :len(ids)].tolist() == ids


def test_literal_endoftext_in_data_is_plain_text():
    entry = {"instruction": "Repeat <|endoftext|>", "input": "", "output": "<|endoftext|>"}
    ids, _ = encode_entry(entry, get_template("alpaca"))
    assert EOT_ID not in ids


def test_length_sorted_batches():
    lengths = [5, 3, 5, 9, 3, 5]
    assert length_sorted_batches(lengths, 2) == [[1, 4], [0, 2], [5, 3]]
    assert length_sorted_batches(lengths, 2, same_length=True) == [[1, 4], [0, 2], [5], [3]]


def test_sorting_does_not_change_results(instruction_data):
    """Padding after a sequence does not change its logits (causal attention), so loss sums
    and greedy answers are the same whatever the batching."""
    model = tiny_model().eval()
    entries = instruction_data[:6]
    one = response_loss(model, entries, batch_size=1)
    many = response_loss(model, entries, batch_size=4)
    assert one["tokens"] == many["tokens"]
    assert one["mean_loss"] == pytest.approx(many["mean_loss"], rel=1e-5)
    test = instruction_data[935:947]
    single = generate_responses(model, test, max_new_tokens=4, batch_size=1)
    batched = generate_responses(model, test, max_new_tokens=4, batch_size=8)
    assert [e["model_response"] for e in single] == [e["model_response"] for e in batched]


def test_chat_prompt_drops_old_turns():
    history = [{"role": "user", "content": "first question"},
               {"role": "assistant", "content": "first answer " * 20},
               {"role": "user", "content": "second"}, {"role": "assistant", "content": "ok"}]
    full = chat_prompt(history, "third", "alpaca")
    assert "User: first question" in full and "Assistant: ok" in full
    n_full = len(get_tokenizer().encode_ordinary(full))
    short = chat_prompt(history, "third", "alpaca", max_tokens=n_full - 1)
    assert "first question" not in short and "User: second" in short
    with pytest.raises(ValueError, match="shorten"):
        chat_prompt([], "word " * 200, "alpaca", max_tokens=50)


# ------------------------------------------------------------------------------------
# LoRA

def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (2, 12), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def test_lora_at_init_changes_nothing():
    model = tiny_model().eval()
    ids, _ = _batch()
    before = model(ids)
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(ids), before)
    trainable, total = count_trainable(model)
    assert 0 < trainable < total


def test_lora_training_step_changes_only_adapters():
    from gptforge.training import lm_loss

    model = apply_lora(tiny_model(), rank=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm_loss(model, _batch()).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".A", ".B")) for k in changed)
    assert any(k.endswith(".B") for k in changed)  # B starts at zero and must move


def test_lora_merged_equals_unmerged_and_save_load_round_trip(tmp_path, tiny_dir):
    model = apply_lora(load(tiny_dir), rank=4, alpha=8)
    with torch.no_grad():  # give the adapters non-zero updates
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    model.eval()
    ids, _ = _batch()
    lora_logits = model(ids)
    save_model(model, tmp_path / "run", RunMeta(model=model.cfg, base_model=str(tiny_dir.resolve()),
                                                step=7))
    assert read_run(tmp_path / "run").adapters_only
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {"adapter.safetensors", "gptforge.json"}
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert saved and all(k.endswith((".A", ".B")) for k in saved)
    meta = json.loads((tmp_path / "run" / "gptforge.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0 and meta["step"] == 7
    assert meta["base_model"] == str(tiny_dir.resolve())

    loaded = load(tmp_path / "run", for_training=True).eval()  # adapters kept apart, trainable
    assert torch.allclose(loaded(ids), lora_logits, atol=1e-6)
    assert all(p.requires_grad == n.endswith((".A", ".B")) for n, p in loaded.named_parameters())
    merged = load(tmp_path / "run")  # folded in, as every command uses it
    assert not any(n.endswith((".A", ".B")) for n, _ in merged.named_parameters())
    assert torch.allclose(merged(ids), lora_logits, atol=1e-5)
    assert torch.allclose(merge_lora(loaded).eval()(ids), lora_logits, atol=1e-5)


# ------------------------------------------------------------------------------------
# the commands

def _train(tiny_dir, out, *extra):
    return main(["finetune", "instruct", "--model", str(tiny_dir), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--eval-batches", "1",
                 "--max-test", "3", "--max-new-tokens", "6", "--no-progress", *extra])


@pytest.mark.needs_data("instruction-data")
def test_finetune_ask_evaluate_end_to_end(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_dir, run, "--mask-prompt") == 0
    for name in ("gptforge.json", "train.json", "val.json", "test.json",
                 "responses.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert (current_checkpoint(run) / "model.safetensors").is_file()
    assert len(json.loads((run / "train.json").read_text())) == 935
    responses = json.loads((run / "responses.json").read_text())
    test = json.loads((run / "test.json").read_text())
    assert len(responses) == 3
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in responses] == test[:3]
    assert all(isinstance(r["model_response"], str) for r in responses)
    meta = json.loads((run / "gptforge.json").read_text())
    assert meta["task"] == "instruct" and meta["instruct"]["mask_prompt"] is True
    assert meta["instruct"]["max_length"] == 128  # capped at the context length
    capsys.readouterr()

    assert main(["ask", "--model", str(run), "Name a color.", "--max-new-tokens", "5"]) == 0
    answer = capsys.readouterr().out
    assert answer.endswith("\n") and "###" not in answer and "Below is" not in answer

    assert main(["evaluate-responses", str(run / "responses.json"), "--model", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["responses"] == 3 and 0 <= report["rouge_l_f1"] <= 1
    assert report["reference_loss"]["tokens"] > 0 and report["reference_loss"]["mean_loss"] > 0
    assert "judge" not in report
    assert "ROUGE-L" in capsys.readouterr().out


@pytest.mark.needs_data("instruction-data")
def test_lora_run_resume_and_merge(tiny_dir, tmp_path, capsys):
    run = tmp_path / "lora"
    assert _train(tiny_dir, run, "--lora-rank", "4", "--lora-alpha", "8", "--stop-after", "1") == 0
    assert not (run / "responses.json").exists()
    assert {p.name for p in current_checkpoint(run).iterdir()} == {"adapter.safetensors", "gptforge.json",
                                                                 "training_state.pt"}
    assert json.loads((run / "gptforge.json").read_text())["step"] == 1
    assert main(["finetune", "instruct", "--resume", str(run), "--max-test", "2",
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    assert json.loads((run / "gptforge.json").read_text())["step"] == 2
    assert len(json.loads((run / "responses.json").read_text())) == 2
    assert main(["merge-lora", str(run), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "gptforge.json").read_text())["instruct"]["template"] == "alpaca"
    capsys.readouterr()
    answers = []
    for model in (run, tmp_path / "merged"):
        assert main(["ask", "--model", str(model), "Name a color.", "--max-new-tokens", "5"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_chat_with_piped_input(tiny_dir, monkeypatch, capsys):
    import sys

    prompts = []

    def fake_stream(model, prompt, max_new_tokens, tokenizer=None, **sampling):
        prompts.append(prompt)
        yield "  reply"
        yield f" {len(prompts)}"
        instruction = prompt.split("### Instruction:\n", 1)[1].split("\n\n###", 1)[0]
        if instruction == "interrupt me":
            raise KeyboardInterrupt

    # sys.modules: the attribute gptforge.generate is the function, not the module
    monkeypatch.setattr(sys.modules["gptforge.generate"], "stream_text", fake_stream)
    monkeypatch.setattr("sys.stdin", io.StringIO(
        "hello\nhow are you\n/reset\ninterrupt me\nstill here\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 6
    assert "(conversation cleared)" in out and "reply 3 [stopped]\n" in out and "reply 4\n" in out
    assert ">>> reply 1\n" in out  # leading spaces of an answer are dropped
    assert "never read" not in "".join(prompts) and len(prompts) == 4
    assert "User: hello" in prompts[1] and "Assistant: reply 1" in prompts[1]
    assert "hello" not in prompts[2]  # /reset forgot the conversation
    assert "User: interrupt me" in prompts[3] and "Assistant: reply 3" in prompts[3]


def test_chat_ends_at_end_of_input(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a color.\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count(">>> ") == 2
