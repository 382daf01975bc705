"""`gptforge download` / `generate --model gpt2-small` against a real HTTP server on 127.0.0.1.

The server plays OpenAI's host (primary URL) and the backup host, serving the tiny
checkpoint that tests/fixtures/tf_gpt2_tiny holds in OpenAI's exact layout.
"""

from pathlib import Path

import pytest

import gptforge.download as dl
from gptforge.cli import main
from test_download import cache, server  # noqa: F401 (pytest fixtures)

FIXTURE = Path(__file__).parent / "fixtures" / "tf_gpt2_tiny"
FILES = ["checkpoint", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
         "model.ckpt.meta"]


@pytest.fixture
def hosts(server, monkeypatch, fetch):  # noqa: F811
    monkeypatch.delenv("GPTFORGE_DATA_MIRROR", raising=False)
    monkeypatch.setattr(dl, "_OPENAI_GPT2", server.url("/openai/gpt-2/models"))
    monkeypatch.setattr(dl, "_BACKBLAZE", server.url("/backup"))
    for name in FILES:
        server.serve(f"/openai/gpt-2/models/124M/{name}", (FIXTURE / name).read_bytes())
        server.serve(f"/backup/gpt2/124M/{name}", (FIXTURE / name).read_bytes())
    for name, resource in (("encoder.json", "gpt2-encoder"), ("vocab.bpe", "gpt2-vocab")):
        server.serve(f"/openai/gpt-2/models/124M/{name}", fetch(resource).read_bytes())
    return server


def test_download_then_generate_with_a_preset_name(hosts, cache, capsys):  # noqa: F811
    data = "/openai/gpt-2/models/124M/model.ckpt.data-00000-of-00001"
    hosts.state.cut_after[data] = [5000]  # the first transfer breaks off after 5000 bytes
    hosts.state.missing.add("/openai/gpt-2/models/124M/model.ckpt.index")  # primary 404s
    assert main(["download", "gpt2-small"]) == 0
    folder = cache / "gpt2" / "124M"
    for name in FILES:
        assert (folder / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    assert hosts.state.ranges(data)[-1] == "bytes=5000-"  # resumed, not restarted
    assert hosts.state.hits("/backup/gpt2/124M/model.ckpt.index") == 1  # the fallback
    before = len(hosts.state.requests)
    capsys.readouterr()
    # A preset name loads the downloaded files; complete files are not fetched again.
    assert main(["generate", "--model", "gpt2-small", "--prompt", "a", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("a")
    assert len(hosts.state.requests) == before


def test_corrupted_download_is_detected_and_removed(hosts, cache, fetch):  # noqa: F811
    good = fetch("gpt2-vocab").read_bytes()
    hosts.serve("/openai/gpt-2/models/124M/vocab.bpe", good[:-10] + b"corrupted!")
    hosts.state.missing.add("/backup/gpt2/124M/vocab.bpe")
    assert main(["download", "gpt2-small"]) == 2
    assert not (cache / "gpt2" / "124M" / "vocab.bpe").exists()
    assert not (cache / "gpt2" / "124M" / "vocab.bpe.part").exists()


def test_unknown_download_name_is_a_clear_error(capsys):
    assert main(["download", "gpt7"]) == 2
    assert "unknown download 'gpt7'" in capsys.readouterr().err


@pytest.mark.network
def test_real_openai_weights(tmp_path, monkeypatch, capsys):
    """Downloads OpenAI's 124M checkpoint for real (needs the internet)."""
    monkeypatch.delenv("GPTFORGE_DATA_MIRROR", raising=False)
    assert main(["download", "gpt2-small"]) == 0
    assert main(["generate", "--model", "gpt2-small", "--prompt", "Every effort moves you",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.count("Every effort moves you") >= 1
