"""Render a conversation with a model's own chat template, as Hugging Face transformers does.

A chat model's tokenizer files carry a Jinja template that turns a list of
`{"role": ..., "content": ...}` messages into the one prompt string the model was trained on.
`render_chat` gives the same text as transformers'
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`, by
rendering in the same kind of Jinja environment:

- a sandbox whose objects cannot be changed (a template is untrusted code from the Hub),
  with `trim_blocks` and `lstrip_blocks` on and `{% break %}` / `{% continue %}` allowed;
- `raise_exception(message)`, with which a template refuses a conversation it cannot format;
- `strftime_now(format)`: the local time now, formatted (Llama 3.2 prints today's date);
- a `tojson` filter that is plain `json.dumps` (non-ASCII kept, no HTML escaping, keys in
  their order), taking `indent`, `separators`, `sort_keys` and `ensure_ascii`;
- `{% generation %}...{% endgeneration %}` (which marks the assistant's text for training
  masks in transformers) rendered as its body;
- the variables `messages`, `tools` and `documents` (None unless given),
  `add_generation_prompt`, and any others the caller passes: the tokenizer's `bos_token`,
  `eos_token` and so on, or a family's switch such as Qwen3's `enable_thinking=False`.

Any failure of a template, a syntax error or its own `raise_exception`, becomes a
`BadInputError` carrying the template's message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptforge.errors import BadInputError

__all__ = ["end_of_turn_tokens", "render_chat"]

# The names a message's reasoning travels under; templates read `reasoning_content`.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Unlikely to be changed by a template's trim or strip, and unlikely to be in any vocabulary.
_PROBE = "gptforge-end-of-turn-probe"
# A control token as chat templates spell them: <|eot_id|>, <|im_end|>, <end_of_turn>, <turn|>, </s>.
_TOKEN_LIKE = re.compile(r"<[^<>\s]{1,40}>")


class _TemplateRefused(jinja2.TemplateError):
    """Raised by a template's own `raise_exception` call."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML and sorts keys; a prompt needs neither.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses attribute names starting with an underscore."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # the first is self; Jinja lets a template pass "self="
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise BadInputError(f"The chat template does not parse (line {exc.lineno}): {exc.message}") from exc


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made of JSON-like types only, so the template sees data and no objects."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise BadInputError(f"{where} holds a {type(value).__name__}; chat messages take only strings, numbers, "
                        "booleans, None, lists and dicts")


def _with_reasoning_aliases(message: dict[str, Any]) -> dict[str, Any]:
    # transformers hands a message's reasoning, under whichever name it came, to the template
    # as `reasoning_content`, and as `thinking` unless the message already has that key.
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render `messages` with the Jinja chat `template`, exactly as transformers renders it.

    `add_generation_prompt=True` ends the text with the header of an assistant turn, so the
    model writes the reply next. `tools` (JSON schemas) and `documents` reach the template as
    given. Every other keyword becomes a template variable: pass the tokenizer's special tokens
    (`bos_token="<|begin_of_text|>"`, `eos_token=...`), as transformers does, and switches
    such as `enable_thinking=False`. Returns the prompt text; encode it with its special
    tokens recognized. Raises `BadInputError` when the template does not parse or fails on
    these messages, with the template's own message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise BadInputError("messages must be a list of {'role': ..., 'content': ...} dicts")
    plain_messages = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadInputError(f"message {i} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        plain_messages.append(_with_reasoning_aliases(_plain(message, f"message {i}")))
    context = {name: _plain(value, f"template variable {name!r}") for name, value in variables.items()}
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=plain_messages,
            tools=_plain(tools, "tools"),
            documents=_plain(documents, "documents"),
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except _TemplateRefused as exc:
        raise BadInputError(f"The chat template refused these messages: {exc.message}") from exc
    except jinja2.TemplateError as exc:
        raise BadInputError(f"The chat template failed on these messages: {exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        # A template written for other messages (say, content that is a list) fails like this.
        raise BadInputError(f"The chat template failed on these messages: {type(exc).__name__}: {exc}") from exc


def end_of_turn_tokens(template: str, special_tokens: Iterable[str] = (), **variables: Any) -> list[str]:
    """The token(s) a template writes to close an assistant turn, such as `<|eot_id|>`.

    Found by rendering a short conversation whose assistant reply is a marker and reading
    what follows the marker: the longest of `special_tokens` the rest starts with, or, when
    none is given or none matches, the `<...>` token there. `variables` reach the template
    as in `render_chat` (give `bos_token` and `eos_token`). Returns [] when the template
    cannot render such a conversation or closes the turn with plain text.
    """
    conversations = (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE},
         {"role": "user", "content": "Bye"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
    )
    for messages in conversations:
        try:
            text = render_chat(template, messages, add_generation_prompt=False, **variables)
        except BadInputError:
            continue
        if _PROBE in text:
            rest = text.split(_PROBE, 1)[1].lstrip()
            known = sorted((t for t in special_tokens if t and rest.startswith(t)), key=len, reverse=True)
            if known:
                return [known[0]]
            match = _TOKEN_LIKE.match(rest)
            return [match.group()] if match else []
    return []
