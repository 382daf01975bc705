"""Read TensorFlow checkpoints (tensor bundle V2) with Python and NumPy only, no TensorFlow.

A checkpoint `prefix` is two kinds of file: `prefix.index`, a LevelDB-style sorted
table that maps every tensor name to a small protobuf record (dtype, shape, which
data file, byte offset, size, CRC-32C), and one or more data shards
`prefix.data-00000-of-0000N` that hold the raw little-endian tensor bytes back to
back. The table's empty key holds a header (number of shards, byte order).

Table layout, as read here: data blocks of prefix-compressed key/value entries
followed by a restart array; an index block whose values point at the data
blocks; a 48-byte footer (two block handles and a magic number). Every block is
followed by a 1-byte compression type and a masked CRC-32C.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.errors import CheckpointError, NotFoundError
from gptforge.pretrained.checksum import crc32c, has_native_crc32c, unmask

log = logging.getLogger(__name__)

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # 1-byte compression type + 4-byte masked CRC

# TensorFlow DataType enum values -> NumPy dtypes (little-endian). bfloat16 has no
# NumPy dtype: it is read as uint16 and widened to float32 (exactly representable).
_DT_STRING = 7
_DT_BFLOAT16 = 14
_NUMPY_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    8: "complex64", 9: "int64", 10: "bool", 17: "uint16", 18: "complex128",
    19: "float16", 22: "uint32", 23: "uint64", _DT_BFLOAT16: "uint16",
}
_DTYPE_NAMES: dict[int, str] = {
    **_NUMPY_DTYPES, _DT_STRING: "string", _DT_BFLOAT16: "bfloat16",
    11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16", 20: "resource",
    21: "variant",
}


class TFCheckpointError(CheckpointError):
    """A TensorFlow checkpoint is malformed, truncated or uses a feature not supported here."""


class ChecksumError(TFCheckpointError):
    """Stored bytes do not match their CRC-32C: the file is corrupt or was changed."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


# ---------------------------------------------------------------------------
# Protocol-buffer wire format: just enough to read BundleHeaderProto and BundleEntryProto.

def _read_varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise TFCheckpointError(f"truncated {what}: a varint runs past the end of the data")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise TFCheckpointError(f"corrupt {what}: a varint is longer than 10 bytes")


def _parse_proto(buf: bytes, what: str) -> dict[int, list[int | bytes]]:
    """Decode a serialized protobuf message into {field number: [values in order]}.

    Varints and fixed-width fields become ints, length-delimited fields bytes
    (strings, nested messages and packed arrays alike; the caller knows which).
    """
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos, what)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _read_varint(buf, pos, what)
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            if pos + width > len(buf):
                raise TFCheckpointError(f"truncated {what}: a fixed-width field runs past the end")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, what)
            if pos + length > len(buf):
                raise TFCheckpointError(
                    f"truncated {what}: a field of {length} bytes runs past the end")
            value = bytes(buf[pos:pos + length])
            pos += length
        else:
            raise TFCheckpointError(f"corrupt {what}: unsupported protobuf wire type {wire_type}")
        if number == 0:
            raise TFCheckpointError(f"corrupt {what}: protobuf field number 0")
        fields.setdefault(number, []).append(value)
    return fields


def _last_int(fields: dict[int, list[int | bytes]], number: int, default: int = 0) -> int:
    """The value of a singular integer field (proto3: the last occurrence wins)."""
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    if not isinstance(value, int):
        raise TFCheckpointError(f"corrupt checkpoint index: field {number} should be a number")
    return value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# ---------------------------------------------------------------------------
# The sorted-table (.index) file.

def _read_table(data: bytes, name: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield every (key, value) of a LevelDB-style table held in `data`, in key order."""
    if len(data) < _FOOTER_SIZE:
        raise TFCheckpointError(
            f"{name} is truncated: it has {len(data)} bytes, but a checkpoint index ends with a "
            f"{_FOOTER_SIZE}-byte footer; copy or download the checkpoint again")
    footer = data[-_FOOTER_SIZE:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise TFCheckpointError(
            f"{name} is not a TensorFlow checkpoint index (no table magic number at its end); "
            f"it may be truncated or a different file; copy or download the checkpoint again")
    _, pos = _read_varint(footer, 0, f"footer of {name}")  # metaindex offset (unused)
    _, pos = _read_varint(footer, pos, f"footer of {name}")  # metaindex size
    index_offset, pos = _read_varint(footer, pos, f"footer of {name}")
    index_size, _ = _read_varint(footer, pos, f"footer of {name}")
    end_of_blocks = len(data) - _FOOTER_SIZE
    index_block = _read_block(data, index_offset, index_size, end_of_blocks, name)
    for _, handle in _block_entries(index_block, name):
        offset, pos = _read_varint(handle, 0, f"block handle in {name}")
        size, _ = _read_varint(handle, pos, f"block handle in {name}")
        yield from _block_entries(_read_block(data, offset, size, end_of_blocks, name), name)


def _read_block(data: bytes, offset: int, size: int, limit: int, name: str) -> bytes:
    """Return the contents of the block at `offset`, after checking its trailer."""
    end = offset + size + _BLOCK_TRAILER_SIZE
    if end > limit:
        raise TFCheckpointError(
            f"{name} is truncated or corrupt: a block at byte {offset} ends past the table data; "
            f"copy or download the checkpoint again")
    contents = data[offset:offset + size]
    compression = data[offset + size]
    stored = struct.unpack("<I", data[offset + size + 1:end])[0]
    if crc32c(data[offset:offset + size + 1]) != unmask(stored):
        raise ChecksumError(
            f"{name} is corrupt: the block at byte {offset} fails its CRC-32C check; "
            f"copy or download the checkpoint again")
    if compression != 0:
        kind = "Snappy" if compression == 1 else f"type {compression}"
        raise TFCheckpointError(
            f"{name} uses {kind} block compression, which this reader does not support; "
            f"re-save the checkpoint with TensorFlow (tensor bundles are normally uncompressed)")
    return contents


def _block_entries(block: bytes, name: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield the (key, value) entries of one block, undoing the key prefix compression."""
    what = f"block in {name}"
    if len(block) < 4:
        raise TFCheckpointError(f"corrupt {what}: too short to hold its restart count")
    n_restarts = struct.unpack("<I", block[-4:])[0]
    entries_end = len(block) - 4 - 4 * n_restarts
    if entries_end < 0:
        raise TFCheckpointError(
            f"corrupt {what}: restart count {n_restarts} does not fit the block")
    key = b""
    pos = 0
    while pos < entries_end:
        shared, pos = _read_varint(block, pos, what)
        unshared, pos = _read_varint(block, pos, what)
        value_len, pos = _read_varint(block, pos, what)
        if shared > len(key) or pos + unshared + value_len > entries_end:
            raise TFCheckpointError(f"corrupt {what}: an entry does not fit the block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


# ---------------------------------------------------------------------------
# Tensor records and the reader.

@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the data shards, as recorded in the index."""

    name: str
    dtype: int  # TensorFlow DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool = False

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES.get(self.dtype, f"DataType {self.dtype}")


def _parse_entry(name: str, value: bytes) -> TensorEntry:
    what = f"index record of tensor {name!r}"
    fields = _parse_proto(value, what)
    shape: list[int] = []
    for shape_msg in fields.get(2, []):
        if not isinstance(shape_msg, bytes):
            raise TFCheckpointError(f"corrupt {what}: its shape is not a message")
        shape_fields = _parse_proto(shape_msg, what)
        if _last_int(shape_fields, 3):
            raise TFCheckpointError(f"tensor {name!r} has an unknown rank; it cannot be read")
        shape = []
        for dim in shape_fields.get(2, []):
            if not isinstance(dim, bytes):
                raise TFCheckpointError(f"corrupt {what}: a dimension is not a message")
            shape.append(_signed64(_last_int(_parse_proto(dim, what), 1)))
    return TensorEntry(
        name=name, dtype=_last_int(fields, 1), shape=tuple(shape),
        shard_id=_last_int(fields, 3), offset=_signed64(_last_int(fields, 4)),
        size=_signed64(_last_int(fields, 5)), crc32c=_last_int(fields, 6),
        sliced=bool(fields.get(7)),
    )


@dataclass
class _Header:
    num_shards: int = 1
    big_endian: bool = False


def resolve_checkpoint_prefix(path: str | Path) -> Path:
    """Turn a checkpoint path into its prefix (the path of `<prefix>.index` without `.index`).

    Accepts the prefix itself (`dir/model.ckpt`), the `.index` file, or a directory,
    in which the `checkpoint` bookkeeping file, else `model.ckpt.index`, else the
    only `*.index` file names the checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        state = path / "checkpoint"
        if state.is_file():
            match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', state.read_text(),
                              re.MULTILINE)
            if match:
                named = Path(_unescape_text_proto(match.group(1)))
                for prefix in (path / named, path / named.name):  # the second after a move
                    if prefix.with_name(prefix.name + ".index").is_file():
                        return prefix
        if (path / "model.ckpt.index").is_file():
            return path / "model.ckpt"
        found = sorted(path.glob("*.index"))
        if len(found) == 1:
            return found[0].with_suffix("")
        if found:
            raise NotFoundError(
                f"{path} holds several checkpoints ({', '.join(p.name for p in found)}); "
                f"pass the prefix of the one to read, e.g. {found[0].with_suffix('')}")
        raise NotFoundError(
            f"no TensorFlow checkpoint in {path}: looked for a 'checkpoint' file, "
            f"model.ckpt.index and any *.index file")
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    if path.with_name(path.name + ".index").is_file():
        return path
    raise NotFoundError(
        f"no TensorFlow checkpoint at {path}: expected a directory, an .index file, or a prefix "
        f"such that {path.name}.index exists")


def _unescape_text_proto(text: str) -> str:
    """Undo the C-style escapes (\\n, \\", \\ooo octal bytes) of a text-format protobuf string."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            octal = re.match(r"[0-7]{1,3}", text[i + 1:])
            if octal:
                out.append(int(octal.group(), 8) & 0xFF)
                i += 1 + len(octal.group())
                continue
            out += {"n": b"\n", "t": b"\t", "r": b"\r"}.get(text[i + 1], text[i + 1].encode())
            i += 2
        else:
            out += text[i].encode()
            i += 1
    return out.decode("utf-8", errors="replace")


class TFCheckpointReader:
    """Random access to the tensors of one TensorFlow checkpoint, without TensorFlow.

    The index is read and checked when the reader is made; data shards are
    memory-mapped when first needed, and `read(name)` returns an array that views
    the mapped file (read-only, no copy) unless the dtype needs converting.
    With `verify=True` every tensor's bytes are checked against their CRC-32C when
    read (fast with the `crc32c` package installed, a few hundred MB/s without).
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.prefix = resolve_checkpoint_prefix(path)
        self.verify = verify
        self._header = _Header()
        self._entries: dict[str, TensorEntry] = {}
        self._shards: dict[int, np.ndarray] = {}
        self._read_index()

    def _read_index(self) -> None:
        index_path = self.prefix.with_name(self.prefix.name + ".index")
        saw_header = False
        for key, value in _read_table(index_path.read_bytes(), str(index_path)):
            if key == b"":
                fields = _parse_proto(value, f"header of {index_path}")
                self._header = _Header(num_shards=_last_int(fields, 1, 1),
                                       big_endian=_last_int(fields, 2) == 1)
                saw_header = True
                continue
            if key.startswith(b"\x00"):
                continue  # one slice of a partitioned variable (binary key); see read()
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TFCheckpointError(
                    f"corrupt {index_path}: a tensor name is not UTF-8") from err
            self._entries[name] = _parse_entry(name, value)
        if not saw_header:
            raise TFCheckpointError(
                f"{index_path} has no bundle header; it is not a TensorFlow V2 checkpoint index "
                f"(V1 checkpoints are not supported: re-save with a recent TensorFlow)")
        for entry in self._entries.values():
            if not 0 <= entry.shard_id < self._header.num_shards:
                raise TFCheckpointError(
                    f"corrupt {index_path}: tensor {entry.name!r} is in shard {entry.shard_id}, "
                    f"but the checkpoint has {self._header.num_shards} shard(s)")
        total = sum(e.size for e in self._entries.values())
        if self.verify and total > 512 * 2**20 and not has_native_crc32c():
            log.info("checking %.1f GB of checkpoint data with the NumPy CRC-32C; "
                     "`pip install crc32c` makes this much faster", total / 1e9)

    def names(self) -> list[str]:
        """Tensor names, in the checkpoint's (sorted) order."""
        return list(self._entries)

    def entry(self, name: str) -> TensorEntry:
        """The index record of tensor `name` (dtype, shape, shard, offset, size, checksum)."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.prefix}") from None

    def shard_path(self, shard_id: int) -> Path:
        """The data file that holds shard `shard_id`."""
        n = self._header.num_shards
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard_id:05d}-of-{n:05d}")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def read(self, name: str) -> np.ndarray:
        """Return tensor `name` as a NumPy array (read-only view of the file where possible).

        bfloat16 tensors come back as float32 and string tensors as an object
        array of bytes. Raises ChecksumError naming the tensor if its bytes do not
        match the stored CRC-32C.
        """
        entry = self.entry(name)
        if entry.sliced:
            raise TFCheckpointError(
                f"tensor {name!r} is saved as partitioned slices, which this reader does not "
                f"support; re-save the variable unpartitioned")
        if entry.dtype not in _NUMPY_DTYPES and entry.dtype != _DT_STRING:
            raise TFCheckpointError(
                f"tensor {name!r} has dtype {entry.dtype_name}, which this reader does not support")
        raw = self._raw_bytes(entry)
        if entry.dtype == _DT_STRING:
            return self._read_strings(raw, entry)
        if self.verify and crc32c(raw) != unmask(entry.crc32c):
            raise self._checksum_error(entry)
        dtype = np.dtype(_NUMPY_DTYPES[entry.dtype]).newbyteorder(
            ">" if self._header.big_endian else "<")
        count = math.prod(entry.shape)
        if count * dtype.itemsize != entry.size:
            raise TFCheckpointError(
                f"corrupt checkpoint: tensor {name!r} of shape {list(entry.shape)} and dtype "
                f"{entry.dtype_name} should take {count * dtype.itemsize} bytes, the index says "
                f"{entry.size}")
        if entry.offset % dtype.itemsize:
            raw = raw.copy()  # keep the returned array aligned
        array = raw.view(dtype).reshape(entry.shape)
        if entry.dtype == _DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))  # written on a big-endian machine
        return array

    def _read_strings(self, raw: np.ndarray, entry: TensorEntry) -> np.ndarray:
        try:
            values, crc = _decode_strings(raw, entry)
        except TFCheckpointError as err:
            if self.verify:  # garbled lengths are a checksum failure too
                raise self._checksum_error(entry) from err
            raise
        if self.verify and crc != unmask(entry.crc32c):
            raise self._checksum_error(entry)
        return values

    def _checksum_error(self, entry: TensorEntry) -> ChecksumError:
        return ChecksumError(
            f"tensor {entry.name!r} in {self.shard_path(entry.shard_id)} fails its CRC-32C check: "
            f"the file is corrupt; copy or download the checkpoint again", tensor=entry.name)

    def _raw_bytes(self, entry: TensorEntry) -> np.ndarray:
        shard = self._shard(entry.shard_id)
        if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > shard.size:
            raise TFCheckpointError(
                f"tensor {entry.name!r} lies at bytes {entry.offset}..{entry.offset + entry.size} "
                f"of {self.shard_path(entry.shard_id)}, which has only {shard.size} bytes: the "
                f"data file is truncated; copy or download the checkpoint again")
        return shard[entry.offset:entry.offset + entry.size]

    def _shard(self, shard_id: int) -> np.ndarray:
        if shard_id not in self._shards:
            path = self.shard_path(shard_id)
            if not path.is_file():
                raise NotFoundError(
                    f"data file {path} of checkpoint {self.prefix} is missing; the index needs "
                    f"all {self._header.num_shards} data shard(s) next to it")
            if path.stat().st_size == 0:
                self._shards[shard_id] = np.zeros(0, dtype=np.uint8)
            else:  # a plain ndarray view; the mapping stays open while any view lives
                self._shards[shard_id] = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
        return self._shards[shard_id]


def _decode_strings(raw: np.ndarray, entry: TensorEntry) -> tuple[np.ndarray, int]:
    """Decode a string tensor and compute the CRC-32C that TensorFlow stores for it.

    Layout: one varint length per element, a 4-byte masked CRC of the lengths,
    then the bytes of all elements. TensorFlow's checksum covers each length as a
    little-endian uint32 (uint64 past 4 GiB) rather than as varint bytes, then
    the 4 stored bytes, then the string bytes. Returns (object array of bytes, crc).
    """
    data = raw.tobytes()
    what = f"string tensor {entry.name!r}"
    count = math.prod(entry.shape)
    lengths = []
    crc = pos = 0
    for _ in range(count):
        length, pos = _read_varint(data, pos, what)
        lengths.append(length)
        crc = crc32c(struct.pack("<I" if length <= 0xFFFFFFFF else "<Q", length), crc)
    crc = crc32c(data[pos:pos + 4], crc)
    pos += 4
    if pos + sum(lengths) != len(data):
        raise TFCheckpointError(f"corrupt {what}: its lengths do not add up to its size")
    values = np.empty(count, dtype=object)
    for i, length in enumerate(lengths):
        values[i] = data[pos:pos + length]
        crc = crc32c(values[i], crc)
        pos += length
    return values.reshape(entry.shape), crc


def read_tf_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Read every tensor of a TensorFlow V2 checkpoint into a dict of NumPy arrays.

    `path` is the checkpoint prefix (`dir/model.ckpt`), its `.index` file, or the
    directory that holds it. The arrays are read-only views of the memory-mapped
    data file (copy one with `np.array(a)` to change it), so reading a large
    checkpoint does not load it all into memory at once. Each tensor's CRC-32C is
    checked unless `verify=False`. TensorFlow itself is never imported.
    """
    reader = TFCheckpointReader(path, verify=verify)
    return {name: reader.read(name) for name in reader.names()}
