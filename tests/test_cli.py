"""The thin CLI layer: info, evaluate, errors."""

import json
import math

import pytest

from gptforge import GPTModel
from gptforge.checkpoint import save_model
from gptforge.cli import main


def test_info_of_a_preset(capsys):
    assert main(["info", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out  # stored (tied head counted once)
    assert "163,037,184" in out  # with the head counted separately
    assert "GiB" in out


def test_info_of_a_checkpoint(tmp_path, capsys, tiny_cfg):
    save_model(GPTModel(tiny_cfg), tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    assert '"n_layers": 2' in capsys.readouterr().out


def test_evaluate_reports_loss_and_perplexity(tmp_path, capsys, tiny_cfg, verdict_text):
    save_model(GPTModel(tiny_cfg), tmp_path / "m")
    (tmp_path / "t.txt").write_text(verdict_text[:3000])
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert 9.0 < result["loss"] < 12.0  # an untrained model is near ln(50257) = 10.8


def test_errors_are_messages_not_tracebacks(tmp_path, capsys, tiny_cfg):
    save_model(GPTModel(tiny_cfg), tmp_path / "m")
    long_prompt = "word " * 100
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", long_prompt]) == 2
    assert "context length" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["pretrain", "--model", "gpt9", "--max-steps", "1"]) == 2
    assert "gpt9" in capsys.readouterr().err
