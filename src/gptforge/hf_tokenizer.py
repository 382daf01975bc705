"""Hugging Face tokenizers (a model directory's tokenizer.json) behind tiktoken's methods.

gptforge's GPT-2 tokenizer is a tiktoken `Encoding`. Llama 3, Qwen, Phi-3 and Gemma ship
theirs as a Hugging Face `tokenizer.json`, with `tokenizer_config.json` (special tokens, chat
template), sometimes `chat_template.jinja`, and `generation_config.json` / `config.json`
(the ids that end a reply). `HFTokenizer` wraps such a directory and answers the tiktoken
methods gptforge calls (`encode`, `encode_ordinary`, `encode_ordinary_batch`, `decode`,
`decode_single_token_bytes`, `n_vocab`) with the same meaning, so code can take either;
`load_tokenizer` picks the right one for a directory.

Special tokens and the BOS:

- `encode_ordinary(text)` and `encode_ordinary_batch(texts)`: the text as plain text. The
  text of a special token ("<|eot_id|>") is split like any other text; tokens the tokenizer
  adds as non-special (Qwen3's "<think>") are still matched whole, as transformers does.
  Never adds a BOS.
- `encode(text, allowed_special=..., disallowed_special="all")`: as in tiktoken, the allowed
  special tokens become their ids, a disallowed one in the text raises `BadInputError` (a
  `ValueError`), others are plain text. Never adds a BOS. Encode a prompt rendered by the
  chat template with `allowed_special="all"`: the template writes the BOS itself.
- `encode_prompt(text)`: a whole model input, as transformers' `tokenizer(text).input_ids`:
  whatever tokenizer.json's post-processor adds (Llama 3's `<|begin_of_text|>`, Phi-3's
  `<s>`; nothing for Qwen), then the text with special tokens recognized. The one method that
  adds a BOS: to tokenize a prompt and its answer apart and join them, use `encode_ordinary`
  (or `encode`) for both and put `bos_id` in front once, if it is not None.

tokenizer.json's post-processor alone says whether a BOS is added, as transformers 5 reads
it; an `add_bos_token` in tokenizer_config.json that disagrees is logged and not followed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from gptforge.errors import BadInputError, CheckpointError, GptforgeError, NotFoundError

if TYPE_CHECKING:
    import tiktoken
    import tokenizers

logger = logging.getLogger(__name__)

__all__ = ["HFTokenizer", "TokenizerDependencyError", "load_tokenizer", "save_tokenizer_files"]

PathLike = Union[str, os.PathLike]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"

# The named special tokens transformers hands to a chat template (its special_tokens_map).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# A SentencePiece byte-fallback token: <0x0A> is the byte 0x0A.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


class TokenizerDependencyError(GptforgeError, ImportError):
    """The `tokenizers` package, needed to read a Hugging Face tokenizer.json, is not installed."""


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise TokenizerDependencyError(
            "Reading a Hugging Face tokenizer.json needs the `tokenizers` package: pip install tokenizers"
        ) from exc
    return tokenizers


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        message = f"{path} is not readable JSON ({exc}); download the model's tokenizer files again"
        raise CheckpointError(message) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object; download it again")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any, where: str) -> list[int]:
    """`eos_token_id` as a config gives it: an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{where} is {value!r}; it must be a token id or a list of token ids")
    return list(values)


def _decoder_steps(state: bytes | None) -> list[dict[str, Any]]:
    """The steps of a serialized tokenizers decoder, a Sequence flattened."""
    if not state:
        return []
    node = json.loads(state)
    steps = node.get("decoders") if node.get("type") == "Sequence" else [node]
    return [step for step in steps or [] if isinstance(step, dict)]


class HFTokenizer:
    """A Hugging Face tokenizer with the methods of tiktoken's `Encoding` that gptforge uses.

    Build one with `HFTokenizer.from_dir(model_dir)` (or `load_tokenizer`). Besides the tiktoken
    methods it knows the model's `bos_id` (the BOS `encode_prompt` puts first, or None),
    `eos_ids` (every id that ends a reply: the generation config's, the tokenizer's
    `eos_token` and the chat template's end-of-turn tokens such as `<|eot_id|>`), its
    `chat_template` (or None) and `special_tokens_map` (what the template sees as `bos_token`,
    `eos_token`, ...). See the module docstring for how each method treats special tokens.

    The constructor takes a loaded `tokenizers.Tokenizer`, the tokenizer_config.json contents
    as `config`, the chat template, the generation config's stop ids as `extra_eos_ids`, and
    the directory the files came from (which `save_tokenizer_files` copies them from).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
        name: str = "hf",
        source_dir: PathLike | None = None,
    ) -> None:
        self._backend = backend
        self._config = dict(config or {})
        self._source = Path(source_dir) if source_dir is not None else None
        self.name = name
        self.chat_template = chat_template
        # encode_special_tokens is one switch on the shared backend; the lock keeps a call's setting.
        self._lock = threading.Lock()
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False

        added = backend.get_added_tokens_decoder()
        self._added_text: dict[int, str] = {i: t.content for i, t in added.items()}
        self.special_tokens_set: set[str] = {t.content for t in added.values() if t.special}
        self.n_vocab: int = max([backend.get_vocab_size(with_added_tokens=False), *(i + 1 for i in added)])

        self.special_tokens_map: dict[str, str] = {}
        for key in _NAMED_SPECIALS:
            token = _token_text(self._config.get(key))
            if token is not None:
                self.special_tokens_map[key] = token
        for key in ("bos_token", "eos_token"):
            token = self.special_tokens_map.get(key)
            if token is not None and backend.token_to_id(token) is None:
                raise CheckpointError(f"The tokenizer config names {key} {token!r}, which is not in the tokenizer's "
                                      "vocabulary: the tokenizer files do not belong together")
        self.bos_token: str | None = self.special_tokens_map.get("bos_token")
        self.eos_token: str | None = self.special_tokens_map.get("eos_token")
        self.eot_token: int | None = backend.token_to_id(self.eos_token) if self.eos_token else None

        self.bos_id: int | None = self._find_bos()
        eos_ids = set(extra_eos_ids)
        if self.eot_token is not None:
            eos_ids.add(self.eot_token)
        if chat_template:
            from gptforge.chat_template import end_of_turn_tokens

            ends = end_of_turn_tokens(chat_template, self._added_text.values(), **self.special_tokens_map)
            eos_ids.update(i for i in map(backend.token_to_id, ends) if i is not None)
        bad = sorted(i for i in eos_ids if not 0 <= i < self.n_vocab)
        if bad:
            raise CheckpointError(f"End-of-reply token ids {bad} are outside the vocabulary (0..{self.n_vocab - 1})")
        self.eos_ids: frozenset[int] = frozenset(eos_ids)

        byte_level, self._metaspace, self._byte_fallback = self._token_spelling()
        # GPT-2's byte alphabet (character -> byte) when the vocabulary is spelled in it.
        self._alphabet: dict[str, int] | None = None
        if byte_level:
            from gptforge.tokenizer import _byte_alphabet

            self._alphabet = _byte_alphabet()
        self._token_bytes: dict[int, bytes] = {}
        self._special_pattern: re.Pattern[str] | None = None

    @classmethod
    def from_dir(cls, model_dir: PathLike) -> HFTokenizer:
        """Load the tokenizer of a Hugging Face model directory (it must hold tokenizer.json).

        Reads tokenizer_config.json (and the older special_tokens_map.json) for the special
        tokens, chat_template.jinja or the config's `chat_template` for the chat template, and
        the `eos_token_id` of generation_config.json, else of config.json, for the stop ids.
        Raises `NotFoundError` without tokenizer.json and `CheckpointError` on broken files.
        """
        tokenizers = _import_tokenizers()
        directory = Path(model_dir)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise NotFoundError(f"{directory} holds no {TOKENIZER_FILE}; it is not a Hugging Face tokenizer directory")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust parser raises a bare Exception
            raise CheckpointError(f"{path} is not a tokenizer.json the `tokenizers` package can read ({exc}); "
                                  "download the model's tokenizer files again") from exc

        config = _read_json(directory / TOKENIZER_CONFIG_FILE) or {}
        legacy = _read_json(directory / SPECIAL_TOKENS_MAP_FILE) or {}
        config = {**{k: v for k, v in legacy.items() if k in _NAMED_SPECIALS}, **config}

        template = _template_from(directory, config)
        eos_ids: list[int] = []
        for file in (GENERATION_CONFIG_FILE, MODEL_CONFIG_FILE):
            data = _read_json(directory / file)
            if data is None:
                continue
            text_config = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
            value = data.get("eos_token_id", text_config.get("eos_token_id"))
            eos_ids = _id_list(value, f"eos_token_id in {directory / file}")
            if eos_ids:
                break
        return cls(backend, config=config, chat_template=template, extra_eos_ids=eos_ids,
                   name=directory.resolve().name or "hf", source_dir=directory)

    # -- what the tokenizer files say -------------------------------------------------------

    def _find_bos(self) -> int | None:
        """The BOS the post-processor puts before a text, read off a probe encoding."""
        probe = "a"
        plain = self._backend.encode(probe, add_special_tokens=False).ids
        full = self._backend.encode(probe, add_special_tokens=True).ids
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        prefix = full[:start]
        bos = prefix[0] if len(prefix) == 1 else None
        if len(prefix) > 1:
            logger.warning("The tokenizer puts %d tokens before a text; bos_id is None", len(prefix))
        flag = self._config.get("add_bos_token")
        if isinstance(flag, bool) and flag != (bos is not None):
            logger.warning("tokenizer_config.json says add_bos_token=%s but tokenizer.json's post-processor %s a "
                           "BOS; following tokenizer.json, as transformers does", flag,
                           "adds" if bos is not None else "adds no")
        return bos

    def _token_spelling(self) -> tuple[bool, str | None, bool]:
        """How vocabulary entries spell bytes: (byte-level, SentencePiece space mark, byte fallback)."""
        decoder = self._backend.decoder
        steps = _decoder_steps(decoder.__getstate__() if decoder is not None else None)
        types = {step.get("type") for step in steps}
        byte_fallback = "ByteFallback" in types or bool(getattr(self._backend.model, "byte_fallback", False))
        if "ByteLevel" in types:
            return True, None, False
        for step in steps:
            if step.get("type") == "Metaspace":
                return False, step.get("replacement") or _METASPACE, byte_fallback
            if step.get("type") == "Replace" and step.get("content") == " ":
                pattern = step.get("pattern") or {}
                if isinstance(pattern.get("String"), str):
                    return False, pattern["String"], byte_fallback
        return False, None, byte_fallback

    # -- encoding ---------------------------------------------------------------------------

    def _encode(self, text: str, *, specials: bool) -> list[int]:
        with self._lock:
            self._backend.encode_special_tokens = not specials
            try:
                return self._backend.encode(text, add_special_tokens=False).ids
            finally:
                self._backend.encode_special_tokens = False

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` as plain text: special tokens' text is split like any other. No BOS."""
        return self._encode(text, specials=False)

    def encode_ordinary_batch(self, texts: Sequence[str], *, num_threads: int = 8) -> list[list[int]]:
        """`encode_ordinary` of each text, encoded in parallel.

        `num_threads` is accepted for tiktoken's signature; the `tokenizers` package sizes its
        own thread pool (set RAYON_NUM_THREADS to change it).
        """
        with self._lock:
            self._backend.encode_special_tokens = True
            try:
                # encode_batch_fast (tokenizers 0.20+) skips the character offsets nobody here reads.
                batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
                return [e.ids for e in batch(list(texts), add_special_tokens=False)]
            finally:
                self._backend.encode_special_tokens = False

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode `text`, turning the `allowed_special` tokens' text into their ids. No BOS.

        As in tiktoken: the text of a special token in `disallowed_special` (by default every
        special token not allowed) raises `BadInputError`; one in neither set is plain text.
        `allowed_special="all"` is what a rendered chat prompt needs.
        """
        allowed = self.special_tokens_set if allowed_special == "all" else set(allowed_special)
        disallowed = self.special_tokens_set - allowed if disallowed_special == "all" else set(disallowed_special)
        present = {m.group() for m in self._specials().finditer(text)} if self.special_tokens_set else set()
        refused = sorted(present & disallowed)
        if refused:
            raise BadInputError(
                f"The text holds the special token {refused[0]!r}. To encode it as that token pass it in "
                "allowed_special (allowed_special='all' for every special token); to encode it as plain "
                "text use encode_ordinary, or leave it out of disallowed_special"
            )
        if present <= allowed:
            return self._encode(text, specials=bool(present))
        wanted = present & allowed
        if not wanted:
            return self._encode(text, specials=False)
        # Some special tokens' text stays plain: encode the pieces around the allowed ones apart.
        pattern = re.compile("|".join(map(re.escape, sorted(wanted, key=len, reverse=True))))
        ids: list[int] = []
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                ids += self._encode(text[start:match.start()], specials=False)
            ids.append(self._backend.token_to_id(match.group()))
            start = match.end()
        return ids + (self._encode(text[start:], specials=False) if start < len(text) else [])

    def encode_prompt(self, text: str) -> list[int]:
        """Encode a whole model input as transformers' `tokenizer(text).input_ids` does.

        What tokenizer.json's post-processor adds (this model's BOS, if any, so `bos_id`
        first), then `text` with its special tokens recognized. The only method that adds a BOS.
        """
        with self._lock:
            return self._backend.encode(text, add_special_tokens=True).ids

    def _specials(self) -> re.Pattern[str]:
        if self._special_pattern is None:
            ordered = sorted(self.special_tokens_set, key=len, reverse=True)
            self._special_pattern = re.compile("|".join(map(re.escape, ordered)))
        return self._special_pattern

    # -- decoding ---------------------------------------------------------------------------

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise BadInputError(f"Token id {bad[0]} is outside this tokenizer's vocabulary (0..{self.n_vocab - 1})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens included, by the tokenizer's own decoder.

        Like transformers' `decode(ids, skip_special_tokens=False,
        clean_up_tokenization_spaces=False)`, so `decode(encode_ordinary(text)) == text`
        (a SentencePiece decoder drops the space it put before the text). One exception, as in
        transformers: a SentencePiece tokenizer that marks the start of a text with a space
        (Phi-3) puts one after each added token met in the text too, and decode keeps it.
        """
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token, which may be part of a UTF-8 character.

        Byte-level BPE tokens are read through GPT-2's byte alphabet; SentencePiece tokens with
        their space mark as a space and `<0xNN>` byte tokens as that byte; added tokens
        (`<|eot_id|>`) as their text. Joined, they are the text's UTF-8 bytes (a SentencePiece
        tokenizer's first word keeps the space that `decode` drops).
        """
        (token,) = self._check_ids([token])
        cached = self._token_bytes.get(token)
        if cached is not None:
            return cached
        piece = self._added_text.get(token)
        if piece is not None:
            data = piece.encode("utf-8")
        else:
            data = self._vocab_bytes(token)
        self._token_bytes[token] = data
        return data

    def _vocab_bytes(self, token: int) -> bytes:
        piece = self._backend.id_to_token(token)
        if piece is None:
            raise BadInputError(f"Token id {token} has no entry in this tokenizer's vocabulary")
        if self._alphabet is not None:
            if all(ch in self._alphabet for ch in piece):
                return bytes(self._alphabet[ch] for ch in piece)
            return piece.encode("utf-8")
        if self._metaspace is not None:
            match = _BYTE_TOKEN.fullmatch(piece) if self._byte_fallback else None
            if match:
                return bytes([int(match.group(1), 16)])
            return piece.replace(self._metaspace, " ").encode("utf-8")
        # Another decoder (WordPiece, say): the token as the decoder writes it alone.
        return self._backend.decode([token], skip_special_tokens=False).encode("utf-8")

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            **variables: Any) -> str:
        """Render `messages` with this model's chat template and special tokens (see `render_chat`).

        Encode the result with `encode(text, allowed_special="all")`. Raises `BadInputError`
        when the tokenizer has no chat template or the template refuses the messages.
        """
        if not self.chat_template:
            raise BadInputError(f"The tokenizer {self.name!r} has no chat template; format the prompt yourself "
                                "or use a chat model's tokenizer")
        from gptforge.chat_template import render_chat

        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{**self.special_tokens_map, **variables})

    def __repr__(self) -> str:
        return f"<HFTokenizer {self.name!r} n_vocab={self.n_vocab} bos_id={self.bos_id} eos_ids={sorted(self.eos_ids)}>"


def _template_from(directory: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template: chat_template.jinja if present, else tokenizer_config.json's."""
    file = directory / CHAT_TEMPLATE_FILE
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"Cannot read {file} ({exc}); download it again") from exc
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template or None
    if isinstance(template, list):
        # An older layout: several named templates, of which "default" is the chat one.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        logger.warning("%s lists chat templates %s but none named 'default'; using none",
                       directory / TOKENIZER_CONFIG_FILE, sorted(map(str, named)))
        return None
    raise CheckpointError(f"chat_template in {directory / TOKENIZER_CONFIG_FILE} is a {type(template).__name__}, "
                          "not a string")


def load_tokenizer(model_dir: PathLike | None = None) -> tiktoken.Encoding | HFTokenizer:
    """The tokenizer of a model directory: an `HFTokenizer` when it holds tokenizer.json.

    With no directory, or one without tokenizer files (a GPT-2 checkpoint), gptforge's GPT-2
    tokenizer (`gptforge.tokenizer.get_tokenizer()`). Raises `NotFoundError` for a directory
    that does not exist, and `CheckpointError` for one with a tokenizer_config.json or a
    SentencePiece tokenizer.model but no tokenizer.json, rather than quietly using GPT-2's.
    Each call reads the files again; keep the result.
    """
    from gptforge.tokenizer import get_tokenizer

    if model_dir is None:
        return get_tokenizer()
    directory = Path(model_dir)
    if not directory.is_dir():
        raise NotFoundError(f"{directory} is not a directory; name the model directory that holds the tokenizer")
    if (directory / TOKENIZER_FILE).is_file():
        return HFTokenizer.from_dir(directory)
    for other in (TOKENIZER_CONFIG_FILE, "tokenizer.model"):
        if (directory / other).is_file():
            raise CheckpointError(
                f"{directory} holds {other} but no {TOKENIZER_FILE}; gptforge reads Hugging Face tokenizers from "
                f"{TOKENIZER_FILE} only. Download it with the model, or write it with transformers "
                "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            )
    return get_tokenizer()


def save_tokenizer_files(tokenizer: tiktoken.Encoding | HFTokenizer, out_dir: PathLike) -> list[Path]:
    """Write the files `load_tokenizer(out_dir)` needs to rebuild `tokenizer`; returns their paths.

    For an `HFTokenizer`: tokenizer.json as it was read, tokenizer_config.json with the chat
    template in it (a chat_template.jinja already in the folder is rewritten to match, or
    removed when there is no template, since it would win on loading), and the source's
    generation_config.json, which holds the stop ids, when the folder has none. GPT-2's
    tiktoken tokenizer needs no files: nothing is written.
    """
    from gptforge.fileio import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    if not isinstance(tokenizer, HFTokenizer):
        if getattr(tokenizer, "name", None) == "gpt2":
            return []
        raise BadInputError(f"Cannot save tokenizer {tokenizer!r}: only an HFTokenizer or GPT-2's tiktoken "
                            "tokenizer can go with a model directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    source = tokenizer._source
    target = out / TOKENIZER_FILE
    if source is not None and (source / TOKENIZER_FILE).is_file():
        if (source / TOKENIZER_FILE).resolve() != target.resolve():
            atomic_write_bytes(target, (source / TOKENIZER_FILE).read_bytes())
    else:
        atomic_write_bytes(target, tokenizer._backend.to_str().encode("utf-8"))
    written.append(target)

    config = dict(tokenizer._config)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    else:
        config.pop("chat_template", None)
    atomic_write_json(out / TOKENIZER_CONFIG_FILE, config)
    written.append(out / TOKENIZER_CONFIG_FILE)
    jinja = out / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        if tokenizer.chat_template:
            atomic_write_bytes(jinja, tokenizer.chat_template.encode("utf-8"))
            written.append(jinja)
        else:
            jinja.unlink()

    generation = out / GENERATION_CONFIG_FILE
    if source is not None and (source / GENERATION_CONFIG_FILE).is_file() and not generation.exists():
        shutil.copyfile(source / GENERATION_CONFIG_FILE, generation)
        written.append(generation)
    return written


# -- exporting GPT-2's tokenizer in Hugging Face's formats -------------------------------------

GPT2_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def gpt2_merges(vocab_bpe: bytes) -> list[tuple[str, str]]:
    """The merge rules of OpenAI's vocab.bpe, in rank order, as (left, right) pairs."""
    lines = vocab_bpe.decode("utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"vocab.bpe line {number} is {line!r}, not two tokens; download the file again")
        merges.append((parts[0], parts[1]))
    return merges


def gpt2_backend(encoder_json: bytes, vocab_bpe: bytes) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE as a `tokenizers.Tokenizer`, the same ids as gptforge's tiktoken one.

    Built as Hugging Face's own GPT-2 tokenizer.json is: the vocabulary and merges of OpenAI's
    files, byte-level pre-tokenization with GPT-2's split pattern and no prefix space, a
    byte-level decoder, and `<|endoftext|>` as the one special token.
    """
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, processors

    from gptforge.tokenizer import ENDOFTEXT

    vocab = json.loads(encoder_json)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=gpt2_merges(vocab_bpe), fuse_unk=False,
                                              byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([tokenizers.AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return backend


def save_gpt2_tokenizer_files(out_dir: PathLike, directory: PathLike | None = None) -> list[Path]:
    """Write GPT-2's tokenizer as Hugging Face ships it: tokenizer.json, vocab.json, merges.txt.

    vocab.json and merges.txt are OpenAI's encoder.json and vocab.bpe (found as
    `gptforge.tokenizer.get_tokenizer` finds them, or in `directory`); tokenizer.json is
    `gpt2_backend` of them. Returns the paths written.
    """
    from gptforge.fileio import atomic_write_bytes
    from gptforge.tokenizer import _load_files

    encoder_json, vocab_bpe = _load_files(directory)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = gpt2_backend(encoder_json, vocab_bpe)
    contents = (backend.to_str().encode("utf-8"), encoder_json, vocab_bpe)
    paths = [out / name for name in GPT2_FILES]
    for path, data in zip(paths, contents):
        atomic_write_bytes(path, data)
    return paths
