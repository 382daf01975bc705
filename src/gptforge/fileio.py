"""Writing files so that nothing half-written is ever left under a real name.

Every file gptforge writes goes through `atomic_write`: the data lands in a hidden
temporary file next to the target, is flushed to disk (fsync), and is renamed over
the target only once complete; the directory is then fsynced so the rename itself
survives a crash. A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from gptforge import faults

_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Open a temporary file for writing that replaces `path` when the block ends cleanly.

    If the block raises, the temporary file is removed and `path` is untouched.
    `mode` is "wb" or "w" (text; pass encoding= and newline= as for `open`).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), not {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            faults.reach(f"write:{path.name}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON (UTF-8, a final newline) to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj)` to `path` atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` to a safetensors file atomically, one tensor at a time; return its sha256.

    Unlike `safetensors.torch.save_file`, the tensors may be non-contiguous views
    (transposes, a weight in another memory layout): each is made contiguous only
    while it is written, so saving needs no second copy of the model in memory.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors "
                             f"cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with atomic_write(path) as f:
        for chunk in _safetensors_chunks(blob, tensors.values()):
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_chunks(header: bytes, tensors) -> Iterator[bytes | memoryview]:
    yield struct.pack("<Q", len(header))
    yield header
    for tensor in tensors:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            yield data.view(torch.uint8).numpy().data


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make the complete directory `tmp` appear as `final`, replacing an older one.

    Each file in `tmp` was flushed when written; the directory entries are flushed
    here, then `tmp` is renamed into place and the parent flushed. An older `final`
    is moved aside first and removed after, so a crash leaves one of the two whole.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
