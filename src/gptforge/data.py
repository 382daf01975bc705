"""Training data: sliding windows of token ids, from a text in memory or a token file on disk.

A window of `max_length` input ids starts every `stride` tokens; its targets are the
same ids shifted one position to the left, so the model learns to predict the next
token at every position.
"""

from __future__ import annotations

import glob
import json
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


def check_vocabulary(cfg, what: str = "the model") -> None:
    """Refuse a model whose vocabulary is smaller than GPT-2's tokenizer's (50257 ids):
    its embedding has no row for the larger token ids the text will hold."""
    n_vocab = get_tokenizer().n_vocab
    if cfg.vocab_size < n_vocab:
        raise BadInputError(f"{what} has a vocabulary of {cfg.vocab_size} tokens, but GPT-2's "
                            f"tokenizer makes ids up to {n_vocab - 1}: train a model with "
                            f"vocab_size {n_vocab} (or more)")


def check_language_model(model, what: str = "the model") -> None:
    """Refuse a model whose output head is not one score per token (a classifier's head),
    where next-token predictions are needed: training a language model, generating, scoring."""
    outputs = model.out_head.out_features
    if outputs != model.cfg.vocab_size:
        raise BadInputError(f"{what} is a classifier ({outputs} outputs, one per class), not a language "
                            f"model: it has no next-token predictions; use a language model here, and "
                            f"`gptforge classify` for the classifier")


def _num_windows(n_tokens: int, max_length: int, stride: int) -> int:
    """Windows starting at 0, stride, 2*stride, ... that still have a target for every input."""
    if max_length <= 0 or stride <= 0:
        raise BadInputError(f"max_length and stride must be positive, got {max_length} and {stride}")
    return max(0, (n_tokens - max_length - 1) // stride + 1)


class _WindowDataset(Dataset):
    """Sliding windows over a 1-D array of token ids (in memory or memory-mapped)."""

    def __init__(self, ids: np.ndarray, max_length: int, stride: int, what: str,
                 hint: str = "use more text or a smaller max_length / context length") -> None:
        self.ids, self.max_length, self.stride = ids, max_length, stride
        self.n = _num_windows(len(ids), max_length, stride)
        if self.n == 0:
            raise BadInputError(
                f"{what} has {len(ids)} tokens, too few for one window: that needs {max_length + 1} "
                f"({max_length} input tokens plus 1 target); {hint}"
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
    """Sliding-window dataset over the token ids of a text held in memory.

    `what` names the text in errors ("the validation split of a.txt"), `hint` says
    what to change when it is too short for one window.
    """

    def __init__(self, text: str, tokenizer=None, max_length: int = 256, stride: int = 128,
                 what: str = "the text", hint: str = "use more text or a smaller max_length / context length",
                 ) -> None:
        if not text:
            raise BadInputError(f"{what} is empty: there is no text to cut into windows")
        ids = np.asarray(text_to_ids(text, tokenizer), dtype=np.int64)
        super().__init__(ids, max_length, stride, what, hint)


class TokenFileDataset(_WindowDataset):
    """Sliding windows read from a flat uint16 token file (made by `prepare_token_file`).

    The file is memory-mapped, so corpora larger than memory work; `start`/`end`
    (fractions of the file) select a part of it, e.g. a validation split. The
    summary `prepare_token_file` writes beside it (`<file>.json`) must be there and
    match the file, so a text file or a cut-off copy is refused rather than read as tokens.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 1024, stride: int | None = None,
                 start: float = 0.0, end: float = 1.0, what: str | None = None,
                 hint: str = "use more text or a smaller max_length / context length") -> None:
        path = Path(path)
        n_tokens = check_token_file(path)
        ids = np.memmap(path, dtype=np.uint16, mode="r", shape=(n_tokens,)) if n_tokens else \
            np.zeros(0, dtype=np.uint16)
        ids = ids[int(len(ids) * start):int(len(ids) * end)]
        super().__init__(ids, max_length, stride or max_length, what or f"token file {path}", hint)


def check_token_file(path: str | os.PathLike) -> int:
    """The number of tokens in a token file made by `prepare_token_file`, after checking
    that the file is one: its summary `<file>.json` is there, says uint16, and its
    token count matches the file's size. BadInputError (NotFoundError) otherwise."""
    path = Path(path)
    summary_path = Path(str(path) + ".json")
    remake = f"make it again with `gptforge prepare TEXT... --out {path}`"
    if path.is_dir():
        raise BadInputError(f"{path} is a directory, not a token file; give the file that "
                            f"`gptforge prepare` wrote (or use --text for a directory of text files)")
    if not path.is_file():
        raise NotFoundError(f"token file {path} not found: make one with `gptforge prepare`")
    if not summary_path.is_file():
        raise BadInputError(f"{path} is not a token file made by `gptforge prepare` (there is no "
                            f"{summary_path.name} beside it); use --text for text files, or make a "
                            f"token file with `gptforge prepare {path} --out TOKENS.bin`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{summary_path} is not valid JSON ({err}); {remake}") from None
    tokens = summary.get("tokens") if isinstance(summary, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise BadInputError(f"{summary_path} gives no token count; it is not the summary "
                            f"`gptforge prepare` writes: {remake}")
    if summary.get("dtype", "uint16") != "uint16":
        raise BadInputError(f"{summary_path} says the tokens are {summary.get('dtype')!r}; gptforge "
                            f"reads uint16 token files: {remake}")
    size = path.stat().st_size
    if size != 2 * tokens:
        raise BadInputError(f"{path} has {size:,} bytes, but {summary_path.name} says it holds "
                            f"{tokens:,} uint16 tokens ({2 * tokens:,} bytes): the file was cut off "
                            f"or changed; {remake}")
    return tokens


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
    """Files named directly, every file under a directory (sorted), and glob matches.

    A pattern that yields no file (an empty directory, a glob matching nothing or only
    directories) is an error that names it.
    """
    files: list[Path] = []
    patterns = list(patterns)
    if not patterns:
        raise BadInputError("no input files given: name text files, directories or globs")
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
            if not found:
                raise NotFoundError(f"directory {str(pattern)!r} holds no files: put text files in "
                                    f"it or name the files themselves")
        elif p.is_file():
            found = [p]
        else:
            matches = sorted(Path(m) for m in glob.glob(str(pattern), recursive=True))
            found = [m for m in matches if m.is_file()]
            if not matches:
                raise NotFoundError(f"no file matches {str(pattern)!r}: check the path (a glob "
                                    f"such as 'texts/*.txt' must match at least one file)")
            if not found:
                raise NotFoundError(f"{str(pattern)!r} matches only directories, no files: name the "
                                    f"directories themselves, or use a glob such as 'dir/**/*.txt'")
        files.extend(found)
    return files


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; BadInputError naming the file (and where it goes wrong)
    for a file that is not UTF-8 text or that holds NUL bytes (a binary file)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise BadInputError(f"{path} is a directory, not a text file") from None
    except FileNotFoundError:
        raise NotFoundError(f"{path} not found") from None
    if Path(str(path) + ".json").is_file() and (b"\0" in data or not _is_utf8(data)):
        raise BadInputError(f"{path} is a token file made by `gptforge prepare`, not text: train on "
                            f"it with `gptforge pretrain --data {path}`, and leave it out of text inputs")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise BadInputError(f"{path} is not UTF-8 text: the byte at offset {err.start} (line {line}) "
                            f"is 0x{data[err.start]:02x}, which UTF-8 cannot decode; convert the file "
                            f"to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out") from None
    nul = text.find("\0")
    if nul != -1:
        raise BadInputError(f"{path} holds NUL bytes (the first at character {nul}): it is a binary "
                            f"file, not text; give text files (UTF-8) here")
    return text


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_texts(patterns: Sequence[str | os.PathLike]) -> str:
    """Read and join the text of files, directories and globs (documents separated by <|endoftext|>)."""
    return "<|endoftext|>".join(read_text_file(f) for f in expand_paths(patterns))


def _chunks(text: str, size: int = 1 << 20) -> Iterator[str]:
    """Split a long text into pieces of about `size` characters, at line ends."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end == -1 else end + 1
        yield text[start:end]
        start = end


def check_output_file(path: str | os.PathLike, what: str = "the output file") -> None:
    """Refuse an output path that cannot become a file: an existing directory, or one
    below something that is not a directory."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{what} {path} is an existing directory; give a file name "
                            f"(e.g. {path / 'out'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInputError(f"{what} {path} cannot be written: {parent} is a file, not a "
                                    f"directory")
            break


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
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise BadInputError(f"num_threads (--threads) must be a whole number of at least 1, not "
                            f"{num_threads!r}")
    files = expand_paths(inputs)
    out = Path(out)
    check_output_file(out, "the token file")
    if any(out.resolve() == f.resolve() for f in files):
        raise BadInputError(f"the token file {out} is one of the inputs; writing it would replace "
                            f"that text: choose another --out")
    tokenizer = get_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = num_threads or os.cpu_count() or 1
    n_tokens = 0
    with atomic_write(out) as f:
        for path in files:
            text = read_text_file(path)
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

    def _order(self) -> list[int]:
        """This epoch's order of the dataset's indices."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        per_rank = self.batch_size // self.world_size
        for b in range(self.start_batch, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world_size > 1:
                batch = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            yield batch


def _global_int64() -> int:
    """One 64-bit draw from torch's global RNG, as DataLoader and RandomSampler make theirs."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class GlobalSeedBatchSampler(ResumableBatchSampler):
    """Batches drawn from torch's global RNG exactly as `DataLoader(data, batch_size,
    shuffle=..., drop_last=...)` without a generator draws them, on one process.

    Each pass such a loader makes draws a 64-bit base seed when its iterator is created
    (for its workers, drawn even with none), and a shuffling one then draws a second,
    which seeds RandomSampler's permutation. This sampler makes the same two draws when
    a pass starts from its first batch, so a run seeded with `torch.manual_seed` sees
    the batches (and afterwards the random state) of the book's loaders. A pass resumed
    mid-way (`start_batch` > 0) makes no draws: it reuses `pass_seed`, the seed of the
    pass it continues, which a checkpoint must therefore keep.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool) -> None:
        super().__init__(n, batch_size, shuffle, drop_last, seed=0)
        self.pass_seed: int | None = None

    def _order(self) -> list[int]:
        if self.start_batch == 0:
            _global_int64()  # the loader iterator's base seed, unused without workers
            self.pass_seed = _global_int64() if self.shuffle else None
        if not self.shuffle:
            return list(range(self.n))
        if self.pass_seed is None:
            raise BadInputError("a shuffled pass resumed mid-way needs the seed it was shuffled "
                                "with (pass_seed); the checkpoint holds none")
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.pass_seed)).tolist()
