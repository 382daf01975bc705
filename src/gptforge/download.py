"""Fetch the files the project needs (data sets, tokenizer files, GPT-2 weights) into a local cache.

Every feature that needs a file calls `download` with a `Resource`: a name, a list of URLs
(primary first, then backups), a relative path inside the cache, and, where known, the
expected size and sha256. Files are streamed to `<path>.part`, resumed with an HTTP Range
request after an interrupted transfer, verified, and only then renamed to their final name,
so a file under its final name is always complete.

Two environment variables steer it:

- `GPTFORGE_CACHE`: the cache folder (default `~/.cache/gptforge`).
- `GPTFORGE_DATA_MIRROR`: a local folder or an http(s) base URL holding files at their
  relative paths; it is tried before the real URLs, and a miss falls through to them.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from tqdm.auto import tqdm

from gptforge.errors import BadInputError, DownloadError  # DownloadError is part of this API
from gptforge.fileio import file_sha256  # noqa: F401  (part of this module's API too)

logger = logging.getLogger(__name__)

__all__ = [
    "RESOURCES",
    "ChecksumError",
    "DownloadError",
    "Resource",
    "default_cache_dir",
    "download",
    "download_gpt2",
    "extract_member",
    "file_sha256",
    "gpt2_resources",
]

PathLike = Union[str, os.PathLike[str]]

CACHE_ENV = "GPTFORGE_CACHE"
MIRROR_ENV = "GPTFORGE_DATA_MIRROR"

_CHUNK_SIZE = 1 << 16
# An interrupted transfer is resumed this many times from the same URL before moving on.
_RESUME_RETRIES = 2
_USER_AGENT = "gptforge (python urllib)"


class ChecksumError(DownloadError):
    """A fetched file did not have the expected sha256 or size; the bad file was deleted."""


@dataclass(frozen=True)
class Resource:
    """One downloadable file: where it lives online, where it goes locally, and how to check it.

    `urls` lists the primary URL first, then backups. `path` is the file's relative path in
    the cache and in a mirror. `sha256` and `size` are checked when known; when the size is
    unknown the byte count is checked against the server's Content-Length instead. For a zip
    archive whose own bytes may differ between hosts, leave `sha256` unset and name the
    archive `member` to extract, with its `member_sha256`, for `extract_member` to verify.
    """

    name: str
    urls: tuple[str, ...]
    path: str
    sha256: str | None = None
    size: int | None = None
    member: str | None = None
    member_sha256: str | None = None


_RAW_BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_OPENAI_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/models"
_BACKBLAZE = "https://f001.backblazeb2.com/file/LLMs-from-scratch"
_HF_BASE = "https://huggingface.co/openai-community"

_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_ENCODER_SIZE = 1042301
_VOCAB_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_VOCAB_SIZE = 456318

# Evaluation data sets (gptforge.evaluation), each from the source lm-evaluation-harness, nanoGPT
# or llm.c read it from. Their publishers give no checksums and gptforge has not yet fetched
# them from the real URLs, so `sha256` stays None: a download is checked against the server's
# Content-Length, and every evaluation records the sha256 of the files it read in eval.json.
# Pin a hash here only after computing it from a real download.
_ROWANZ = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
_ARC_ZIP = ("https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip",
            "https://s3-us-west-2.amazonaws.com/ai2-website/data/ARC-V1-Feb2018.zip")
_PIQA = "https://yonatanbisk.com/piqa/data"
_WINOGRANDE_ZIP = ("https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip",)
_EVAL_RESOURCES: tuple[Resource, ...] = (
    Resource(name="hellaswag-val", urls=(f"{_ROWANZ}/hellaswag_val.jsonl",),
             path="eval/hellaswag/hellaswag_val.jsonl"),
    Resource(name="hellaswag-train", urls=(f"{_ROWANZ}/hellaswag_train.jsonl",),
             path="eval/hellaswag/hellaswag_train.jsonl"),
    # One zip (about 680 MB, mostly the ARC corpus) holds every split of both ARC sets.
    *(
        Resource(name=f"arc-{level.lower()}-{split.lower()}", urls=_ARC_ZIP, path="eval/arc/ARC-V1-Feb2018.zip",
                 member=f"ARC-V1-Feb2018-2/ARC-{level}/ARC-{level}-{split}.jsonl")
        for level in ("Easy", "Challenge") for split in ("Test", "Train")
    ),
    *(
        Resource(name=f"piqa-{split}{suffix.replace('.lst', '').replace('.jsonl', '')}",
                 urls=(f"{_PIQA}/{split}{suffix}",), path=f"eval/piqa/{split}{suffix}")
        for split in ("valid", "train") for suffix in (".jsonl", "-labels.lst")
    ),
    Resource(name="winogrande-dev", urls=_WINOGRANDE_ZIP, path="eval/winogrande/winogrande_1.1.zip",
             member="winogrande_1.1/dev.jsonl"),
    Resource(name="winogrande-train-xl", urls=_WINOGRANDE_ZIP, path="eval/winogrande/winogrande_1.1.zip",
             member="winogrande_1.1/train_xl.jsonl"),
    # OpenAI's LAMBADA test set as the GPT-2 paper used it (lm-eval's lambada_openai).
    Resource(name="lambada-openai-test",
             urls=("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                   "https://storage.googleapis.com/gpt-2/data/lambada_test.jsonl"),
             path="eval/lambada/lambada_test.jsonl"),
    Resource(name="mmlu-data", urls=("https://people.eecs.berkeley.edu/~hendrycks/data.tar",),
             path="eval/mmlu/data.tar"),
)

RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in (
        Resource(
            name="the-verdict",
            urls=(f"{_RAW_BOOK}/ch02/01_main-chapter-code/the-verdict.txt",),
            path="the-verdict.txt",
            sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            size=20479,
        ),
        # The zip's bytes differ between hosts, so only the extracted member is checked.
        Resource(
            name="sms-spam-collection",
            urls=(
                "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
                f"{_BACKBLAZE}/sms%2Bspam%2Bcollection.zip",
            ),
            path="sms+spam+collection.zip",
            member="SMSSpamCollection",
            member_sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        ),
        Resource(
            name="instruction-data",
            urls=(f"{_RAW_BOOK}/ch07/01_main-chapter-code/instruction-data.json",),
            path="instruction-data.json",
            sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            size=203524,
        ),
        Resource(
            name="instruction-data-with-preference",
            urls=(
                f"{_RAW_BOOK}/ch07/04_preference-tuning-with-dpo/"
                "instruction-data-with-preference.json",
            ),
            path="instruction-data-with-preference.json",
            sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
            size=386968,
        ),
        Resource(
            name="tinyshakespeare",
            urls=(
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                "tinyshakespeare/input.txt",
            ),
            path="tinyshakespeare.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size=1115394,
        ),
        Resource(
            name="gpt2-encoder",
            urls=(f"{_OPENAI_GPT2}/124M/encoder.json", f"{_BACKBLAZE}/gpt2/124M/encoder.json"),
            path="encoder.json",
            sha256=_ENCODER_SHA256,
            size=_ENCODER_SIZE,
        ),
        Resource(
            name="gpt2-vocab",
            urls=(f"{_OPENAI_GPT2}/124M/vocab.bpe", f"{_BACKBLAZE}/gpt2/124M/vocab.bpe"),
            path="vocab.bpe",
            sha256=_VOCAB_SHA256,
            size=_VOCAB_SIZE,
        ),
        # Tokenizers of released models as GGUF files without weights (token list, merges or
        # scores, token types, special-token ids), from llama.cpp's models/ folder (MIT licence)
        # at a fixed commit. The test suite turns them into Hugging Face tokenizer directories.
        *(
            Resource(
                name=f"vocab-{vocab}",
                urls=("https://raw.githubusercontent.com/ggml-org/llama.cpp/"
                      f"0c1e57098bba43ac29e6e3b677cdceebdd22334f/models/ggml-vocab-{vocab}.gguf",),
                path=f"vocab/ggml-vocab-{vocab}.gguf",
                sha256=sha256,
                size=size,
            )
            for vocab, size, sha256 in (
                ("gemma-4", 15776467, "58b1ba0b57f3b4d7c468ba4ffd91ad85190346a3d7ad7e71d1cabaae8a14bb65"),
                ("gpt-2", 1766807, "cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac"),
                ("llama-bpe", 7818140, "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e"),
                ("llama-spm", 723869, "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"),
                ("phi-3", 726019, "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326"),
                ("qwen2", 5928681, "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c"),
            )
        ),
        # Official chat templates: the `chat_template` string of each Hugging Face repository's
        # tokenizer_config.json, which is JSON and so not these bytes. llama.cpp keeps the bare
        # templates, named owner-repo.jinja, in models/templates/ (written there by its
        # scripts/get_chat_template.py), at the same commit as the vocabularies above.
        *(
            Resource(
                name=f"chat-template-{repo}",
                urls=("https://raw.githubusercontent.com/ggml-org/llama.cpp/"
                      f"0c1e57098bba43ac29e6e3b677cdceebdd22334f/models/templates/{repo}.jinja",),
                path=f"chat-templates/{repo}.jinja",
                sha256=sha256,
                size=size,
            )
            for repo, size, sha256 in (
                ("HuggingFaceTB-SmolLM3-3B", 3795,
                 "19eacf64569032f07644ea92c8e2a87af06ee7008147557302c31e474912ca97"),
                ("Qwen-Qwen2.5-7B-Instruct", 2507,
                 "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"),
                ("Qwen-Qwen3-0.6B", 4116,
                 "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"),
                ("google-gemma-2-2b-it", 591,
                 "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6"),
                ("meta-llama-Llama-3.1-8B-Instruct", 4614,
                 "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"),
                ("meta-llama-Llama-3.2-3B-Instruct", 3827,
                 "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4"),
                ("microsoft-Phi-3.5-mini-instruct", 430,
                 "78d976a442bcde2f0be15aafbb8e3050e1104f86732266f68403251b89982a90"),
            )
        ),
        *_EVAL_RESOURCES,
    )
}

# OpenAI names GPT-2 sizes by parameter count, Hugging Face by model name.
_GPT2_HF_NAMES: dict[str, str] = {
    "124M": "gpt2",
    "355M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
}
_GPT2_SIZE_ALIASES: dict[str, str] = {
    **{hf: size for size, hf in _GPT2_HF_NAMES.items()},
    "gpt2-small": "124M",
}
_OPENAI_FILES = (
    "checkpoint",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "encoder.json",
    "vocab.bpe",
)
_HF_FILES = ("model.safetensors", "config.json")
# The tokenizer files are the same bytes for every size, so they can be checked.
_KNOWN_GPT2_FILES: dict[str, tuple[str, int]] = {
    "encoder.json": (_ENCODER_SHA256, _ENCODER_SIZE),
    "vocab.bpe": (_VOCAB_SHA256, _VOCAB_SIZE),
}


def gpt2_resources(size: str, fmt: str = "openai") -> list[Resource]:
    """Return the resources making up one GPT-2 checkpoint.

    `size` is "124M", "355M", "774M" or "1558M" (the Hugging Face names such as
    "gpt2-medium" are accepted too). `fmt` "openai" gives OpenAI's TensorFlow checkpoint
    files plus the tokenizer files, stored under `gpt2/{size}/`; `fmt` "hf" gives Hugging
    Face's `model.safetensors` and `config.json`, stored under `hf/{hf_name}/`.
    """
    size = _GPT2_SIZE_ALIASES.get(size, size)
    if size not in _GPT2_HF_NAMES:
        raise BadInputError(
            f"Unknown GPT-2 size {size!r}; choose one of {', '.join(_GPT2_HF_NAMES)}."
        )
    if fmt == "openai":
        resources = []
        for file in _OPENAI_FILES:
            sha256, nbytes = _KNOWN_GPT2_FILES.get(file, (None, None))
            resources.append(
                Resource(
                    name=f"gpt2-{size}-{file}",
                    urls=(f"{_OPENAI_GPT2}/{size}/{file}", f"{_BACKBLAZE}/gpt2/{size}/{file}"),
                    path=f"gpt2/{size}/{file}",
                    sha256=sha256,
                    size=nbytes,
                )
            )
        return resources
    if fmt == "hf":
        hf_name = _GPT2_HF_NAMES[size]
        return [
            Resource(
                name=f"hf-{hf_name}-{file}",
                urls=(f"{_HF_BASE}/{hf_name}/resolve/main/{file}",),
                path=f"hf/{hf_name}/{file}",
            )
            for file in _HF_FILES
        ]
    raise BadInputError(f"Unknown checkpoint format {fmt!r}; choose 'openai' or 'hf'.")


def download_gpt2(
    size: str,
    fmt: str = "openai",
    progress: bool = True,
    *,
    cache_dir: PathLike | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download every file of one GPT-2 checkpoint and return the folder holding them.

    See `gpt2_resources` for the accepted sizes and formats; files already in the cache are
    not fetched again.
    """
    paths = [
        download(r, cache_dir=cache_dir, progress=progress, timeout=timeout)
        for r in gpt2_resources(size, fmt)
    ]
    return paths[0].parent


def default_cache_dir() -> Path:
    """Return the cache folder: `$GPTFORGE_CACHE` if set, else `~/.cache/gptforge`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptforge"


def download(
    resource: Resource | str,
    *,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Make sure one resource is in the cache, complete and verified, and return its path.

    `resource` is a `Resource` or the name of one in `RESOURCES`. A complete cached file is
    returned without network access. Otherwise the mirror named by `GPTFORGE_DATA_MIRROR`
    is tried first, then each URL in order; an interrupted transfer is resumed. Raises
    `ChecksumError` when the fetched bytes are wrong and `DownloadError` when no source
    delivered the file; both messages say where to put the file by hand.
    """
    res = _lookup(resource)
    dest = _cache_path(res, cache_dir)
    if dest.is_file():
        problem = _verify(dest, res)
        if problem is None:
            return dest
        logger.warning("Cached %s is invalid (%s); fetching it again.", dest, problem)
        dest.unlink()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"Cannot create the cache folder {dest.parent}: {exc}. "
            f"Set {CACHE_ENV} to a writable folder."
        ) from exc

    part = dest.with_name(dest.name + ".part")
    errors: list[tuple[str, str]] = []
    checksum_failed = False
    urls = list(res.urls)

    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        if mirror.startswith(("http://", "https://")):
            urls.insert(0, mirror.rstrip("/") + "/" + urllib.parse.quote(res.path))
        else:
            if mirror.startswith("file://"):
                mirror = urllib.parse.unquote(urllib.parse.urlparse(mirror).path)
            source = Path(mirror).expanduser() / res.path
            error = _copy_from_mirror(source, part, res)
            if error is None:
                os.replace(part, dest)
                logger.info("Copied %s from mirror %s", res.name, source)
                return dest
            errors.append((str(source), error))

    for url in urls:
        try:
            _fetch(url, part, res, progress=progress, timeout=timeout)
        except _SourceFailed as exc:
            logger.info("Could not fetch %s from %s: %s", res.name, url, exc)
            errors.append((url, str(exc)))
            checksum_failed = checksum_failed or exc.checksum
            continue
        os.replace(part, dest)
        logger.info("Saved %s to %s", res.name, dest)
        return dest

    error_type = ChecksumError if checksum_failed else DownloadError
    raise error_type(_failure_message(res, dest, errors))


def extract_member(
    resource: Resource | str,
    *,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download a zip resource, extract its `member` next to it once, verify it, and return its path.

    The member's sha256 (`member_sha256`) is checked, not the zip's, since the archive's own
    bytes may differ between hosts. A member with the wrong hash means a bad archive: both
    are deleted and `ChecksumError` is raised, so the next call fetches the zip again.
    """
    res = _lookup(resource)
    if res.member is None:
        raise BadInputError(f"Resource {res.name!r} is not an archive with a member to extract.")
    # Only the member's base name is used, so a crafted archive cannot write outside the cache.
    out = _cache_path(res, cache_dir).parent / Path(res.member).name
    if out.is_file() and (res.member_sha256 is None or file_sha256(out) == res.member_sha256):
        return out
    archive = download(res, cache_dir=cache_dir, progress=progress, timeout=timeout)

    part = out.with_name(out.name + ".part")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(res.member) as src, open(part, "wb") as dst:
            for block in iter(lambda: src.read(_CHUNK_SIZE), b""):
                digest.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, KeyError) as exc:
        part.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive} is not a zip archive holding {res.member!r} ({exc}); it was deleted. "
            "Run again to fetch it anew, or put a good copy there by hand."
        ) from exc
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise _local_write_error(exc, part, None) from exc

    got = digest.hexdigest()
    if res.member_sha256 is not None and got != res.member_sha256:
        part.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
        raise ChecksumError(
            f"Checksum mismatch for {res.member!r} extracted from {archive}: expected sha256 "
            f"{res.member_sha256}, got {got}. The archive was deleted; run again to fetch it "
            f"anew, or put a good copy of {archive.name} at {archive} by hand."
        )
    os.replace(part, out)
    logger.info("Extracted %s to %s", res.member, out)
    return out


class _SourceFailed(Exception):
    """One source failed; the caller moves on to the next. `checksum` marks wrong bytes."""

    def __init__(self, message: str, *, checksum: bool = False) -> None:
        super().__init__(message)
        self.checksum = checksum


class _Interrupted(Exception):
    """A transfer ended before all bytes arrived; the `.part` file is kept for resuming."""


def _lookup(resource: Resource | str) -> Resource:
    if isinstance(resource, Resource):
        return resource
    try:
        return RESOURCES[resource]
    except KeyError:
        raise BadInputError(
            f"Unknown resource {resource!r}; known resources: {', '.join(sorted(RESOURCES))}. "
            "For GPT-2 checkpoints use gpt2_resources() or download_gpt2()."
        ) from None


def _cache_path(res: Resource, cache_dir: PathLike | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / res.path


def _verify(path: Path, res: Resource) -> str | None:
    """Return what is wrong with `path` as a copy of `res`, or None if it checks out."""
    actual_size = path.stat().st_size
    if res.size is not None and actual_size != res.size:
        return f"size mismatch: expected {res.size} bytes, got {actual_size}"
    if res.sha256 is not None:
        got = file_sha256(path)
        if got != res.sha256:
            return f"checksum mismatch: expected sha256 {res.sha256}, got {got}"
    return None


def _copy_from_mirror(source: Path, part: Path, res: Resource) -> str | None:
    """Copy `source` to `part` and verify it; return an error string on a miss or bad copy."""
    if not source.is_file():
        return "not in the mirror folder"
    try:
        shutil.copyfile(source, part)
    except OSError as exc:
        part.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _local_write_error(exc, part, res) from exc
        return f"could not copy: {exc}"
    problem = _verify(part, res)
    if problem is not None:
        part.unlink()
        logger.warning("Mirror copy %s is invalid (%s); trying the URLs.", source, problem)
        return problem
    return None


def _fetch(url: str, part: Path, res: Resource, *, progress: bool, timeout: float) -> None:
    """Fetch `url` into `part`, resuming after interruptions, and verify the result."""
    if part.exists() and res.size is not None and part.stat().st_size > res.size:
        part.unlink()
    for attempt in range(_RESUME_RETRIES + 1):
        try:
            if part.exists() and res.size is not None and part.stat().st_size == res.size:
                break  # a previous call got every byte but stopped before verifying
            _transfer(url, part, res, progress=progress, timeout=timeout)
            break
        except _Interrupted as exc:
            if attempt == _RESUME_RETRIES:
                raise _SourceFailed(
                    f"transfer interrupted ({exc}); partial file kept at {part} for resuming"
                ) from exc
            logger.info("Transfer of %s interrupted (%s); resuming.", res.name, exc)
    problem = _verify(part, res)
    if problem is not None:
        part.unlink()
        raise _SourceFailed(f"{problem}; the bad file was deleted", checksum=True)


def _transfer(url: str, part: Path, res: Resource, *, progress: bool, timeout: float) -> None:
    """Stream one HTTP response into `part`, appending to an existing part when the server allows.

    Raises `_Interrupted` when fewer bytes arrive than announced, and `_SourceFailed` for
    errors that make this URL useless (HTTP errors, unreachable host, wrong size).
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            # The partial file does not fit what the server holds: start over.
            part.unlink()
            raise _Interrupted("server refused to resume; restarting") from exc
        raise _SourceFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _SourceFailed(f"cannot reach server: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _SourceFailed(f"cannot reach server: {exc!r}") from exc

    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if response.status == 206 and offset:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Interrupted("server resumed at the wrong offset; restarting")
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        total = offset + length if length is not None else None
        if total is not None and res.size is not None and total != res.size:
            raise _SourceFailed(
                f"server offers {total} bytes but {res.size} were expected (wrong file?)"
            )
        if offset:
            logger.info("Resuming %s at byte %d from %s", res.name, offset, url)
        else:
            logger.info("Downloading %s from %s", res.name, url)

        received = offset
        read_error: BaseException | None = None
        try:
            with open(part, mode) as f, tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(res.path).name,
                disable=not progress,
            ) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK_SIZE)
                    except (OSError, http.client.HTTPException) as exc:
                        read_error = exc
                        break
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except OSError as exc:
            # Errors from reading the network are caught above, so this one is local.
            raise _local_write_error(exc, part, res) from exc

    if total is not None and received < total:
        reason = f"{read_error!r}" if read_error else "connection closed early"
        raise _Interrupted(f"got {received} of {total} bytes: {reason}")
    if read_error is not None:
        # Without a Content-Length the end of the body cannot be told from a dropped connection.
        raise _Interrupted(f"got {received} bytes, then {read_error!r}")


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", header or "")
    return int(match.group(1)) if match else None


def _local_write_error(exc: OSError, path: Path, res: Resource | None) -> DownloadError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" ({res.size} bytes needed)" if res is not None and res.size else ""
        return DownloadError(
            f"Disk full while writing {path}{need}. Free some space, or set {CACHE_ENV} to a "
            "folder on a disk with room, then run again; a partial download is resumed."
        )
    return DownloadError(
        f"Cannot write {path}: {exc}. Check the folder's permissions, or set {CACHE_ENV} to "
        "a writable folder."
    )


def _failure_message(res: Resource, dest: Path, errors: list[tuple[str, str]]) -> str:
    tried = "\n".join(f"  - {source}: {error}" for source, error in errors) or "  (no sources)"
    if res.sha256 is not None:
        expected = f"sha256 {res.sha256}"
    elif res.member is not None and res.member_sha256 is not None:
        expected = f"a zip holding {res.member!r} with sha256 {res.member_sha256}"
    else:
        expected = "sha256 unknown (checked against the server's Content-Length)"
    if res.size is not None:
        expected += f", {res.size} bytes"
    return (
        f"Could not download {res.name!r}. Tried:\n{tried}\n"
        f"Expected: {expected}.\n"
        f"Check your internet connection and run again, or fetch the file by hand and save it "
        f"as\n  {dest}\n"
        f"or set {MIRROR_ENV} to a folder (or http(s) base URL) holding it at {res.path!r}."
    )
