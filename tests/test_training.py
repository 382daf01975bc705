"""The shared training loop: exact resume, Ctrl-C, LR schedule, many processes, the pretrain CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import current_checkpoint
from gptforge import GPTConfig, GPTModel, load
from gptforge.checkpoint import RunMeta
from gptforge.cli import main
from gptforge.data import GPTDataset, ResumableBatchSampler
from gptforge.training import TrainConfig, Trainer, lm_loss

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "32"]


def _datasets(text):
    text = text[:6000]  # about 1500 tokens: a few short epochs
    split = int(0.9 * len(text))
    return GPTDataset(text[:split], max_length=32, stride=32), GPTDataset(text[split:], max_length=32, stride=32)


def _trainer(model, text, out, loss_fn=lm_loss, **cfg):
    train, val = _datasets(text)
    settings = dict(epochs=2, batch_size=4, eval_every=1, eval_batches=2, lr=1e-3, keep_last=0)
    return Trainer(model, train, val, loss_fn, TrainConfig(**{**settings, **cfg}), out,
                   RunMeta(model=model.cfg))


def _tiny_model(seed=0, drop=0.1):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=drop))


def _losses(history, from_step):
    return [(r["step"], r["loss"], r["train_loss"], r["val_loss"]) for r in history if r["step"] > from_step]


def test_resume_continues_exactly(tmp_path, verdict_text):
    # Dropout on, so a wrong RNG state after resuming would show in the losses.
    full = _trainer(_tiny_model(), verdict_text, tmp_path / "full").fit()
    steps = full.step
    k = steps // 2 + 1  # mid-epoch
    paused = _trainer(_tiny_model(), verdict_text, tmp_path / "run", stop_after=k).fit()
    assert paused.interrupted and paused.step == k
    resumed_trainer = _trainer(load(tmp_path / "run", for_training=True), verdict_text, tmp_path / "run")
    resumed_trainer.resume()
    resumed = resumed_trainer.fit()
    assert resumed.step == steps
    assert _losses(resumed.history, k) == _losses(full.history, k)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, verdict_text):
    full = _trainer(_tiny_model(), verdict_text, tmp_path / "full", epochs=1).fit()
    calls = {"n": 0}

    def interrupting_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of step 4 (evaluations also call the loss)
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    trainer = _trainer(_tiny_model(), verdict_text, tmp_path / "run", loss_fn=interrupting_loss, epochs=1)
    trainer.evaluate = lambda loader, max_batches=None: {"loss": 0.0}  # count training calls only
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = json.loads((tmp_path / "run" / "gptforge.json").read_text())["step"]
    assert saved == 3
    again = _trainer(load(tmp_path / "run", for_training=True), verdict_text, tmp_path / "run", epochs=1)
    again.resume()
    result = again.fit()
    assert _losses(result.history, 3) == _losses(full.history, 3)


def test_warmup_then_cosine_decay(tmp_path, verdict_text):
    trainer = _trainer(_tiny_model(), verdict_text, tmp_path, max_steps=20, warmup_steps=5,
                       lr=1e-3, min_lr=1e-4)
    factors = [trainer._lr_factor(s) for s in range(20)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert factors[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:]))
    assert trainer._lr_factor(20) == pytest.approx(0.1)


def test_sampler_shards_global_batches():
    one = list(ResumableBatchSampler(20, 4, True, True, seed=3))
    r0 = list(ResumableBatchSampler(20, 4, True, True, seed=3, rank=0, world_size=2))
    r1 = list(ResumableBatchSampler(20, 4, True, True, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == one
    later = ResumableBatchSampler(20, 4, True, True, seed=3)
    later.start_batch = 2
    assert list(later) == one[2:]


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, verdict_text):
    ta = _trainer(_tiny_model(drop=0.0), verdict_text, tmp_path / "a", batch_size=4, max_steps=3)
    tb = _trainer(_tiny_model(drop=0.0), verdict_text, tmp_path / "b", batch_size=2, grad_accum=2,
                  max_steps=3)
    a, b = ta.fit(), tb.fit()
    # Batches of 4 are cut from the same shuffled order as two micro-batches of 2.
    assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], abs=1e-5)
    for pa, pb in zip(ta.model.parameters(), tb.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_device_auto_selection_and_auto_precision(monkeypatch):
    from gptforge.runtime import autocast_dtype, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun, each process takes its own GPU
    assert pick_device("auto") == torch.device("cuda", 3)
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None  # the CPU trains in float32 unless asked
    assert autocast_dtype("fp32", torch.device("cuda", 0)) is None
    with pytest.raises(ValueError, match="precision must be"):
        autocast_dtype("fp16", torch.device("cpu"))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_sets_the_matmul_dtype_and_keeps_float32_weights(tmp_path, verdict_text, precision, dtype):
    model = _tiny_model(drop=0.0)
    seen = set()
    model.out_head.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    trainer = _trainer(model, verdict_text, tmp_path / "run", precision=precision, device="cpu",
                       epochs=3, eval_every=100, lr=1e-2)
    history = trainer.fit().history
    assert seen == {dtype}  # under bf16 autocast the logits come out of a bfloat16 matmul
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights
    assert history[-1]["loss"] < history[0]["loss"] - 1.0


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
def test_compiled_training_matches_eager(tmp_path, verdict_text):
    eager = _trainer(_tiny_model(drop=0.0), verdict_text, tmp_path / "eager", max_steps=4).fit()
    trainer = _trainer(_tiny_model(drop=0.0), verdict_text, tmp_path / "compiled", max_steps=4, compile=True)
    assert hasattr(trainer.train_model, "_orig_mod")  # wrapped by torch.compile
    compiled = trainer.fit()
    assert [r["loss"] for r in compiled.history] == pytest.approx([r["loss"] for r in eager.history],
                                                                  rel=1e-4)


@pytest.mark.needs_data("the-verdict")
def test_pretrain_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--max-steps", "4", "--eval-every", "2", "--out", str(out),
                 "--no-progress"]) == 0
    for name in ("gptforge.json", "metrics.jsonl", "loss.png", "train_config.json"):
        assert (out / name).is_file(), name
    current = out / json.loads((out / "gptforge.json").read_text())["checkpoint"]
    assert current.parent.name == "checkpoints"
    for name in ("model.safetensors", "gptforge.json", "training_state.pt"):
        assert (current / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3, 4]
    assert {"step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(records[0])
    model = load(str(out))
    assert model.cfg.n_layers == 2 and model.cfg.context_length == 32
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "Every effort moves you",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")
    # Resuming with a bigger budget continues from step 4.
    assert main(["pretrain", "--resume", str(out), "--max-steps", "6", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6


@pytest.mark.needs_data("the-verdict")
def test_pretrain_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    main(["pretrain", *TINY, "--max-steps", "1", "--out", str(out), "--no-progress"])
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_pretrain_on_a_token_file(tmp_path, verdict_text):
    (tmp_path / "a.txt").write_text(verdict_text)
    tokens = tmp_path / "tokens.bin"
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tokens)]) == 0
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(tokens), "--max-steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    assert (current_checkpoint(out) / "model.safetensors").is_file()


def _run_cli(args, env_extra, nproc=None):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **env_extra}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "gptforge.cli", *args]
    else:
        cmd = [sys.executable, "-m", "gptforge.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.needs_data("the-verdict")
def test_two_process_gloo_run_matches_one_process(tmp_path):
    common = [*TINY, "--dropout", "0", "--max-steps", "5", "--batch-size", "4", "--eval-every", "1",
              "--eval-batches", "1", "--no-progress", "--device", "cpu"]
    env = {}  # the child processes inherit the test's mirror and cache settings
    _run_cli(["pretrain", *common, "--out", str(tmp_path / "one")], env)
    _run_cli(["pretrain", *common, "--out", str(tmp_path / "two")], env, nproc=2)

    def curve(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = curve("one"), curve("two")
    assert len(one) == len(two) == 5
    assert one == pytest.approx(two, abs=1e-4)
