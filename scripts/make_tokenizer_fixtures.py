"""Turn the GGUF tokenizer files of released models into Hugging Face tokenizer directories.

The tests check gptforge's `HFTokenizer` against transformers on the real tokenizers of
Llama 3, Qwen, Phi-3, GPT-2 and Gemma 4. Those come as llama.cpp's weightless GGUF files
(`vocab-*` in gptforge's download registry): the token list, the merges or scores, the token
types and the special-token ids. transformers builds a tokenizer from such a file (this needs
the `gguf` package) and its `save_pretrained` writes the tokenizer.json and
tokenizer_config.json a user downloads with a model. Some fixtures get more, to look like the
released model's files:

- a chat template from the registry, written either into tokenizer_config.json (the older
  layout) or as chat_template.jinja (the newer one); without one, a fixture keeps the template
  the GGUF carries, if any;
- a tokenizer.json post-processor that puts the BOS first, as Meta's Llama 3 tokenizer.json
  has (the GGUF conversion adds none);
- a generation_config.json with the model's stop ids.

The tests call `build_fixture`; by hand:

    .venv/bin/pip install gguf transformers
    GPTFORGE_DATA_MIRROR=../shared/data .venv/bin/python scripts/make_tokenizer_fixtures.py --out /tmp/tok
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fixture:
    """One tokenizer directory: the GGUF it comes from and what is added to look like the release.

    `vocab` and `chat_template` are names in gptforge's download registry.
    """

    vocab: str
    chat_template: str | None = None
    template_in_config: bool = False
    bos_first: bool = False
    generation_config: Mapping[str, Any] = field(default_factory=dict)


FIXTURES: dict[str, Fixture] = {
    "gpt2": Fixture("vocab-gpt-2"),
    # Llama 3.1 Instruct: template in tokenizer_config.json, BOS from the post-processor, three stop ids.
    "llama3": Fixture(
        "vocab-llama-bpe",
        chat_template="chat-template-meta-llama-Llama-3.1-8B-Instruct",
        template_in_config=True,
        bos_first=True,
        generation_config={"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    ),
    # Qwen3 shares the Qwen2 vocabulary; its template goes in chat_template.jinja.
    "qwen3": Fixture("vocab-qwen2", chat_template="chat-template-Qwen-Qwen3-0.6B"),
    "phi3": Fixture("vocab-phi-3", chat_template="chat-template-microsoft-Phi-3.5-mini-instruct"),
    # Gemma 4 keeps the template its GGUF carries (turns end with <turn|>).
    "gemma4": Fixture("vocab-gemma-4"),
}


def build_tokenizer_dir(
    gguf: Path,
    out_dir: Path,
    *,
    chat_template: str | None = None,
    template_in_config: bool = False,
    bos_first: bool = False,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face tokenizer directory for the GGUF file `gguf` into `out_dir`."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    # Not AutoTokenizer: its GGUF path first builds a model config from the file, which takes
    # many seconds on a large vocabulary and fails on Gemma 4's per-layer settings. This class
    # reads only the tokenizer and picks the same per-family builder.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=not template_in_config)

    if bos_first:
        bos = tokenizer.bos_token
        path = out_dir / "tokenizer.json"
        backend = Tokenizer.from_file(str(path))
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                          special_tokens=[(bos, backend.token_to_id(bos))]),
        ])
        backend.save(str(path))
    if generation_config:
        (out_dir / "generation_config.json").write_text(json.dumps(dict(generation_config), indent=2) + "\n")
    return out_dir


def build_fixture(name: str, out_root: Path, fetch: Callable[[str], Path] | None = None) -> Path:
    """Build fixture `name` of `FIXTURES` as `out_root/name` and return that directory.

    `fetch(resource_name)` returns the path of a registry file (default: gptforge's `download`).
    """
    if fetch is None:
        from gptforge.download import download

        def fetch(resource: str) -> Path:
            return download(resource, progress=False)

    spec = FIXTURES[name]
    template = fetch(spec.chat_template).read_text(encoding="utf-8") if spec.chat_template else None
    return build_tokenizer_dir(fetch(spec.vocab), out_root / name, chat_template=template,
                               template_in_config=spec.template_in_config, bos_first=spec.bos_first,
                               generation_config=spec.generation_config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write one directory per fixture into")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"fixtures to build (default: all of {', '.join(FIXTURES)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(FIXTURES))
    if unknown:
        parser.error(f"unknown fixture(s) {', '.join(unknown)}; choose from {', '.join(FIXTURES)}")
    for name in args.names or FIXTURES:
        print(build_fixture(name, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
