"""Fine-tuned models stop where their prompt template ends an answer.

A scripted model (a real GPTModel whose forward pass runs as usual, KV cache and all,
and whose logits are then replaced so that greedy decoding writes a fixed token
sequence after the prompt) goes on past the end of its answer: into Alpaca's next
"### Instruction:" section, Phi-3's "<|end|><|user|>" turn markers, or a chat
template's end-of-turn marker followed by a new turn. `chat`, `ask`, `generate` on an
instruction run and the responses that `evaluate-responses` scores must show the
answer and nothing of the marker or beyond, whether the marker comes as one id or as
text split across tokens. Also: `finetune instruct --init` starts from a fresh model.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from gptforge import GPTConfig, GPTModel, load, read_run
from gptforge.checkpoint import RunMeta, save_model
from gptforge.cli import main
from gptforge.finetune.instruct import end_ids, generate_responses, template_of
from gptforge.generate import TextStream, stream_text
from gptforge.hf_tokenizer import load_tokenizer
from gptforge.loader import tokenizer_for
from gptforge.tokenizer import EOT_ID, get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)

INSTRUCTION = "Name a colour."
ANSWER = "Blue <|b> is\n\n#1 nice."  # near misses of both templates' markers stay in the answer
AFTER = "Say more. And more."  # what the model invents after the marker


class ScriptedModel(GPTModel):
    """A GPTModel that writes `script` after any prompt, greedily, whatever its weights say.

    The real forward pass runs (so the KV cache is filled and read as usual); then each
    row's logits are replaced by one-hot logits for its next script token, counted from
    the row's prompt length (recorded at the prefill, where the cache starts at 0).
    """

    def __init__(self, cfg: GPTConfig, script: list[int]) -> None:
        super().__init__(cfg)
        self.script = list(script)
        self.prompt_lengths: torch.Tensor | None = None

    def forward(self, idx, cache=None, positions=None, logits_at=None):
        logits = super().forward(idx, cache, positions, logits_at)
        if cache is None:
            raise AssertionError("the scripted model follows generation with a KV cache")
        B = idx.shape[0]
        if isinstance(positions, int) and positions == 0 and idx.shape[1] > 1 or self.prompt_lengths is None:
            ends = logits_at if logits_at is not None else torch.full((B,), idx.shape[1] - 1)
            self.prompt_lengths = ends.cpu() + 1
            step = torch.zeros(B, dtype=torch.long)
        else:
            pos = torch.as_tensor(positions).cpu().expand(B)  # position of the token just fed
            step = pos + 1 - self.prompt_lengths
        forced = torch.zeros_like(logits[:, -1:])  # (B, 1, V)
        for b in range(B):
            forced[b, 0, self.script[min(int(step[b]), len(self.script) - 1)]] = 10.0
        return forced if logits.shape[1] == 1 else torch.cat([logits[:, :-1], forced], dim=1)


def scripted(model: GPTModel, script: list[int]) -> ScriptedModel:
    out = ScriptedModel(model.cfg, script)
    out.load_state_dict(model.state_dict())
    return out.eval()


def ids_of(pieces, tokenizer) -> list[int]:
    """The script: each piece's tokens in turn, so the test decides where tokens break."""
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(piece)
        else:
            ids += tokenizer.encode(piece, allowed_special="all")
    return ids


# ------------------------------------------------------------------------------------
# the runs: GPT-2 Alpaca and Phi-3 runs, and a model with its own (ChatML) chat template

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chatml_tokenizer(folder) -> None:
    """A small byte-level BPE tokenizer with ChatML's special tokens and template, written as
    a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ANSWER, AFTER, INSTRUCTION, "user assistant system\n"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|endoftext|>", "bos_token": None}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """template name -> an instruction run directory (a tiny random GPTModel) of that template."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    torch.manual_seed(0)
    for name in ("alpaca", "phi3", "chat"):
        folder = root / name
        folder.mkdir()
        vocab = 50257
        if name == "chat":
            _chatml_tokenizer(folder)
            vocab = load_tokenizer(folder).n_vocab
        cfg = GPTConfig(vocab_size=vocab, context_length=128, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
        save_model(GPTModel(cfg), folder, RunMeta(model=cfg, task="instruct", template=name))
        out[name] = folder
    return out


# Each case: the template, and the script after the answer, with its marker split across
# tokens ("split") or as the one id or one piece of text that holds it ("whole").
CASES = {
    ("alpaca", "split"): ["\n", "\n", "##", "# ", "Instruction:\n", AFTER],
    ("alpaca", "whole"): ["\n\n### Instruction:\n", AFTER],
    ("alpaca", "id"): [EOT_ID, AFTER],
    ("phi3", "split"): ["<", "|", "end", "|", "><|user|>\n", AFTER],
    ("phi3", "whole"): ["<|end|>", "<|user|>\n", AFTER],
    ("phi3", "id"): [EOT_ID, AFTER],
    ("chat", "split"): ["<", "|", "im", "_end", "|>\n", "<|im_start|>", "user\n", AFTER],
    ("chat", "whole"): ["<|im_end|>", "\n", "<|im_start|>", "user\n", AFTER],
}
CASE_IDS = [f"{t}-{kind}" for t, kind in CASES]


def _script(name, kind, tokenizer) -> list[int]:
    tail = CASES[(name, kind)]
    if name == "chat" and kind == "split":  # the marker as ordinary text, not its special token
        return [t for p in [ANSWER, *tail] for t in tokenizer.encode_ordinary(p)]
    return ids_of([ANSWER, *tail], tokenizer)


@pytest.fixture
def use_script(monkeypatch):
    """use_script(ids): every model that a command loads writes `ids` after its prompt."""
    import gptforge.loader

    real_load = gptforge.loader.load

    def install(script):
        monkeypatch.setattr(gptforge.loader, "load", lambda source, **kw: scripted(real_load(source, **kw), script))

    return install


def test_the_script_really_goes_past_the_marker(runs):
    """Without the template's markers the scripted model writes the marker and beyond."""
    tok = get_tokenizer()
    model = scripted(load(runs["alpaca"]), _script("alpaca", "split", tok))
    text = "".join(stream_text(model, "Hello", 40, tok))
    assert text.startswith(ANSWER + "\n\n### Instruction:\n" + AFTER)


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_ask_stops_at_the_marker(case, runs, use_script, capsys):
    name, kind = case
    run = runs[name]
    use_script(_script(name, kind, tokenizer_for(run)))
    assert main(["ask", "--model", str(run), INSTRUCTION, "--max-new-tokens", "60"]) == 0
    assert capsys.readouterr().out == ANSWER + "\n"


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_chat_stops_at_the_marker(case, runs, use_script, monkeypatch, capsys):
    name, kind = case
    run = runs[name]
    use_script(_script(name, kind, tokenizer_for(run)))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{INSTRUCTION}\n/exit\n"))
    assert main(["chat", "--model", str(run), "--max-new-tokens", "60"]) == 0
    assert capsys.readouterr().out == f">>> {ANSWER}\n>>> "


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_generate_on_an_instruction_run_stops_at_the_marker(case, runs, use_script, capsys):
    name, kind = case
    run = runs[name]
    use_script(_script(name, kind, tokenizer_for(run)))
    assert main(["generate", "--model", str(run), "--prompt", "Colour:", "--max-new-tokens", "60"]) == 0
    assert capsys.readouterr().out == f"Colour:{ANSWER}\n"


def test_generate_on_a_plain_model_prints_everything(runs, tmp_path, use_script, capsys):
    """A model that is no instruction run has no template: only its end-of-text stops it."""
    plain = tmp_path / "plain"
    save_model(load(runs["alpaca"]), plain)
    assert read_run(plain).template is None
    script = _script("alpaca", "whole", get_tokenizer())
    use_script(script)
    assert main(["generate", "--model", str(plain), "--prompt", "Colour:", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "Colour:" + get_tokenizer().decode(script[:12]) + "\n"


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_responses_that_evaluate_responses_scores_stop_at_the_marker(case, runs, tmp_path, capsys):
    name, kind = case
    run = runs[name]
    tokenizer = tokenizer_for(run)
    template = template_of(read_run(run), tokenizer=tokenizer)
    model = scripted(load(run), _script(name, kind, tokenizer))
    entries = [{"instruction": INSTRUCTION, "input": "", "output": ANSWER},
               {"instruction": "A much longer instruction, so the rows differ.", "input": "x", "output": ANSWER}]
    answered = generate_responses(model, entries, template, max_new_tokens=60, batch_size=2,
                                  tokenizer=tokenizer)
    assert [a["model_response"] for a in answered] == [ANSWER, ANSWER]
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(answered))
    assert main(["evaluate-responses", str(path), "--model", str(run)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exact_match"] == 1.0 and report["rouge_l_f1"] == 1.0


def test_a_batch_stops_once_every_answer_has_ended(runs):
    """The model is not run to max_new_tokens when all answers ended at a text marker."""
    tok = get_tokenizer()
    model = scripted(load(runs["alpaca"]), _script("alpaca", "split", tok))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    entries = [{"instruction": INSTRUCTION, "input": "", "output": ""}] * 2
    generate_responses(model, entries, "alpaca", max_new_tokens=200, batch_size=2, tokenizer=tok)
    assert len(calls) < len(_script("alpaca", "split", tok))


# ------------------------------------------------------------------------------------
# the text stream itself: every way a marker can be split, and near misses let go

class Pieces:
    """A tokenizer whose token i is the text pieces[i]: any split of a text into tokens."""

    def __init__(self, pieces):
        self.pieces = [p.encode() for p in pieces]

    def decode_single_token_bytes(self, token):
        return self.pieces[token]


@pytest.mark.parametrize("marker", ["\n\n### ", "### Response:", "<|end|>", "<|user|>"])
def test_text_stream_at_every_split_of_the_marker(marker):
    from gptforge.finetune.templates import get_template

    markers = get_template("alpaca").end_markers + get_template("phi3").end_markers
    answer = "Fine <| then \n\n#2 ##"  # near misses of several markers
    for cut in range(len(marker) + 1):
        for glue in (False, True):  # the answer's end in the marker's first token, or not
            pieces = ([answer + marker[:cut]] if glue else [answer, marker[:cut]]) + [marker[cut:] + "Next"]
            stream = TextStream(Pieces(pieces), markers)
            out, stopped = "", False
            for token in range(len(pieces)):
                piece, stopped = stream.push(token)
                out += piece
                assert answer.startswith(out)  # never a character of the marker
                if stopped:
                    break
            assert stopped and out == answer


def test_text_stream_never_releases_a_marker_prefix_and_flushes_a_near_miss():
    tok = get_tokenizer()
    stream = TextStream(tok, ("<|end|>",))
    released = [stream.push(t)[0] for t in tok.encode_ordinary("ok<|en")]
    assert "".join(released) == "ok"  # "<|en" might be the marker: held
    assert stream.push(tok.encode_ordinary("d")[0]) == ("", False)
    assert stream.push(tok.encode_ordinary("x")[0]) == ("<|endx", False)  # it was not: let go
    assert stream.finish() == ""
    stream = TextStream(tok, ("<|end|>",))
    assert [stream.push(t)[0] for t in tok.encode_ordinary("ok<|")] == ["ok", "", ""]
    assert stream.finish() == "<|"  # generation ended: what was held is text after all


def test_chat_template_stops_at_its_end_of_turn_id_and_text(runs):
    tokenizer = tokenizer_for(runs["chat"])
    template = template_of(read_run(runs["chat"]), tokenizer=tokenizer)
    assert template.end_markers == ("<|im_end|>",)
    assert end_ids(tokenizer, template)[0] == tokenizer.encode("<|im_end|>", allowed_special="all")[0]


# ------------------------------------------------------------------------------------
# finetune instruct --init

@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "colours.json"
    entries = [{"instruction": f"Name colour {i}.", "input": "", "output": ["Red.", "Blue."][i % 2]}
               for i in range(20)]
    path.write_text(json.dumps(entries))
    return path


def _finetune(out, data_file, *flags):
    return main(["finetune", "instruct", *flags, "--data", str(data_file), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--eval-batches", "1", "--max-test", "1",
                 "--max-new-tokens", "3", "--no-progress"])


def test_finetune_instruct_init_preset(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    assert _finetune(out, data_file, "--init", "gpt2-small", "--n-layers", "1", "--emb-dim", "16",
                     "--n-heads", "2", "--context-length", "64") == 0
    meta = read_run(out)
    assert meta.base_model == "init:gpt2-small" and meta.template == "alpaca"
    assert (meta.model.n_layers, meta.model.emb_dim, meta.model.context_length) == (1, 16, 64)
    assert len(json.loads((out / "responses.json").read_text())) == 1
    capsys.readouterr()
    assert main(["ask", "--model", str(out), INSTRUCTION, "--max-new-tokens", "3"]) == 0


def test_finetune_instruct_init_lora_keeps_its_fresh_base(tmp_path, data_file):
    out = tmp_path / "run"
    assert _finetune(out, data_file, "--init", "gpt2-small", "--n-layers", "1", "--emb-dim", "16",
                     "--n-heads", "2", "--context-length", "64", "--lora-rank", "2") == 0
    assert (out / "base" / "model.safetensors").is_file()  # the random base, which nothing else holds
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(load(out)(ids), load(out)(ids))


def test_finetune_instruct_init_from_a_model_directory(tmp_path, runs, data_file):
    source = runs["chat"]  # a model with its own tokenizer and chat template
    out = tmp_path / "run"
    assert _finetune(out, data_file, "--init", str(source)) == 0
    meta = read_run(out)
    assert meta.base_model == f"init:{source.resolve()}" and meta.template == "chat"
    assert meta.model == read_run(source).model  # the architecture of that model ...
    trained, original = load(out), load(source)
    assert not torch.equal(trained.emb.tok.weight, original.emb.tok.weight)  # ... not its weights
    assert (out / "tokenizer.json").is_file()
    assert tokenizer_for(out).n_vocab == tokenizer_for(source).n_vocab


def test_finetune_instruct_init_errors(tmp_path, runs, data_file, capsys):
    assert _finetune(tmp_path / "a", data_file, "--init", "gpt2-small", "--model", str(runs["alpaca"])) == 2
    assert "not both" in capsys.readouterr().err
    assert _finetune(tmp_path / "b", data_file, "--init", str(runs["alpaca"]), "--n-layers", "2") == 2
    assert "leave them out" in capsys.readouterr().err
    assert _finetune(tmp_path / "c", data_file, "--model", str(runs["alpaca"]), "--emb-dim", "8") == 2
    assert "use them with --init" in capsys.readouterr().err
    assert _finetune(tmp_path / "d", data_file, "--init", str(tmp_path / "missing")) == 2
    assert "neither a preset" in capsys.readouterr().err
