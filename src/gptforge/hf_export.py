"""The tokenizer and generation files that make an exported directory usable as it stands.

`convert(..., to="hf")` writes the weights and config.json; this module adds what
`transformers.pipeline("text-generation", out)` and `AutoTokenizer.from_pretrained(out)`
read besides, so that other tools take the directory unchanged:

- the tokenizer: GPT-2's rebuilt from OpenAI's files (tokenizer.json, vocab.json,
  merges.txt), or a family model's own tokenizer.json;
- tokenizer_config.json: the tokenizer class, the special tokens, `model_max_length` (the
  model's context length) and the chat template, and special_tokens_map.json;
- generation_config.json: the BOS, the ids that end a reply (an instruction run's
  end-of-turn token first) and the padding id, the same ids that go into config.json.

The chat template is the one the run was trained with: a model's own (Llama 3, Qwen3,
Gemma 3) as its tokenizer has it, or for the Alpaca and Phi-3 prompt formats a Jinja
template, written here, that renders exactly the text gptforge trains on and prompts with
(`alpaca_style_template`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.checkpoint import RunMeta
from gptforge.errors import BadInputError
from gptforge.fileio import atomic_write_bytes, atomic_write_json
from gptforge.finetune.templates import ALPACA_PREAMBLE, TEMPLATES

logger = logging.getLogger(__name__)

__all__ = ["ExportTokens", "alpaca_style_template", "export_tokens", "write_tokenizer_files"]

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ExportTokens:
    """The special tokens of an exported model, by text and by id.

    `eos_ids` are all the ids that end a reply, the one training appends first;
    `chat_template` is the template to ship (None: none). `bos_id` is the BOS the
    tokenizer puts first (None for GPT-2 and Qwen, which put none), while `bos_token` and
    `bos_token_id` name the tokenizer's BOS even when it is not added (GPT-2's `<|endoftext|>`).
    """

    bos_token: str | None
    bos_token_id: int | None
    bos_id: int | None
    eos_token: str | None
    eos_ids: tuple[int, ...]
    pad_token: str | None
    pad_id: int | None
    chat_template: str | None
    add_bos: bool

    def config_ids(self) -> dict[str, Any]:
        """The special-token ids as config.json and generation_config.json give them."""
        eos: int | list[int] | None = list(self.eos_ids) if len(self.eos_ids) > 1 else (
            self.eos_ids[0] if self.eos_ids else None)
        return {"bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_id}


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (JSON's double-quoted escapes are Jinja's too)."""
    return json.dumps(text, ensure_ascii=False)


def alpaca_style_template(name: str, *, bos: str | None = None, end: str | None = None) -> str:
    """A Jinja chat template that renders gptforge's "alpaca" or "phi3" prompt format.

    The last user message is the instruction; system messages and earlier turns become
    the input, one line each ("User: ...", "Assistant: ..."), as gptforge's own chat does.
    A final assistant message is the answer, followed by `end` (the token training appends
    after an answer), so a rendered conversation is exactly what gptforge trains on; without
    one the text ends with the response header, whether or not a generation prompt is asked
    for. `bos` (the BOS the tokenizer puts first, if any) starts the text.
    """
    if name not in TEMPLATES:
        raise BadInputError(f"no Jinja version of prompt template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if name == "alpaca":
        head = _jinja_string(f"{ALPACA_PREAMBLE}\n\n### Instruction:\n")
        extra, response = _jinja_string("\n\n### Input:\n"), _jinja_string("\n\n### Response:\n")
    else:
        head, extra, response = _jinja_string("<|user|>\n"), _jinja_string("\n"), _jinja_string("\n<|assistant|>\n")
    parts = [
        "{%- if messages | length == 0 -%}{{ raise_exception('There are no messages to format.') }}{%- endif -%}",
        "{%- if messages[-1]['role'] == 'assistant' -%}"
        "{%- set answer = messages[-1]['content'] -%}{%- set turns = messages[:-1] -%}"
        "{%- else -%}{%- set answer = none -%}{%- set turns = messages -%}{%- endif -%}",
        "{%- if turns | length == 0 or turns[-1]['role'] != 'user' -%}"
        "{{ raise_exception('The last message must come from the user, or be the answer to one.') }}{%- endif -%}",
        "{%- set ns = namespace(lines=[]) -%}",
        "{%- for message in turns[:-1] -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.lines = ns.lines + [message['content']] -%}"
        "{%- elif message['role'] in ['user', 'assistant'] -%}"
        "{%- set ns.lines = ns.lines + [(message['role'] | capitalize) ~ ': ' ~ message['content']] -%}"
        "{%- else -%}{{ raise_exception('Unknown message role ' ~ message['role'] ~ '; use system, user or "
        "assistant.') }}{%- endif -%}"
        "{%- endfor -%}",
        "{%- set context = ns.lines | join('\\n') -%}",
        f"{{{{- {_jinja_string(bos)} -}}}}" if bos else "",
        f"{{{{- {head} ~ turns[-1]['content'] -}}}}",
        f"{{%- if context -%}}{{{{- {extra} ~ context -}}}}{{%- endif -%}}",
        f"{{{{- {response} -}}}}",
        "{%- if answer is not none -%}{{- answer -}}" + (f"{{{{- {_jinja_string(end)} -}}}}" if end else "")
        + "{%- endif -%}",
    ]
    return "\n".join(part for part in parts if part)


def export_tokens(tokenizer, meta: RunMeta | None) -> ExportTokens:
    """The special tokens and chat template an export of a model with `tokenizer` ships.

    `meta` is the run's metadata: an instruction run's template decides the chat template
    and which id ends an answer (the one its training appended comes first).
    """
    from gptforge.finetune.instruct import end_ids
    from gptforge.finetune.templates import ChatTemplate, PromptTemplate, get_template
    from gptforge.hf_tokenizer import HFTokenizer

    name = meta.template if meta is not None and meta.task == "instruct" else None
    own = getattr(tokenizer, "chat_template", None)
    template: PromptTemplate | ChatTemplate | None = None
    if name is not None:
        template = get_template(name, tokenizer)
    elif own:
        template = get_template("chat", tokenizer)
    ends = end_ids(tokenizer, template) if template is not None else end_ids(tokenizer, TEMPLATES["alpaca"])

    if isinstance(tokenizer, HFTokenizer):
        bos_token, bos_id = tokenizer.bos_token, tokenizer.bos_id
        bos_token_id = tokenizer._backend.token_to_id(bos_token) if bos_token else bos_id
        eos_token = tokenizer.eos_token
        pad_token = tokenizer.special_tokens_map.get("pad_token")
        pad_id = tokenizer._backend.token_to_id(pad_token) if pad_token else None
        eos_ids = list(ends) + sorted(set(tokenizer.eos_ids) - set(ends))
    else:  # GPT-2's BPE: <|endoftext|> begins, ends and pads
        from gptforge.tokenizer import ENDOFTEXT, EOT_ID

        bos_token = eos_token = pad_token = ENDOFTEXT
        bos_id, bos_token_id, pad_id, eos_ids = None, EOT_ID, EOT_ID, [EOT_ID]
    if pad_id is None and eos_ids:
        pad_id = eos_ids[0]
        pad_token = tokenizer.decode([pad_id])

    chat: str | None = own
    if isinstance(template, PromptTemplate):
        bos_text = tokenizer.decode([bos_id]) if bos_id is not None else None
        chat = alpaca_style_template(template.name, bos=bos_text, end=tokenizer.decode([ends[0]]))
    return ExportTokens(bos_token, bos_token_id, bos_id, eos_token, tuple(dict.fromkeys(eos_ids)), pad_token,
                        pad_id, chat, add_bos=bos_id is not None)


def write_tokenizer_files(tokenizer, tokens: ExportTokens, out_dir: str | Path, context_length: int) -> list[Path]:
    """Write the tokenizer, tokenizer_config.json, special_tokens_map.json and
    generation_config.json of an export into `out_dir`; returns the paths written.

    A vocabulary smaller than GPT-2's cannot use GPT-2's tokenizer: such a model gets
    generation_config.json only, and a warning.
    """
    from gptforge.hf_tokenizer import HFTokenizer, save_gpt2_tokenizer_files, save_tokenizer_files

    out = Path(out_dir)
    written: list[Path] = []
    if isinstance(tokenizer, HFTokenizer):
        written += save_tokenizer_files(tokenizer, out)
        config = json.loads((out / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    else:
        written += save_gpt2_tokenizer_files(out)
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "errors": "replace",
                  "added_tokens_decoder": {str(tokens.eos_ids[0]): {
                      "content": tokens.eos_token, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}}}
    # gptforge decodes exactly what it encoded: no clean-up of spaces before punctuation.
    config.update(model_max_length=context_length, clean_up_tokenization_spaces=False,
                  bos_token=tokens.bos_token, eos_token=tokens.eos_token, pad_token=tokens.pad_token)
    for key in ("is_local", "local_files_only"):  # where the source was read from, not what it is
        config.pop(key, None)
    if tokens.chat_template:
        config["chat_template"] = tokens.chat_template
    else:
        config.pop("chat_template", None)
    atomic_write_json(out / TOKENIZER_CONFIG_FILE, config)
    jinja = out / CHAT_TEMPLATE_FILE
    if jinja.is_file() or (tokens.chat_template and not isinstance(tokenizer, HFTokenizer)):
        if tokens.chat_template:  # transformers reads this file before the config's template
            atomic_write_bytes(jinja, tokens.chat_template.encode("utf-8"))
        else:
            jinja.unlink()
    special = {key: value for key, value in (("bos_token", tokens.bos_token), ("eos_token", tokens.eos_token),
                                             ("pad_token", tokens.pad_token)) if value}
    unk = config.get("unk_token")
    if isinstance(unk, str) and unk:
        special["unk_token"] = unk
    atomic_write_json(out / SPECIAL_TOKENS_MAP_FILE, special)
    written += [out / TOKENIZER_CONFIG_FILE, out / SPECIAL_TOKENS_MAP_FILE]
    written.append(write_generation_config(out, tokens))
    return list(dict.fromkeys(written))


def write_generation_config(out_dir: str | Path, tokens: ExportTokens) -> Path:
    """generation_config.json with the export's special-token ids (greedy unless asked)."""
    path = Path(out_dir) / GENERATION_CONFIG_FILE
    existing: dict[str, Any] = {}
    if path.is_file():  # a family model's own file: keep its sampling settings
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s is not readable JSON; writing it anew", path)
    ids = {k: v for k, v in tokens.config_ids().items() if v is not None}
    atomic_write_json(path, {**existing, **ids})
    return path
