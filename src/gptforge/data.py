"""Training data: sliding windows of token ids, from a text in memory or a token file on disk.

A window of `max_length` input ids starts every `stride` tokens; its targets are the
same ids shifted one position to the left, so the model learns to predict the next
token at every position.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gptforge.errors import BadInputError, NotFoundError
from gptforge.fileio import atomic_write, atomic_write_json
from gptforge.tokenizer import EOT_ID, get_tokenizer, text_to_ids


def _num_windows(n_tokens: int, max_length: int, stride: int) -> int:
    """Windows starting at 0, stride, 2*stride, ... that still have a target for every input."""
    if max_length <= 0 or stride <= 0:
        raise BadInputError(f"max_length and stride must be positive, got {max_length} and {stride}")
    return max(0, (n_tokens - max_length - 1) // stride + 1)


class _WindowDataset(Dataset):
    """Sliding windows over a 1-D array of token ids (in memory or memory-mapped)."""

    def __init__(self, ids: np.ndarray, max_length: int, stride: int, what: str) -> None:
        self.ids, self.max_length, self.stride = ids, max_length, stride
        self.n = _num_windows(len(ids), max_length, stride)
        if self.n == 0:
            raise BadInputError(
                f"{what} has {len(ids)} tokens, too few for one window of {max_length} input tokens "
                f"plus 1 target: use more text or a smaller max_length / context length"
            )

    def __len__(self) -> int:
        return self.n

    def _slice(self, idx: int) -> torch.Tensor:
        if not 0 <= idx < self.n:
            raise IndexError(idx)
        start = idx * self.stride
        return torch.from_numpy(np.array(self.ids[start:start + self.max_length + 1], dtype=np.int64))

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self._slice(idx)
        return chunk[:-1], chunk[1:]  # inputs (max_length,), targets shifted by one


class GPTDataset(_WindowDataset):
    """Sliding-window dataset over the token ids of a text held in memory."""

    def __init__(self, text: str, tokenizer=None, max_length: int = 256, stride: int = 128) -> None:
        if not text:
            raise BadInputError("the text is empty: give a text to make training windows from")
        ids = np.asarray(text_to_ids(text, tokenizer), dtype=np.int64)
        super().__init__(ids, max_length, stride, "the text")


class TokenFileDataset(_WindowDataset):
    """Sliding windows read from a flat uint16 token file (made by `prepare_token_file`).

    The file is memory-mapped, so corpora larger than memory work; `start`/`end`
    (fractions of the file) select a part of it, e.g. a validation split.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 1024, stride: int | None = None,
                 start: float = 0.0, end: float = 1.0) -> None:
        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"token file {path} not found: make one with `gptforge prepare`")
        ids = np.memmap(path, dtype=np.uint16, mode="r")
        ids = ids[int(len(ids) * start):int(len(ids) * end)]
        super().__init__(ids, max_length, stride or max_length, f"token file {path}")


def create_dataloader(
    text: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int | None = None,
    tokenizer=None,
) -> DataLoader:
    """Tokenize `text` with GPT-2's BPE and serve batches of (inputs, targets), each (B, max_length).

    With `seed`, the shuffle order comes from its own generator and is reproducible;
    without it, the shuffle follows torch's global RNG (as `torch.manual_seed` sets it).
    """
    dataset = GPTDataset(text, tokenizer or get_tokenizer(), max_length, stride)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# ----------------------------------------------------------------------------------
# Corpora larger than memory: tokenize to a flat uint16 file once, then stream windows.

def expand_paths(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named directly, every file under a directory (sorted), and glob matches."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(pattern), recursive=True))
            if not matches:
                raise NotFoundError(f"no file matches {str(pattern)!r}")
            files.extend(m for m in matches if m.is_file())
    if not files:
        raise NotFoundError("no input files given")
    return files


def read_texts(patterns: Sequence[str | os.PathLike]) -> str:
    """Read and join the text of files, directories and globs (documents separated by <|endoftext|>)."""
    return "<|endoftext|>".join(f.read_text(encoding="utf-8") for f in expand_paths(patterns))


def _chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    """Split a long text into pieces of about `size` characters, at line ends."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end == -1 else end + 1
        yield text[start:end]
        start = end


def prepare_token_file(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    num_threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """Tokenize files into one flat uint16 token file, documents separated by <|endoftext|>.

    Tokenization runs on `num_threads` threads (default: every core). The file is
    written under a temporary name and renamed when complete; a JSON summary is
    written beside it (`<out>.json`) and returned. `on_progress(n_bytes)` is called
    as input is consumed, for a progress bar.
    """
    files = expand_paths(inputs)
    tokenizer = get_tokenizer()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = num_threads or os.cpu_count() or 1
    n_tokens = 0
    with atomic_write(out) as f:
        for path in files:
            text = path.read_text(encoding="utf-8")
            pieces = list(_chunks(text))
            # tiktoken's batch encoder runs its Rust code on several threads at once.
            for start in range(0, len(pieces), 4 * threads):
                batch = pieces[start:start + 4 * threads]
                for ids in tokenizer.encode_ordinary_batch(batch, num_threads=threads):
                    np.asarray(ids, dtype=np.uint16).tofile(f)
                    n_tokens += len(ids)
                if on_progress:
                    on_progress(sum(len(p.encode("utf-8")) for p in batch))
            np.asarray([EOT_ID], dtype=np.uint16).tofile(f)
            n_tokens += 1
    summary = {"tokens": n_tokens, "dtype": "uint16", "files": [str(p) for p in files]}
    atomic_write_json(str(out) + ".json", summary)
    return summary


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices in an order fixed by (seed, epoch), startable mid-epoch.

    Under distributed training every process computes the same global order and
    takes its own slice of each global batch, so W processes with batch B/W see
    exactly the batches one process with batch B would see.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise BadInputError(f"batch size {batch_size} must be divisible by the number of "
                             f"processes ({world_size})")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.batch_size // self.world_size
        for b in range(self.start_batch, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world_size > 1:
                batch = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield batch
