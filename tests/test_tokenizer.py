import hashlib
import shutil

import pytest
import tiktoken

from gptforge import get_tokenizer
from gptforge.tokenizer import _TIKTOKEN_URLS, EOT_ID, TokenizerFilesError

EDGE_CASES = [
    "", " ", "\n\n\n", "  hello\n\n world  ", "Héllo wörld, 世界! 🤖🤖", "it's you'll we've they're I'd",
    "\t\tindented\r\nwindows\r\n", "123456789 3.14159 1e-10", "a\u00a0b\u2028c\u200bd",
    "<|endoftext|>", "text<|endoftext|>more", "ALL CAPS!!! ???...", "   leading and trailing   ",
    "x" * 500, "\U0001F600" * 10, "é" * 30 + "\x00\x01\x7f",
]


# The tokenizer files under their gptforge resource names.
BPE_FILES = {"encoder.json": "gpt2-encoder", "vocab.bpe": "gpt2-vocab"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fetch):
    """tiktoken's own gpt2 encoding, its download cache filled with the files gptforge fetched."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in _TIKTOKEN_URLS.items():
        shutil.copy(fetch(BPE_FILES[name]), cache / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    # tiktoken caches constructed encodings per process; build ours from the filled cache.
    enc = tiktoken.get_encoding("gpt2")
    mp.undo()
    return enc


@pytest.mark.parametrize("name", ["the-verdict", "tinyshakespeare"])
def test_same_ids_as_tiktoken_on_corpora(reference, fetch, name):
    text = fetch(name).read_text(encoding="utf-8")
    assert get_tokenizer().encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_same_ids_as_tiktoken_on_edge_cases(reference, text):
    tok = get_tokenizer()
    assert tok.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_special_token_handled_as_tiktoken():
    tok = get_tokenizer()
    assert tok.n_vocab == 50257
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [EOT_ID]
    with pytest.raises(ValueError):
        tok.encode("<|endoftext|>")  # disallowed by default, as in tiktoken
    assert EOT_ID not in tok.encode("<|endoftext|>", disallowed_special=())


def test_loaded_once():
    assert get_tokenizer() is get_tokenizer()


def test_user_directory(tmp_path, fetch):
    for name, resource in BPE_FILES.items():
        shutil.copy(fetch(resource), tmp_path / name)
    tok = get_tokenizer(str(tmp_path))
    assert tok.encode("Every effort moves you") == get_tokenizer().encode("Every effort moves you")


def test_user_directory_with_bad_files_fails_clearly(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerFilesError, match="sha256"):
        get_tokenizer.__wrapped__(str(tmp_path))
