"""Every command with a model of the later families, offline, through `main([...])`.

Tiny random Qwen3 and Llama 3 models (written by transformers' `save_pretrained`) carry the
real tokenizers of their families (tokenizer fixtures built from llama.cpp's GGUF vocabularies,
see scripts/make_tokenizer_fixtures.py) and the official chat templates.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from gptforge import load
from gptforge.cli import main
from gptforge.hf_tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

ENTRIES = [{"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else "Be brief.",
            "output": ["Red.", "Blue.", "Green."][i % 3]} for i in range(24)]


def _tiny_model(family: str, vocab_size: int, out: Path) -> Path:
    """A random model of `family` with `vocab_size` ids, saved by transformers into `out`."""
    sizes = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                 tie_word_embeddings=True)
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**sizes))
    elif family == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **sizes, sliding_window=16, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes, rope_theta=500000.0))
    model.save_pretrained(out)
    return out


# The mirror has no Gemma 3 tokenizer; Gemma 4's (the same SentencePiece family, 262k ids,
# its own chat template) stands in for it.
TOKENIZERS = {"qwen3": "qwen3", "llama3": "llama3", "gemma3": "gemma4"}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def family_dir(request, tokenizer_dir, tmp_path_factory) -> Path:
    """A model directory as the Hub has it: config, safetensors, tokenizer files."""
    tokens = tokenizer_dir(TOKENIZERS[request.param])
    out = tmp_path_factory.mktemp(f"{request.param}-model")
    torch.manual_seed(0)
    _tiny_model(request.param, load_tokenizer(tokens).n_vocab, out)
    for file in tokens.iterdir():
        shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "colours.json"
    path.write_text(json.dumps(ENTRIES))
    return path


def test_generate_uses_the_models_tokenizer(family_dir, capsys):
    assert main(["generate", "--model", str(family_dir), "--prompt", "Hello there", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Hello there") and len(printed) > len("Hello there\n")
    # The same text as transformers' greedy continuation of the same ids.
    tok = load_tokenizer(family_dir)
    ids = tok.encode_prompt("Hello there")
    ref = transformers.AutoModelForCausalLM.from_pretrained(family_dir)
    new = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(new) if t in tok.eos_ids), len(new))
    assert printed.rstrip("\n") == "Hello there" + tok.decode(new[:stop])


def test_chat_renders_the_models_template(family_dir, monkeypatch, capsys):
    from gptforge.finetune.instruct import chat_prompt, end_ids, template_of

    tok = load_tokenizer(family_dir)
    template = template_of(None, tokenizer=tok)
    assert template.name == "chat"
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    expected = tok.apply_chat_template(history + [{"role": "user", "content": "And you?"}],
                                       add_generation_prompt=True, **({"enable_thinking": False}
                                                                      if "enable_thinking" in tok.chat_template
                                                                      else {}))
    assert chat_prompt(history, "And you?", template, tok) == expected
    marker = template.end_marker
    assert marker in ("<|im_end|>", "<|eot_id|>", "<turn|>")
    assert end_ids(tok, template)[0] == tok.encode(marker, allowed_special="all")[0]
    assert set(end_ids(tok, template)) >= set(tok.eos_ids)

    monkeypatch.setattr(sys, "stdin", _Lines(["Hi there\n", "/exit\n"]))
    assert main(["chat", "--model", str(family_dir), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert "(chat prompts)" in err and out.count(">>> ") == 2


class _Lines:
    def __init__(self, lines):
        self.lines = list(lines)

    def readline(self):
        return self.lines.pop(0) if self.lines else ""


def test_lora_finetune_merge_convert_and_serve(family_dir, data_file, tmp_path, capsys):
    run, merged, hf_out = tmp_path / "run", tmp_path / "merged", tmp_path / "hf"
    assert main(["finetune", "instruct", "--model", str(family_dir), "--data", str(data_file),
                 "--lora-rank", "2", "--epochs", "1", "--batch-size", "4", "--max-test", "2",
                 "--max-new-tokens", "4", "--out", str(run), "--no-progress"]) == 0
    meta = json.loads((run / "gptforge.json").read_text())
    assert meta["template"] == "chat" and meta["lora"]["rank"] == 2
    answers = json.loads((run / "responses.json").read_text())
    assert len(answers) == 2 and all("model_response" in a for a in answers)

    # Training saw the answer only, ended by the template's end-of-turn token.
    from gptforge.finetune.instruct import InstructionDataset, collate_instructions, end_ids, template_of

    tok = load_tokenizer(family_dir)
    template = template_of(None, "chat", tok)
    ids, prompt_len = InstructionDataset(ENTRIES[:1], template, tok)[0]
    _, targets = collate_instructions([(ids, prompt_len)], pad_id=end_ids(tok, template)[0], mask_prompt=True)
    learned = [t for t in targets[0].tolist() if t != -100]
    assert tok.decode(learned[:-1]) == ENTRIES[0]["output"]
    assert learned[-1] == end_ids(tok, template)[0]

    assert main(["merge-lora", str(run), str(merged)]) == 0
    ids = torch.tensor([tok.encode_prompt("Name a colour.")])
    with torch.no_grad():  # both in the family's default bfloat16: the same merge, the same weights
        assert torch.equal(load(run)(ids), load(merged)(ids))
    assert main(["ask", "--model", str(merged), "Name a colour.", "--max-new-tokens", "3"]) == 0

    assert main(["convert", str(merged), str(hf_out), "--to", "hf"]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_out).float()
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, load(merged, dtype=torch.float32)(ids), atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_out)
    assert len(hf_tok) == tok.n_vocab and hf_tok.chat_template == tok.chat_template
    capsys.readouterr()

    openai = pytest.importorskip("openai")
    from gptforge.serve.app import background_server, create_app

    with background_server(create_app(str(run))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=run.name, max_tokens=4,
                                               messages=[{"role": "user", "content": "Name a colour."}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(tok.encode(template.prompt({"instruction": "Name a colour."}),
                                                       allowed_special="all"))


def test_evaluate_scores_with_the_models_tokenizer(family_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    assert main(["evaluate", "--model", str(family_dir), "--text", str(text), "--context-length", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(family_dir)
    n_ids = len(tok.encode_prompt(text.read_text()))
    assert result["tokens"] == (n_ids - 1) // 64 * 64  # every full window of the model's own ids
    # A random model is near uniform over its vocabulary: loss close to ln(V).
    assert abs(result["loss"] - torch.log(torch.tensor(float(tok.n_vocab)))) < 1.0


def test_classifier_on_a_family_model_uses_its_tokenizer(family_dir, tmp_path, capsys):
    import csv

    data = tmp_path / "moods.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("Label", "Text"))
        writer.writerows([("happy" if i % 2 else "sad", f"{'What a lovely' if i % 2 else 'Such a grey'} day {i}")
                          for i in range(40)])
    run = tmp_path / "clf"
    assert main(["finetune", "classify", "--model", str(family_dir), "--data", str(data), "--max-steps", "2",
                 "--trainable", "all", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["classify", "--model", str(run), "What a lovely morning"]) == 0
    label, prob, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("happy", "sad") and 0.0 <= float(prob) <= 1.0 and text == "What a lovely morning"
    from gptforge.finetune.classify import TextClassifier

    clf = TextClassifier.load(run)
    tok = load_tokenizer(family_dir)
    assert clf.tokenizer.n_vocab == tok.n_vocab  # the model's own tokenizer, not GPT-2's
    text = "Such a grey day"
    from gptforge.finetune.classify import ClassificationDataset

    ids = ClassificationDataset([(text, "sad")], clf.labels, tokenizer=clf.tokenizer)[0][0].tolist()
    assert ids == tok.encode_ordinary(text)


def test_full_finetune_of_a_family_model(family_dir, data_file, tmp_path, capsys):
    run = tmp_path / "full"
    assert main(["finetune", "instruct", "--model", str(family_dir), "--data", str(data_file), "--max-steps", "2",
                 "--batch-size", "4", "--max-test", "0", "--out", str(run), "--no-progress"]) == 0
    meta = json.loads((run / "gptforge.json").read_text())
    assert meta["template"] == "chat" and "lora" not in meta
    before, after = load(family_dir, dtype=torch.float32), load(run, dtype=torch.float32)
    changed = [n for (n, p), q in zip(before.state_dict().items(), after.state_dict().values())
               if not torch.equal(p, q)]
    assert changed  # the weights themselves trained
    assert main(["ask", "--model", str(run), "Name a colour.", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize("arch", ["llama3", "qwen3", "gemma3"])
def test_pretrain_a_family_from_scratch(arch, tmp_path, capsys):
    run = tmp_path / arch
    assert main(["pretrain", "--arch", arch, "--n-layers", "2", "--emb-dim", "32", "--n-heads", "4",
                 "--context-length", "32", "--max-steps", "3", "--out", str(run), "--no-progress"]) == 0
    meta = json.loads((run / "gptforge.json").read_text())
    assert meta["model"]["arch"] == arch and meta["model"]["n_kv_heads"] == 1 and meta["model"]["vocab_size"] == 50257
    assert main(["pretrain", "--resume", str(run), "--max-steps", "5", "--no-progress"]) == 0
    assert json.loads((run / "gptforge.json").read_text())["step"] == 5
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "--prompt", "Every effort", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Every effort")
