"""Prompt templates for instruction data: Alpaca (the book's default) and Phi-3 style.

An entry is a dict with "instruction", optional "input" and, for training, "output".
`prompt(entry)` is the text the model sees before it answers (ending with the
response header); `full(entry)` appends the reference answer for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

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

    def response_of(self, generated: str) -> str:
        """The answer part of a generated text that still holds the prompt, stripped."""
        marker = "### Response:\n" if self.name == "alpaca" else "<|assistant|>\n"
        head, sep, tail = generated.rpartition(marker)
        return (tail if sep else generated).strip()


TEMPLATES: dict[str, PromptTemplate] = {name: PromptTemplate(name) for name in ("alpaca", "phi3")}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise BadInputError(f"unknown prompt template {name!r}; choose one of: {', '.join(TEMPLATES)}") from None


def render_chat(messages: Sequence[Mapping[str, str]], template: PromptTemplate) -> str:
    """Render chat messages (role/content) for a single-turn instruction model.

    The last user message is the instruction; system messages and earlier turns
    become the input, so the model sees the whole conversation.
    """
    if not messages or messages[-1].get("role") != "user":
        raise BadInputError("the last message must come from the user")
    context = []
    for message in messages[:-1]:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise BadInputError(f"unknown message role {role!r}; use system, user or assistant")
        context.append(message["content"] if role == "system" else f"{role.capitalize()}: {message['content']}")
    return template.prompt({"instruction": messages[-1]["content"], "input": "\n".join(context)})
