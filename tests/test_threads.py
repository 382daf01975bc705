"""`--threads`: every command that computes takes it, sets PyTorch's thread count for the
run, and leaves the count as it was afterwards."""

from __future__ import annotations

import argparse
import importlib

import pytest
import torch

from gptforge import GPTModel
from gptforge.checkpoint import save_model
from gptforge.cli import NO_COMPUTE, build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
                if nested:
                    yield from _commands(command, f"{prefix}{name} ")
                else:
                    yield f"{prefix}{name}", command


def test_every_computing_command_takes_threads():
    commands = dict(_commands(build_parser()))
    assert {"pretrain", "generate", "evaluate", "finetune classify", "finetune instruct", "chat",
            "ask", "serve", "prepare", "convert"} <= set(commands)
    for name, command in commands.items():
        has = "--threads" in command._option_string_actions
        assert has == (name not in NO_COMPUTE), name


def test_threads_apply_during_the_command_and_are_restored(tmp_path, tiny_cfg, monkeypatch, capsys):
    save_model(GPTModel(tiny_cfg), tmp_path / "m")
    seen = []
    generation = importlib.import_module("gptforge.generate")  # the module, not the function
    real_stream = generation.stream_text

    def watching(*args, **kwargs):
        seen.append(torch.get_num_threads())
        yield from real_stream(*args, **kwargs)

    monkeypatch.setattr(generation, "stream_text", watching)
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Every effort",
                 "--max-new-tokens", "3", "--threads", str(wanted)]) == 0
    assert torch.get_num_threads() == before
    assert seen and set(seen) == {wanted}


def test_threads_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # argparse's own usage error
        main(["generate", "--model", str(tmp_path), "--prompt", "x", "--threads", "0"])
    assert exit.value.code == 2 and "--threads" in capsys.readouterr().err
