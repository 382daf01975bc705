"""CRC-32C (Castagnoli), the checksum of TensorFlow checkpoints and LevelDB tables.

`crc32c(data)` uses the `crc32c` package from PyPI when it is installed (native code,
gigabytes per second) and otherwise a NumPy implementation that is exact and fast
enough for whole GPT-2 checkpoints (a few hundred MB/s): it runs many independent
CRC "lanes" over slices of the data side by side and then joins their results with
the algebra of CRCs (a CRC is linear over GF(2), so the CRC of a concatenation is
the first part's register advanced past the second part, XOR the second part's CRC).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected
_MASK_DELTA = 0xA282EAD8
_LANE_BYTES = 1024  # bytes each lane processes in the NumPy implementation
_MAX_LANES = 1 << 14  # lanes per step: 16 MiB of data at a time
_SMALL = 16 * 1024  # below this many bytes, a plain byte loop is as fast as NumPy


def mask(crc: int) -> int:
    """Mask a CRC the way TensorFlow and LevelDB store it (rotate right 15 bits, add a constant).

    Storing a masked CRC means that data which itself contains CRCs does not
    checksum to something degenerate.
    """
    crc &= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """Invert `mask`: the plain CRC-32C of a stored, masked value."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC-32C of `data` (bytes, memoryview or a NumPy array), continuing from `crc`.

    `crc32c(b, crc32c(a)) == crc32c(a + b)`, so large data can be checksummed in
    pieces. Uses the native `crc32c` package when importable, else NumPy.
    """
    buf = _as_bytes_array(data)
    native = _native_crc32c()
    if native is not None:
        return int(native(buf, crc))
    return crc32c_numpy(buf, crc)


def has_native_crc32c() -> bool:
    """True if the fast native `crc32c` package is installed."""
    return _native_crc32c() is not None


def crc32c_numpy(data: Any, crc: int = 0) -> int:
    """CRC-32C computed with NumPy only (same result as `crc32c`, slower)."""
    buf = _as_bytes_array(data)
    reg = (crc ^ 0xFFFFFFFF) & 0xFFFFFFFF
    pos = 0
    while buf.size - pos >= _SMALL:
        lanes = min(_MAX_LANES, 1 << (((buf.size - pos) // _LANE_BYTES).bit_length() - 1))
        piece = buf[pos:pos + lanes * _LANE_BYTES]
        reg = _advance_lanes(reg, piece, lanes)
        pos += piece.size
    reg = _advance_bytewise(reg, buf[pos:])
    return reg ^ 0xFFFFFFFF


@functools.cache
def _native_crc32c() -> Any:
    try:
        import crc32c as native  # optional dependency
    except ImportError:
        return None
    return lambda buf, crc: native.crc32c(buf, crc)


def _as_bytes_array(data: Any) -> np.ndarray:
    """View any contiguous buffer as a flat uint8 array without copying."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


@functools.cache
def _table() -> np.ndarray:
    """The 256-entry byte table: register update for one input byte."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


@functools.cache
def _table_list() -> list[int]:
    return [int(v) for v in _table()]


def _advance_bytewise(reg: int, buf: np.ndarray) -> int:
    """Feed bytes one at a time into the (un-inverted) register `reg`."""
    table = _table_list()
    for byte in buf.tobytes():
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


def _advance_lanes(reg: int, piece: np.ndarray, lanes: int) -> int:
    """Feed `piece` (lanes * _LANE_BYTES bytes) into `reg` using parallel lanes.

    Lane k processes bytes [k * L, (k + 1) * L) starting from a zero register,
    except lane 0, which starts from `reg`. Each step feeds one little-endian
    4-byte word per lane through four byte tables ("slicing by 4"). Pairs of
    neighbouring lanes are then joined, doubling the span each round, until one
    register is left.
    """
    t0, t1, t2, t3 = _tables4()
    words = piece.view("<u4").reshape(lanes, _LANE_BYTES // 4).T.copy()  # (L/4, lanes)
    regs = np.zeros(lanes, dtype=np.uint32)
    regs[0] = reg
    x = np.empty_like(regs)
    byte = np.empty_like(regs)
    for row in words:  # out= buffers: this loop is the hot path
        np.bitwise_xor(regs, row, out=x)
        np.right_shift(x, 24, out=byte)
        np.take(t0, byte, out=regs)
        for table, shift in ((t1, 16), (t2, 8), (t3, 0)):
            np.right_shift(x, shift, out=byte)
            byte &= 0xFF
            regs ^= table[byte]
    span = _LANE_BYTES
    while regs.size > 1:
        regs = _apply(_zeros_operator(span), regs[0::2]) ^ regs[1::2]
        span *= 2
    return int(regs[0])


@functools.cache
def _tables4() -> tuple[np.ndarray, ...]:
    """Tables for slicing by 4: t[k][b] is byte b's effect when followed by k more bytes."""
    tables = [_table()]
    for _ in range(3):
        prev = tables[-1]
        tables.append((prev >> 8) ^ _table()[prev & 0xFF])
    return tuple(tables)


# A linear map on the 32-bit register is stored as its 32 columns: op[i] = op(1 << i).

def _apply(op: np.ndarray, regs: np.ndarray) -> np.ndarray:
    """Apply the GF(2) linear map `op` to every register in `regs`."""
    bits = (regs[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)  # (N, 32)
    return np.bitwise_xor.reduce(bits * op[None, :], axis=1).astype(np.uint32)


@functools.cache
def _zeros_operator(n_bytes: int) -> np.ndarray:
    """The map that advances a register past `n_bytes` zero bytes."""
    if n_bytes == 1:
        units = np.uint32(1) << np.arange(32, dtype=np.uint32)
        return (_table()[units & 0xFF] ^ (units >> 8)).astype(np.uint32)
    half = _zeros_operator(n_bytes // 2)
    op = _apply(half, half)  # advancing twice by n // 2 bytes
    if n_bytes % 2:
        op = _apply(_zeros_operator(1), op)
    return op
