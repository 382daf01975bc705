"""The one loader: every source kind to the same logits, gptforge 0.1's runs, typed run metadata,
and each prompt template served and chatted as the run was trained."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge import GPTConfig, GPTModel, load, read_run
from gptforge.checkpoint import ClassifierSettings, RunMeta, save_model
from gptforge.cli import main
from gptforge.errors import CheckpointError, GptforgeError, NotFoundError
from gptforge.finetune.classify import prepare_classifier
from gptforge.finetune.lora import apply_lora
from gptforge.finetune.templates import TEMPLATES, get_template, render_chat
from gptforge.tokenizer import text_to_ids

V1_RUNS = Path(__file__).parent / "fixtures" / "v1_runs"
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def _model(seed: int = 0, **cfg) -> GPTModel:
    torch.manual_seed(seed)
    settings = dict(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
    model = GPTModel(GPTConfig(**{**settings, **cfg}))
    with torch.no_grad():  # biases and norms off their trivial init, so a mix-up would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(IDS)


# ------------------------------------------------------------------------------------
# every source kind

def test_every_source_kind_loads_to_identical_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptforge.pretrained import save_hf

    model = _model(tie_weights=True)
    want = _logits(model)
    save_model(model, tmp_path / "gptforge")
    save_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # several files and an index
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sources = [tmp_path / "gptforge", tmp_path / "hf", tmp_path / "hf" / "model.safetensors",
               tmp_path / "sharded"]
    for source in sources:
        assert torch.equal(_logits(load(source)), want), source


def test_damaged_hf_checkpoints_give_clear_errors(tmp_path):
    """A sharded GPT-2 checkpoint missing a shard, and a config.json that is not JSON (in a
    folder whose weights would otherwise load), each give gptforge's own one-line error."""
    transformers = pytest.importorskip("transformers")
    from gptforge.pretrained import save_hf

    save_hf(_model(), tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(NotFoundError, match="is missing: the shard index lists it"):
        load(tmp_path / "sharded")
    config = tmp_path / "hf" / "config.json"
    config.write_text('{"model_type": "qwen3", "hidden_size": ')  # cut short
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load(tmp_path / "hf")


def test_lora_and_classifier_runs_load_through_the_same_function(tmp_path):
    base = _model()
    save_model(base, tmp_path / "base")
    lora = apply_lora(load(tmp_path / "base"), rank=2, alpha=2.0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.1)
    want = _logits(lora)
    save_model(lora, tmp_path / "lora", RunMeta(model=lora.cfg, base_model=str(tmp_path / "base")))
    assert torch.allclose(_logits(load(tmp_path / "lora")), want, atol=1e-6)
    trainable = load(tmp_path / "lora", for_training=True)
    assert trainable.training and {n.rsplit(".", 1)[1] for n, p in trainable.named_parameters()
                                   if p.requires_grad} == {"A", "B"}

    clf = prepare_classifier(load(tmp_path / "base"), 3, "lora", lora_rank=2, lora_alpha=2.0)
    with torch.no_grad():
        clf.out_head.weight.normal_(0, 0.3)
    want = _logits(clf)
    meta = RunMeta(model=clf.cfg, task="classifier", base_model=str(tmp_path / "base"),
                   classifier=ClassifierSettings(labels=["a", "b", "c"]))
    save_model(clf, tmp_path / "clf", meta)
    saved = read_run(tmp_path / "clf")
    assert saved.adapters_only and saved.num_outputs == 3 and saved.classifier.labels == ["a", "b", "c"]
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["adapter.safetensors", "gptforge.json"]
    assert torch.allclose(_logits(load(tmp_path / "clf")), want, atol=1e-6)


def test_a_lora_run_names_its_missing_base(tmp_path):
    save_model(_model(), tmp_path / "base")
    lora = apply_lora(load(tmp_path / "base"), rank=2, alpha=2.0)
    save_model(lora, tmp_path / "lora", RunMeta(model=lora.cfg, base_model=str(tmp_path / "base")))
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(NotFoundError, match="adapts the base model .*edit 'base_model'"):
        load(tmp_path / "lora")


# ------------------------------------------------------------------------------------
# gptforge 0.1's run directories (version 1), written by scripts/make_v1_fixture.py

@pytest.fixture
def v1_runs(tmp_path):
    """The fixture copied, with the LoRA run's absolute base path pointed at the copy."""
    runs = tmp_path / "v1_runs"
    shutil.copytree(V1_RUNS, runs)
    meta_file = runs / "instruct_lora" / "gptforge.json"
    meta = json.loads(meta_file.read_text())
    meta["base_model"] = str(runs / "lm")
    meta_file.write_text(json.dumps(meta))
    return runs


@pytest.mark.parametrize("name", ["lm", "instruct", "instruct_lora", "classifier", "classifier_lora"])
def test_version_1_runs_load_to_the_logits_gptforge_0_1_gave(v1_runs, name):
    expected = np.load(v1_runs / "expected.npz")
    model = load(v1_runs / name)
    got = model(torch.from_numpy(expected["ids"])).detach().numpy()
    np.testing.assert_allclose(got, expected[name], atol=1e-6)


def test_version_1_metadata_reads_into_the_typed_fields(v1_runs):
    assert read_run(v1_runs / "instruct").template == "phi3"  # it sat inside "instruct" in v1
    assert read_run(v1_runs / "instruct_lora").adapters_only
    clf = read_run(v1_runs / "classifier")
    assert clf.classifier.labels == ["a", "b", "c"] and clf.classifier.pooling == "mean"
    assert clf.num_outputs == 3 and clf.base_model == "init:gpt2-small" and clf.step == 4
    assert read_run(v1_runs / "lm").data["train_ratio"] == 0.9
    with pytest.raises(CheckpointError, match="training cannot resume"):
        load(v1_runs / "classifier_lora", for_training=True)  # adapters were merged in v1


def test_metadata_round_trips_and_writes_version_2(tmp_path):
    meta = RunMeta(model=GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=2),
                   task="instruct", template="phi3", instruct={"mask_prompt": True}, step=9,
                   base_model="gpt2-small")
    meta.write(tmp_path)
    data = json.loads((tmp_path / "gptforge.json").read_text())
    assert data["version"] == 2 and data["template"] == "phi3"
    assert RunMeta.read(tmp_path) == meta


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"version": 2, "task": "lm"}', "no 'model' object"),
    ('{"version": 2, "model": {"n_layers": "two"}}', "n_layers must be a whole number"),
    ('{"version": 99, "model": {}}', "upgrade gptforge"),
    ('{"version": 2, "task": "dance", "model": {}}', "unknown task 'dance'"),
])
def test_bad_metadata_is_a_checkpoint_error_naming_the_file(tmp_path, content, message):
    (tmp_path / "gptforge.json").write_text(content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_run(tmp_path)
    assert "gptforge.json" in str(err.value)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    save_model(_model(), tmp_path)
    meta = json.loads((tmp_path / "gptforge.json").read_text())
    meta["model"]["emb_dim"] = 32
    (tmp_path / "gptforge.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit its config.*expected"):
        load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="does not have the sha256 recorded"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(tmp_path, verify=False)


def test_errors_share_one_base_class():
    for cls in (CheckpointError, NotFoundError):
        assert issubclass(cls, GptforgeError)
    assert issubclass(NotFoundError, FileNotFoundError) and issubclass(CheckpointError, ValueError)


# ------------------------------------------------------------------------------------
# the prompt template comes from the run, by construction

def _instruct_run(path: Path, template: str) -> Path:
    model = _model(vocab_size=50257, context_length=128)
    save_model(model, path, RunMeta(model=model.cfg, task="instruct", template=template,
                                    instruct={"template": template}, base_model="gpt2-small"))
    return path


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_serving_a_run_uses_its_own_template(tmp_path, monkeypatch, template):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from gptforge.serve.app import background_server, create_app
    from gptforge.serve.engine import Engine

    prompts = []
    submit = Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, prompt, *a, **k: (prompts.append(list(prompt)),
                                                                          submit(self, prompt, *a, **k))[1])
    run = _instruct_run(tmp_path / template, template)
    with background_server(create_app(run)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200
    assert prompts == [text_to_ids(render_chat(MESSAGES, get_template(template)))]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_and_ask_use_the_runs_template(tmp_path, monkeypatch, capsys, template):
    import importlib

    generation = importlib.import_module("gptforge.generate")  # the module, not the function
    seen = []
    real = generation.stream_text

    def spy(model, prompt, *args, **kwargs):
        seen.append(prompt)
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(generation, "stream_text", spy)
    run = _instruct_run(tmp_path / template, template)
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a color.\n"))
    assert main(["chat", "--model", str(run), "--max-new-tokens", "2"]) == 0
    expected = render_chat([{"role": "user", "content": "Name a color."}], get_template(template))
    assert seen == [expected]
    assert f"({template} prompts)" in capsys.readouterr().err

    from gptforge.finetune import instruct

    asked = []
    monkeypatch.setattr(instruct, "generate_responses",
                        lambda model, entries, template, *a, **k: asked.append(template.name) or
                        [{**entries[0], "model_response": "blue"}])
    assert main(["ask", "--model", str(run), "Name a color."]) == 0
    assert asked == [template] and capsys.readouterr().out == "blue\n"
