"""The TensorFlow checkpoint reader, against checkpoints written by real TensorFlow.

The fixtures come from scripts/make_tf_fixture.py (TensorFlow's own Saver and
SaveV2); expected.npz holds the values TensorFlow was given.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge.pretrained.checksum import crc32c, crc32c_numpy, mask, unmask
from gptforge.pretrained.tf_checkpoint import (
    ChecksumError,
    TFCheckpointError,
    TFCheckpointReader,
    read_tf_checkpoint,
)

FIXTURES = Path(__file__).parent / "fixtures"
GPT2 = FIXTURES / "tf_gpt2_tiny"
DTYPES = FIXTURES / "tf_dtypes_tiny"
SHARDED = FIXTURES / "tf_sharded_tiny"
DATA = "model.ckpt.data-00000-of-00001"
INDEX = "model.ckpt.index"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_openai_layout_reads_exactly_without_tensorflow():
    tensors = read_tf_checkpoint(GPT2)
    expected = np.load(GPT2 / "expected.npz")
    assert sorted(tensors) == sorted(expected.files)
    for name in expected.files:
        assert tensors[name].dtype == expected[name].dtype, name
        assert tensors[name].shape == expected[name].shape, name
        assert np.array_equal(tensors[name], expected[name]), name
    assert tensors["model/h1/attn/c_attn/w"].shape == (1, 12, 36)
    assert "tensorflow" not in sys.modules


def test_every_supported_dtype():
    tensors = read_tf_checkpoint(DTYPES)
    expected = np.load(DTYPES / "expected.npz")
    assert sorted(tensors) == sorted(expected.files)
    for name in expected.files:
        if name == "string":
            assert tensors[name].dtype == object
            assert list(tensors[name]) == [bytes(s) for s in expected[name]]
            continue
        assert tensors[name].dtype == expected[name].dtype, name
        assert tensors[name].shape == expected[name].shape, name
        assert np.array_equal(tensors[name], expected[name]), name
    assert tensors["bfloat16"].dtype == np.float32  # widened, exactly
    assert tensors["scalar"].shape == () and tensors["empty"].shape == (0, 3)


def test_sharded_checkpoint_and_partitioned_variable():
    reader = TFCheckpointReader(SHARDED)
    expected = np.load(SHARDED / "expected.npz")
    for name in expected.files:
        assert np.array_equal(reader.read(name), expected[name]), name
    assert len({reader.entry(name).shard_id for name in expected.files}) == 2  # two data files
    with pytest.raises(TFCheckpointError, match="'partitioned' is saved as partitioned slices"):
        reader.read("partitioned")


@pytest.mark.parametrize("form", ["directory", "prefix", "index file"])
def test_path_forms(form):
    path = {"directory": GPT2, "prefix": GPT2 / "model.ckpt", "index file": GPT2 / INDEX}[form]
    assert TFCheckpointReader(path).prefix == GPT2 / "model.ckpt"


def test_checkpoint_file_from_another_machine(tmp_path):
    """The `checkpoint` file may hold an absolute path from where it was written."""
    ckpt = _copy(GPT2, tmp_path)
    (ckpt / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run/model.ckpt"\n')
    assert TFCheckpointReader(ckpt).prefix == ckpt / "model.ckpt"


def test_arrays_view_the_mapped_file_read_only():
    reader = TFCheckpointReader(GPT2)
    array = reader.read("model/wte")
    assert not array.flags.writeable and not array.flags.owndata
    assert reader.entry("model/wte").shape == (96, 12)
    assert len(reader) == 28 and "model/ln_f/g" in reader


def test_every_corrupted_tensor_is_named(tmp_path):
    ckpt = _copy(GPT2, tmp_path)
    names = TFCheckpointReader(ckpt).names()
    for name in names:
        entry = TFCheckpointReader(ckpt).entry(name)
        _flip_byte(ckpt / DATA, entry.offset + entry.size // 2)
        with pytest.raises(ChecksumError, match=name) as err:
            read_tf_checkpoint(ckpt)
        assert err.value.tensor == name
        unchecked = read_tf_checkpoint(ckpt, verify=False)  # still readable on request
        assert not np.array_equal(unchecked[name], np.load(GPT2 / "expected.npz")[name])
        _flip_byte(ckpt / DATA, entry.offset + entry.size // 2)  # repair for the next one
    read_tf_checkpoint(ckpt)


def test_corrupted_string_tensor_is_named(tmp_path):
    ckpt = _copy(DTYPES, tmp_path)
    entry = TFCheckpointReader(ckpt).entry("string")
    _flip_byte(ckpt / DATA, entry.offset + entry.size - 3)
    with pytest.raises(ChecksumError, match="'string'"):
        TFCheckpointReader(ckpt).read("string")


@pytest.mark.parametrize("keep", [0, 20, 47, 400, -1])
def test_truncated_index_is_reported(tmp_path, keep):
    ckpt = _copy(GPT2, tmp_path)
    index = ckpt / INDEX
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(TFCheckpointError, match="truncated"):
        read_tf_checkpoint(ckpt)


def test_corrupted_index_block_fails_its_checksum(tmp_path):
    ckpt = _copy(GPT2, tmp_path)
    _flip_byte(ckpt / INDEX, 30)  # inside the first data block
    with pytest.raises(ChecksumError, match="index is corrupt"):
        read_tf_checkpoint(ckpt)


def test_other_file_is_not_taken_for_an_index(tmp_path):
    (tmp_path / INDEX).write_bytes(bytes(range(256)) * 2)
    with pytest.raises(TFCheckpointError, match="not a TensorFlow checkpoint index"):
        read_tf_checkpoint(tmp_path)


def test_missing_data_shard_is_named(tmp_path):
    ckpt = _copy(GPT2, tmp_path)
    (ckpt / DATA).unlink()
    with pytest.raises(FileNotFoundError, match=DATA):
        read_tf_checkpoint(ckpt)


def test_truncated_data_shard_is_reported(tmp_path):
    ckpt = _copy(GPT2, tmp_path)
    data = ckpt / DATA
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(TFCheckpointError, match="truncated"):
        read_tf_checkpoint(ckpt)


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.ckpt.index"):
        read_tf_checkpoint(tmp_path)


# CRC-32C -------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, crc", [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),  # RFC 3720 test vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
])
def test_crc32c_known_values(data, crc):
    assert crc32c(data) == crc
    assert crc32c_numpy(data) == crc


@pytest.mark.parametrize("size", [16 * 1024 - 1, 16 * 1024, 70_001, 1 << 20, (3 << 20) + 7])
def test_numpy_crc32c_parallel_lanes_agree_with_bytewise(size):
    """Large inputs take the lane-parallel path; chunks below 16 KiB take the byte loop."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    crc = 0
    for start in range(0, size, 10_000):
        crc = crc32c_numpy(data[start:start + 10_000], crc)
    assert crc32c_numpy(data) == crc


def test_native_crc32c_agrees_when_installed():
    native = pytest.importorskip("crc32c")
    data = np.random.default_rng(0).integers(0, 256, 1_234_567, dtype=np.uint8)
    assert crc32c_numpy(data, 99) == native.crc32c(data, 99) == crc32c(data, 99)


def test_mask_round_trip():
    assert mask(0) == 0xA282EAD8
    for value in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert unmask(mask(value)) == value
