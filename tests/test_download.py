"""Tests for gptforge.download against a real HTTP server on 127.0.0.1, including its failures."""

from __future__ import annotations

import errno
import hashlib
import socket
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gptforge import download as dl
from gptforge.download import (
    ChecksumError,
    DownloadError,
    Resource,
    download,
    download_gpt2,
    extract_member,
    gpt2_resources,
)

Fetch = Callable[[str], Path]  # conftest's `fetch` fixture

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes, several read chunks


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ServerState:
    """What the test server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    # path -> queue of byte counts: each request pops one and closes after that many body bytes
    cut_after: dict[str, list[int]] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    """Serves `ServerState.files` with Range support, 404s, slow replies and cut transfers."""

    server: ThreadingHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append((path, range_header))
            cuts = state.cut_after.get(path)
            cut = cuts.pop(0) if cuts else None
        self.close_connection = True
        if path in state.slow:
            time.sleep(state.slow[path])
        if path in state.missing or path not in state.files:
            self.send_error(404)
            return
        data = state.files[path]
        start = 0
        if range_header:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))  # the full length, even when cut
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test); nothing to report

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@dataclass
class LocalServer:
    state: ServerState
    base: str

    def url(self, path: str) -> str:
        return self.base + path

    def serve(self, path: str, data: bytes) -> str:
        self.state.files[path] = data
        return self.url(path)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield LocalServer(httpd.state, f"http://{host}:{port}")  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("GPTFORGE_CACHE", str(cache_dir))
    monkeypatch.delenv("GPTFORGE_DATA_MIRROR", raising=False)
    return cache_dir


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens, so connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


def no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the network was used")


def test_plain_download_verifies_sha256(server: LocalServer, cache: Path) -> None:
    url = server.serve("/data/file.bin", PAYLOAD)
    res = Resource("test", (url,), "sub/file.bin", sha256=sha256(PAYLOAD), size=len(PAYLOAD))

    path = download(res, progress=False)

    assert path == cache / "sub" / "file.bin"
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("file.bin.part").exists()


def test_complete_file_is_not_fetched_again(server: LocalServer, cache: Path) -> None:
    url = server.serve("/file.bin", PAYLOAD)
    res = Resource("test", (url,), "file.bin", sha256=sha256(PAYLOAD), size=len(PAYLOAD))

    first = download(res, progress=False)
    second = download(res, progress=False)

    assert first == second
    assert server.state.hits("/file.bin") == 1


def test_invalid_cached_file_is_fetched_again(server: LocalServer, cache: Path) -> None:
    url = server.serve("/file.bin", PAYLOAD)
    res = Resource("test", (url,), "file.bin", sha256=sha256(PAYLOAD), size=len(PAYLOAD))
    cache.mkdir()
    (cache / "file.bin").write_bytes(b"stale")

    assert download(res, progress=False).read_bytes() == PAYLOAD
    assert server.state.hits("/file.bin") == 1


def test_interrupted_transfer_resumes_with_range(server: LocalServer, cache: Path) -> None:
    half = len(PAYLOAD) // 2
    url = server.serve("/file.bin", PAYLOAD)
    server.state.cut_after["/file.bin"] = [half]
    res = Resource("test", (url,), "file.bin", sha256=sha256(PAYLOAD), size=len(PAYLOAD))

    path = download(res, progress=False)

    assert path.read_bytes() == PAYLOAD
    assert server.state.ranges("/file.bin") == [None, f"bytes={half}-"]


def test_partial_file_survives_and_next_call_resumes(server: LocalServer, cache: Path) -> None:
    url = server.serve("/file.bin", PAYLOAD)
    # Every attempt of the first call delivers only 1000 more bytes.
    server.state.cut_after["/file.bin"] = [1000] * (dl._RESUME_RETRIES + 1)
    res = Resource("test", (url,), "file.bin", sha256=sha256(PAYLOAD), size=len(PAYLOAD))

    with pytest.raises(DownloadError, match="interrupted"):
        download(res, progress=False)
    part = cache / "file.bin.part"
    kept = 1000 * (dl._RESUME_RETRIES + 1)
    assert part.stat().st_size == kept
    assert not (cache / "file.bin").exists()

    assert download(res, progress=False).read_bytes() == PAYLOAD
    assert server.state.ranges("/file.bin")[-1] == f"bytes={kept}-"
    assert not part.exists()


def test_short_transfer_without_known_size_is_caught(server: LocalServer, cache: Path) -> None:
    url = server.serve("/file.bin", PAYLOAD)
    server.state.cut_after["/file.bin"] = [100] * (dl._RESUME_RETRIES + 1)
    res = Resource("test", (url,), "file.bin")  # no sha256, no size: Content-Length decides

    with pytest.raises(DownloadError, match="interrupted"):
        download(res, progress=False)
    assert not (cache / "file.bin").exists()
    assert download(res, progress=False).read_bytes() == PAYLOAD


def test_unresumable_partial_file_restarts_cleanly(server: LocalServer, cache: Path) -> None:
    url = server.serve("/file.bin", PAYLOAD)
    res = Resource("test", (url,), "file.bin", sha256=sha256(PAYLOAD))  # size unknown
    cache.mkdir()
    # A partial file longer than the served data: the server answers 416 to the Range request.
    (cache / "file.bin.part").write_bytes(b"x" * (len(PAYLOAD) + 10))

    assert download(res, progress=False).read_bytes() == PAYLOAD
    assert server.state.ranges("/file.bin") == [f"bytes={len(PAYLOAD) + 10}-", None]


def test_404_on_primary_falls_back_to_backup(server: LocalServer, cache: Path) -> None:
    backup = server.serve("/backup/file.bin", PAYLOAD)
    primary = server.url("/primary/file.bin")
    res = Resource("test", (primary, backup), "file.bin", sha256=sha256(PAYLOAD))

    assert download(res, progress=False).read_bytes() == PAYLOAD
    assert server.state.hits("/primary/file.bin") == 1
    assert server.state.hits("/backup/file.bin") == 1


def test_timeout_falls_back_to_backup(server: LocalServer, cache: Path) -> None:
    primary = server.serve("/slow/file.bin", PAYLOAD)
    server.state.slow["/slow/file.bin"] = 1.0
    backup = server.serve("/fast/file.bin", PAYLOAD)
    res = Resource("test", (primary, backup), "file.bin", sha256=sha256(PAYLOAD))

    assert download(res, progress=False, timeout=0.2).read_bytes() == PAYLOAD
    assert server.state.hits("/fast/file.bin") == 1


def test_corrupted_file_is_detected_and_deleted(server: LocalServer, cache: Path) -> None:
    corrupted = b"\xff" + PAYLOAD[1:]
    url = server.serve("/file.bin", corrupted)
    res = Resource("test", (url,), "file.bin", sha256=sha256(PAYLOAD), size=len(PAYLOAD))

    with pytest.raises(ChecksumError) as info:
        download(res, progress=False)

    message = str(info.value)
    assert "checksum" in message
    assert sha256(PAYLOAD) in message and sha256(corrupted) in message
    assert url in message
    assert not (cache / "file.bin").exists()
    assert not (cache / "file.bin.part").exists()


def test_corrupted_primary_falls_back_to_good_backup(server: LocalServer, cache: Path) -> None:
    primary = server.serve("/bad/file.bin", b"\xff" + PAYLOAD[1:])
    backup = server.serve("/good/file.bin", PAYLOAD)
    res = Resource("test", (primary, backup), "file.bin", sha256=sha256(PAYLOAD))

    assert download(res, progress=False).read_bytes() == PAYLOAD


def test_offline_error_names_urls_sha256_and_path(closed_port_url: str, cache: Path) -> None:
    backup = closed_port_url.replace("file.bin", "backup.bin")
    res = Resource("test", (closed_port_url, backup), "dir/file.bin", sha256="ab" * 32, size=10)

    with pytest.raises(DownloadError) as info:
        download(res, progress=False)

    message = str(info.value)
    assert not isinstance(info.value, ChecksumError)
    assert closed_port_url in message and backup in message
    assert "ab" * 32 in message
    assert str(cache / "dir" / "file.bin") in message
    assert "GPTFORGE_DATA_MIRROR" in message


def test_disk_full_gives_a_clear_message(
    server: LocalServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.serve("/file.bin", PAYLOAD)
    res = Resource("test", (url,), "file.bin", size=len(PAYLOAD))

    class FullDisk:
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "open", FullDisk, raising=False)
    with pytest.raises(DownloadError, match="Disk full") as info:
        download(res, progress=False)
    assert "GPTFORGE_CACHE" in str(info.value)


def mirror_of(folder: Path, fetch: Fetch, *names: str) -> Path:
    """A mirror folder in `folder` holding real copies of the named resources at their paths."""
    folder.mkdir()
    for name in names:
        (folder / dl.RESOURCES[name].path).write_bytes(fetch(name).read_bytes())
    return folder


def test_local_mirror_serves_the_verdict_without_network(
    cache: Path, tmp_path: Path, fetch: Fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = mirror_of(tmp_path / "mirror", fetch, "the-verdict")
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", str(mirror))
    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)

    path = download("the-verdict", progress=False)

    assert path == cache / "the-verdict.txt"
    assert dl.file_sha256(path) == dl.RESOURCES["the-verdict"].sha256


def test_sms_member_is_extracted_and_verified(
    cache: Path, tmp_path: Path, fetch: Fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = mirror_of(tmp_path / "mirror", fetch, "sms-spam-collection")
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", str(mirror))
    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)

    member = extract_member("sms-spam-collection", progress=False)

    assert member == cache / "SMSSpamCollection"
    assert dl.file_sha256(member) == dl.RESOURCES["sms-spam-collection"].member_sha256
    # Once extracted, the member is reused even if the archive is gone.
    (cache / "sms+spam+collection.zip").unlink()
    monkeypatch.delenv("GPTFORGE_DATA_MIRROR")
    assert extract_member("sms-spam-collection", progress=False) == member


def test_bad_zip_member_deletes_archive(server: LocalServer, cache: Path, tmp_path: Path) -> None:
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("DATA", b"not the expected data")
    url = server.serve("/archive.zip", archive.read_bytes())
    res = Resource("zip", (url,), "archive.zip", member="DATA", member_sha256="0" * 64)

    with pytest.raises(ChecksumError, match="0" * 64):
        extract_member(res, progress=False)
    assert not (cache / "archive.zip").exists()
    assert not (cache / "DATA").exists()


def test_local_mirror_miss_falls_through_to_url(
    server: LocalServer, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "bad.bin").write_bytes(b"wrong bytes")
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", str(mirror))
    url = server.serve("/bad.bin", PAYLOAD)
    res = Resource("test", (url,), "bad.bin", sha256=sha256(PAYLOAD))

    assert download(res, progress=False).read_bytes() == PAYLOAD
    assert server.state.hits("/bad.bin") == 1


def test_http_mirror_is_tried_first(
    server: LocalServer, cache: Path, closed_port_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.serve("/mirror/some%2Bname.bin", PAYLOAD)  # stored as the client quotes it
    server.serve("/mirror/some+name.bin", PAYLOAD)
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", server.url("/mirror/"))
    res = Resource("test", (closed_port_url,), "some+name.bin", sha256=sha256(PAYLOAD))

    assert download(res, progress=False).read_bytes() == PAYLOAD
    assert sum(server.state.hits(p) for p in ("/mirror/some%2Bname.bin", "/mirror/some+name.bin")) == 1


def test_http_mirror_miss_falls_through_to_url(
    server: LocalServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", server.url("/mirror"))
    url = server.serve("/real/file.bin", PAYLOAD)
    res = Resource("test", (url,), "file.bin", sha256=sha256(PAYLOAD))

    assert download(res, progress=False).read_bytes() == PAYLOAD
    assert server.state.hits("/mirror/file.bin") == 1


def test_gpt2_resources_layout() -> None:
    openai = gpt2_resources("355M")
    assert [Path(r.path).name for r in openai] == [
        "checkpoint",
        "hparams.json",
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
        "model.ckpt.meta",
        "encoder.json",
        "vocab.bpe",
    ]
    hparams = openai[1]
    assert hparams.path == "gpt2/355M/hparams.json"
    assert hparams.urls == (
        "https://openaipublic.blob.core.windows.net/gpt-2/models/355M/hparams.json",
        "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/355M/hparams.json",
    )
    assert hparams.sha256 is None and hparams.size is None

    hf = gpt2_resources("1558M", fmt="hf")
    assert [r.path for r in hf] == ["hf/gpt2-xl/model.safetensors", "hf/gpt2-xl/config.json"]
    assert hf[0].urls == (
        "https://huggingface.co/openai-community/gpt2-xl/resolve/main/model.safetensors",
    )
    with pytest.raises(ValueError, match="124M"):
        gpt2_resources("7B")
    with pytest.raises(ValueError, match="hf"):
        gpt2_resources("124M", fmt="pickle")


def test_download_gpt2_from_http_mirror(
    server: LocalServer, cache: Path, fetch: Fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the tokenizer files have known checksums, so only they must be the real bytes.
    real = {"encoder.json": "gpt2-encoder", "vocab.bpe": "gpt2-vocab"}
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", server.url("/mirror"))
    for res in gpt2_resources("124M"):
        name = Path(res.path).name
        data = fetch(real[name]).read_bytes() if res.sha256 else f"fake {name}".encode()
        server.serve(f"/mirror/{res.path}", data)

    folder = download_gpt2("124M", progress=False)

    assert folder == cache / "gpt2" / "124M"
    assert (folder / "hparams.json").read_bytes() == b"fake hparams.json"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        Path(r.path).name for r in gpt2_resources("124M")
    )


def test_unknown_resource_name_lists_known_ones(cache: Path) -> None:
    with pytest.raises(ValueError, match="the-verdict"):
        download("no-such-thing", progress=False)


def test_resource_table_matches_sources() -> None:
    assert {"the-verdict", "sms-spam-collection", "instruction-data",
            "instruction-data-with-preference", "tinyshakespeare", "gpt2-encoder",
            "gpt2-vocab"} <= set(dl.RESOURCES)
    sms = dl.RESOURCES["sms-spam-collection"]
    assert sms.sha256 is None and sms.member == "SMSSpamCollection"
    assert len(sms.urls) == 2


@pytest.mark.parametrize("name", [n for n, r in dl.RESOURCES.items() if r.sha256])
def test_resource_checksums_match_the_files(name: str, fetch: Fetch) -> None:
    """The table's sizes and hashes are those of the files the mirror or the URLs deliver."""
    res = dl.RESOURCES[name]
    copy = fetch(name)  # wrong bytes fail here, with both hashes in the message
    assert copy.stat().st_size == res.size
    assert dl.file_sha256(copy) == res.sha256
