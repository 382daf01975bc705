"""Shared test setup: where test data comes from, a private cache, small models.

Data reaches tests only through gptforge's own `download`, by way of the `fetch` fixture:
from the mirror when there is one, otherwise from the real URLs. A test whose data no
source can deliver is skipped with a reason, so the suite runs on any machine.

The mirror is, in order: `GPTFORGE_DATA_MIRROR` as the user set it; else the project's
shared data folder next to the checkout, if present. Set `GPTFORGE_TEST_NO_MIRROR=1` to
ignore that folder and run the suite as a machine without it would: from the real URLs, or,
with no internet either, with every data-needing test skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gptforge.download import MIRROR_ENV, RESOURCES, ChecksumError, DownloadError, download

# The one place the suite names the shared data folder: the default mirror, nothing more.
_DEFAULT_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
# Each URL gets this long to answer before the next is tried, so an offline run skips soon.
FETCH_TIMEOUT_S = 10.0


def _test_mirror() -> str | None:
    """The mirror the tests use: the user's `GPTFORGE_DATA_MIRROR` wins over the default."""
    user = os.environ.get(MIRROR_ENV, "").strip()
    if user:
        return user
    if os.environ.get("GPTFORGE_TEST_NO_MIRROR") == "1" or not _DEFAULT_MIRROR.is_dir():
        return None
    return str(_DEFAULT_MIRROR)


# Read once at import, before any test changes the environment.
DATA_MIRROR = _test_mirror()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs_data(*names): the test's code downloads these resources itself (a CLI run, say); "
        "they are fetched first, and the test skips if that is impossible",
    )


@pytest.fixture(autouse=True)
def _data_source(request, tmp_path_factory, monkeypatch):
    """Every test downloads through the test mirror (if any) into a cache of its session.

    Resources named by a `needs_data` mark are fetched into that cache first, so code under
    test finds them there, and the test skips with a reason when they cannot be had.
    """
    if DATA_MIRROR is None:
        monkeypatch.delenv(MIRROR_ENV, raising=False)
    else:
        monkeypatch.setenv(MIRROR_ENV, DATA_MIRROR)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    for mark in request.node.iter_markers("needs_data"):
        for name in mark.args:
            request.getfixturevalue("fetch")(name)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GPTFORGE_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs the internet; set GPTFORGE_NETWORK_TESTS=1")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fetch(tmp_path_factory) -> Callable[[str], Path]:
    """`fetch(name)`: the path of resource `name`, downloaded by gptforge into the session cache.

    When no source delivers it (no mirror, no internet) the calling test is skipped, and
    later tests needing the same resource skip at once instead of trying again. Wrong bytes,
    from a URL or from the mirror, are a failure, not a skip.
    """
    cache = tmp_path_factory.getbasetemp() / "cache"
    unreachable: dict[str, str] = {}

    def fetch(name: str) -> Path:
        if name in unreachable:
            pytest.skip(unreachable[name])
        with pytest.MonkeyPatch.context() as mp:
            if DATA_MIRROR is None:
                mp.delenv(MIRROR_ENV, raising=False)
            else:
                mp.setenv(MIRROR_ENV, DATA_MIRROR)
            try:
                return download(name, cache_dir=cache, progress=False, timeout=FETCH_TIMEOUT_S)
            except ChecksumError:
                raise
            except DownloadError as exc:
                # download's message lists each source tried as "  - source: error".
                tried = [line.strip()[2:] for line in str(exc).splitlines()
                         if line.startswith("  - ")]
                if any("mismatch" in error for error in tried):
                    raise  # a bad mirror copy is wrong bytes, not missing data
                errors = dict.fromkeys(t.split(": ", 1)[-1] for t in tried)  # URLs hold no ": "
                unreachable[name] = (
                    f"needs data {name!r}, which no source delivered ({'; '.join(errors)}); "
                    f"set {MIRROR_ENV} to a folder holding {RESOURCES[name].path!r}, "
                    "or connect to the internet"
                )
        pytest.skip(unreachable[name])

    return fetch


@pytest.fixture
def tiny_cfg():
    from gptforge import GPTConfig

    return GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                     drop_rate=0.0)


@pytest.fixture
def verdict_text(fetch) -> str:
    return fetch("the-verdict").read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def current_checkpoint(run: Path) -> Path:
    """The directory of a training run's current checkpoint (its weights and training state)."""
    import json

    return run / json.loads((run / "gptforge.json").read_text())["checkpoint"]


def save_lm_and_classifier(root: Path, cfg) -> dict[str, Path]:
    """A random language model of `cfg` and a ham/spam classifier on the same weights, saved
    as gptforge directories root/tiny-lm and root/tiny-clf (the serving tests use both)."""
    from torch import nn

    from gptforge import GPTModel
    from gptforge.checkpoint import ClassifierSettings, RunMeta, save_model

    torch.manual_seed(0)
    model = GPTModel(cfg)
    save_model(model, root / "tiny-lm")
    model.out_head = nn.Linear(cfg.emb_dim, 2)
    save_model(model, root / "tiny-clf", RunMeta(model=cfg, task="classifier",
                                                 classifier=ClassifierSettings(["ham", "spam"])))
    return {"lm": root / "tiny-lm", "clf": root / "tiny-clf"}


def _tokenizer_fixture_script():
    """scripts/make_tokenizer_fixtures.py as a module (scripts/ is not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_tokenizer_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_tokenizer_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, fetch) -> Callable[[str], Path]:
    """`tokenizer_dir(family)`: a Hugging Face tokenizer directory of a real model family
    ("llama3", "qwen3", "phi3", "gpt2", "gemma4"), built from llama.cpp's GGUF vocabulary on
    first use (see scripts/make_tokenizer_fixtures.py)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf", reason="building tokenizers from GGUF files needs the `gguf` package")
    script = _tokenizer_fixture_script()
    root = tmp_path_factory.mktemp("hf-tokenizers")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = script.build_fixture(family, root, fetch)
        return built[family]

    return get


def _single_thread():
    """Tiny models gain nothing from a second thread; on a busy machine it mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# `pytestmark = pytest.mark.usefixtures("one_thread")`: a module's tests on one thread.
one_thread = pytest.fixture(scope="module")(_single_thread)
one_thread_each = pytest.fixture(_single_thread)  # the same, set again for every test
