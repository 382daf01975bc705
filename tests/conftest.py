"""Shared test setup: offline data mirror, a private cache, small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_data(tmp_path_factory, monkeypatch):
    """Every test downloads from ../shared/data into a cache of its session, never the web."""
    if SHARED_DATA.is_dir():
        monkeypatch.setenv("GPTFORGE_DATA_MIRROR", str(SHARED_DATA))
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GPTFORGE_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs the internet; set GPTFORGE_NETWORK_TESTS=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg():
    from gptforge import GPTConfig

    return GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                     drop_rate=0.0)


@pytest.fixture
def verdict_text() -> str:
    path = SHARED_DATA / "the-verdict.txt"
    if not path.is_file():
        pytest.skip("../shared/data is not here")
    return path.read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
