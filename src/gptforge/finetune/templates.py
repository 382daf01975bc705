"""Prompt templates for instruction data: Alpaca (the book's default), Phi-3 style, and a
model's own chat template ("chat": Llama 3, Qwen3, Gemma 3 ship one with their tokenizer).

An entry is a dict with "instruction", optional "input" and, for training, "output".
`prompt(entry)` is the text the model sees before it answers (ending with the
response header); `full(entry)` appends the reference answer for training;
`end_markers` are the texts at which a generated answer ends (the ids at which it
ends are `instruct.end_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from gptforge.errors import BadInputError

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction entry becomes model input."""

    name: str

    def prompt(self, entry: Mapping[str, str]) -> str:
        instruction = entry["instruction"]
        extra = entry.get("input") or ""
        if self.name == "alpaca":
            text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
            if extra:
                text += f"\n\n### Input:\n{extra}"
            return text + "\n\n### Response:\n"
        # phi3
        text = f"<|user|>\n{instruction}"
        if extra:
            text += f"\n{extra}"
        return text + "\n<|assistant|>\n"

    def full(self, entry: Mapping[str, str]) -> str:
        return self.prompt(entry) + entry["output"]

    @property
    def end_markers(self) -> tuple[str, ...]:
        """Texts that end an answer: the start of the next section the template writes (a
        model fine-tuned on these prompts goes on to invent the next instruction)."""
        return STOP_TEXTS[self.name]

    def response_of(self, generated: str) -> str:
        """The answer part of a generated text that still holds the prompt, stripped."""
        marker = "### Response:\n" if self.name == "alpaca" else "<|assistant|>\n"
        head, sep, tail = generated.rpartition(marker)
        return (tail if sep else generated).strip()


# Where an answer ends, as text: Alpaca's next "### " section (after the blank line the template
# puts between sections, or anywhere once it names a section), Phi-3's turn markers. With GPT-2's
# tokenizer these are plain text, several tokens each.
STOP_TEXTS: dict[str, tuple[str, ...]] = {
    "alpaca": ("\n\n### ", "### Instruction:", "### Input:", "### Response:"),
    "phi3": ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"),
}
TEMPLATES: dict[str, PromptTemplate] = {name: PromptTemplate(name) for name in ("alpaca", "phi3")}
TEMPLATE_NAMES = (*TEMPLATES, "chat")
_SENTINEL = "\x00gptforge-answer\x00"


@dataclass(frozen=True)
class ChatTemplate:
    """A model's own chat template (jinja, from its tokenizer files), as an instruction template.

    `render(messages, add_generation_prompt)` is the model's template rendered as
    transformers renders it. An entry becomes one user turn (instruction, then the
    input); `full(entry)` is the prompt followed by the answer only: the end-of-turn
    marker that the template writes after an answer (`end_marker`, such as
    "<|im_end|>" or "<|eot_id|>") is left to the training collate, which appends it
    as one token, so the model learns to end its turn there.
    """

    render: Callable[[list[dict[str, str]], bool], str]
    name: str = "chat"

    def prompt(self, entry: Mapping[str, str]) -> str:
        return self.render(self.messages(entry), True)

    def messages(self, entry: Mapping[str, str]) -> list[dict[str, str]]:
        extra = entry.get("input") or ""
        content = entry["instruction"] + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": content}]

    def full(self, entry: Mapping[str, str]) -> str:
        return self.prompt(entry) + entry["output"]

    @property
    def end_marker(self) -> str:
        """What the template writes right after an assistant's answer, stripped of whitespace."""
        entry = {"instruction": "Say yes.", "output": _SENTINEL}
        rendered = self.render(self.messages(entry) + [{"role": "assistant", "content": _SENTINEL}], False)
        return rendered.rpartition(_SENTINEL)[2].strip()

    @property
    def end_markers(self) -> tuple[str, ...]:
        """Texts that end an answer: the template's end-of-turn marker (as a token id it is in
        `instruct.end_ids` too; as text it also catches a marker of several tokens)."""
        return (self.end_marker,) if self.end_marker else ()

    def response_of(self, generated: str) -> str:
        head, sep, tail = generated.partition(self.end_marker) if self.end_marker else (generated, "", "")
        return head.strip()


def chat_template_for(tokenizer: Any, **options: Any) -> ChatTemplate:
    """The ChatTemplate of a tokenizer that carries a chat template (an HFTokenizer);
    `options` go to the template (e.g. enable_thinking=False for Qwen3)."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError("this model's tokenizer has no chat template; use --template alpaca or phi3")

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **options)

    return ChatTemplate(render)


def get_template(name: str, tokenizer: Any = None) -> PromptTemplate | ChatTemplate:
    """A template by name: "alpaca", "phi3", or "chat" (the model's own; needs its tokenizer)."""
    if name == "chat":
        if tokenizer is None:
            raise BadInputError("the 'chat' template is the model's own: it needs the model's tokenizer")
        return chat_template_for(tokenizer, **_template_options(tokenizer))
    try:
        return TEMPLATES[name]
    except KeyError:
        raise BadInputError(f"unknown prompt template {name!r}; choose one of: {', '.join(TEMPLATE_NAMES)}") from None


def _template_options(tokenizer: Any) -> dict[str, Any]:
    # Qwen3's hybrid models think aloud unless told not to; a fine-tuned assistant answers directly.
    source = getattr(tokenizer, "chat_template", "") or ""
    return {"enable_thinking": False} if "enable_thinking" in source else {}


def default_template(tokenizer: Any) -> str:
    """The template a model is fine-tuned and chatted with unless one is named: its own
    chat template if its tokenizer has one, else the book's Alpaca."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def render_chat(messages: Sequence[Mapping[str, str]], template: PromptTemplate | ChatTemplate) -> str:
    """Render chat messages (role/content) for the model to answer the last one.

    A model's own chat template renders the whole conversation as it was trained to
    see it. For a single-turn instruction template the last user message is the
    instruction; system messages and earlier turns become the input.
    """
    if not messages or messages[-1].get("role") != "user":
        raise BadInputError("the last message must come from the user")
    if isinstance(template, ChatTemplate):
        return template.render([dict(m) for m in messages], True)
    context = []
    for message in messages[:-1]:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise BadInputError(f"unknown message role {role!r}; use system, user or assistant")
        context.append(message["content"] if role == "system" else f"{role.capitalize()}: {message['content']}")
    return template.prompt({"instruction": messages[-1]["content"], "input": "\n".join(context)})
