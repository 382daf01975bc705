"""Safe loading and kept checkpoints: sha256 and NaN checks on weights, refused or damaged
training state, a diverging run stopped with its last good checkpoint, checkpoint rotation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import current_checkpoint
from gptforge import GPTConfig, GPTModel, load
from gptforge.checkpoint import save_model
from gptforge.cli import main
from gptforge.errors import CheckpointError

TINY = ["--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "32", "--no-progress",
        "--device", "cpu"]


def _saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(GPTModel(GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1)),
                      tmp_path / "model")


def test_weights_carry_a_sha256_that_is_checked(tmp_path):
    model_dir = _saved(tmp_path)
    meta = json.loads((model_dir / "gptforge.json").read_text())
    assert len(meta["sha256"]["model.safetensors"]) == 64
    tensors = load_file(model_dir / "model.safetensors")
    tensors["final_norm.bias"] += 1.0  # a changed file that still parses
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not have the sha256 recorded"):
        load(model_dir)
    load(model_dir, verify=False)  # skippable, for speed or on purpose


def test_weights_holding_nan_are_refused_with_the_tensor_named(tmp_path, capsys):
    model_dir = _saved(tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["blocks.0.ff.fc.weight"][0, 0] = float("nan")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    meta = json.loads((model_dir / "gptforge.json").read_text())
    del meta["sha256"]  # as a file written by gptforge 0.1, which had no sha256
    (model_dir / "gptforge.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in blocks\.0\.ff\.fc\.weight"):
        load(model_dir)
    assert main(["generate", "--model", str(model_dir), "--prompt", "x"]) == 2
    assert "NaN" in capsys.readouterr().err


@pytest.mark.needs_data("the-verdict")
@pytest.mark.parametrize("content, message", [(b"", "not a readable training state"),
                                              (b"garbage" * 10, "not a readable training state")])
def test_a_damaged_training_state_is_one_clear_error(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--max-steps", "2", "--out", str(run)]) == 0
    (current_checkpoint(run) / "training_state.pt").write_bytes(content)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--max-steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "training_state.pt" in err and "Traceback" not in err


@pytest.mark.needs_data("the-verdict")
def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["pretrain", *TINY, "--max-steps", "30", "--save-every", "1", "--eval-every", "100",
                 "--lr", "1e12", "--grad-clip", "0", "--out", str(run)])
    assert code == 2
    err = capsys.readouterr().err
    assert "the training loss became" in err and "lower --lr" in err
    kept = json.loads((run / "gptforge.json").read_text())["step"]
    assert kept is not None and kept < 30
    model = load(run)  # the kept checkpoint is whole and finite (load checks for NaN)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.needs_data("the-verdict")
def test_checkpoints_rotate_and_the_current_one_is_named(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--max-steps", "6", "--save-every", "2", "--keep-last", "2",
                 "--eval-every", "2", "--out", str(run)]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-0000004", "step-0000006"]  # step 0's starting checkpoint is gone too
    assert json.loads((run / "gptforge.json").read_text())["checkpoint"] == "checkpoints/step-0000006"
    assert (run / "best" / "model.safetensors").is_file()
