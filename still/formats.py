"""Rows → messages → token ids with a loss mask (labels, -100 = no loss).

A row becomes an *example*: a list of chat messages (formats `chat` and `instruction`) or a
plain text (`completion`). `Encoder` turns an example into `input_ids` and `labels`.

Assistant spans are found without `{% generation %}` markers, so any chat template works:
the conversation is rendered incrementally (messages[:i] with the generation prompt, then
messages[:i+1]) and, when every rendering is a token-level prefix of the next, the tokens in
between are the assistant turn. A template that is not prefix-stable (one that rewrites earlier
turns, or marks the last one) falls back to locating the assistant contents in the full
rendering by character offsets. Either way the end-of-turn token (`<|im_end|>`, `<|eot_id|>`,
`</s>`) carries loss, so the model learns to stop; what a template writes around the content
(whitespace, Qwen3's empty <think></think> block, Phi-3's eos after the last <|end|>) does not.
The system prompt is not used to locate turns: templates move it (Mistral puts it into the last
user turn). Labels never come from pad positions, so pad == eos tokenizers are fine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from still.losses import IGNORE_INDEX
from still.rows import BadRow

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- rows → examples
def _string_field(row: dict, name: str, what: str, split: str, *, required: bool = True):
    """row[name] as a string; None when optional and missing/null."""
    setting = f"data.{split}.{what}"
    if name not in row:
        if not required:
            return None
        keys = ", ".join(f"'{key}'" for key in list(row)[:8]) or "no fields"
        raise BadRow(
            f"field '{name}' is missing (the row has {keys})",
            f"set {setting} to the field that holds the {what}",
        )
    value = row[name]
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise BadRow(
            f"field '{name}' is {type(value).__name__}, not a string",
            f"set {setting} to a text field",
        )
    return value


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check an OpenAI-style message list; return it as plain {role, content} dicts."""
    if isinstance(messages, str):  # CSV and Parquet cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise BadRow("the messages field is a string that is not a JSON list") from None
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"messages must be a non-empty list, got {type(messages).__name__}")
    clean = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow(f"message {number} is not an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadRow(
                f"message {number} has unknown role {role!r} (expected system, user or assistant)"
            )
        if not isinstance(content, str):
            raise BadRow(
                f"message {number} ({role}) content is {type(content).__name__}, not a string"
            )
        if role == "assistant" and not content.strip():
            raise BadRow(f"message {number} (assistant) is empty")
        previous = clean[-1]["role"] if clean else None
        if role == "system" and previous is not None:
            raise BadRow(f"message {number} is 'system' but only the first message may be")
        if role == "user" and previous == "user":
            raise BadRow(f"message {number} is 'user' after 'user': turns must alternate")
        if role == "assistant" and previous in (None, "system"):
            raise BadRow(f"message {number} is 'assistant' before any 'user' message")
        if role == "assistant" and previous == "assistant":
            raise BadRow(f"message {number} is 'assistant' after 'assistant': turns must alternate")
        clean.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in clean):
        raise BadRow("the conversation has no assistant message to train on")
    return clean


def row_to_example(row: Any, source, *, split: str, system_prompt: str | None) -> dict:
    """A raw row → {"messages": [...]} or {"text": "..."} (raises BadRow)."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object, got {type(row).__name__}")
    if source.format == "completion":
        text = _string_field(row, source.text, "text", split)
        if not text.strip():
            raise BadRow(f"field '{source.text}' is empty")
        return {"text": text}
    if source.format == "chat":
        if source.messages not in row:
            _string_field(row, source.messages, "messages", split)  # raises the missing error
        messages = validate_messages(row[source.messages])
    else:
        prompt = _string_field(row, source.prompt, "prompt", split)
        response = _string_field(row, source.response, "response", split)
        if not response.strip():
            raise BadRow(f"field '{source.response}' (the response) is empty")
        if source.input:
            extra = _string_field(row, source.input, "input", split, required=False)
            if extra and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if source.system:
            system = _string_field(row, source.system, "system", split, required=False)
            if system:
                messages.insert(0, {"role": "system", "content": system})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": messages}


# --------------------------------------------------------------------------- examples → tokens
# A one-turn conversation for finding what a chat template writes around an assistant's text.
TURN_PROBE = [
    {"role": "user", "content": "Say ok."},
    {"role": "assistant", "content": "ok"},
]


def special_token_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: its named ones and every added token marked special."""
    return set(tokenizer.all_special_ids) | {
        index for index, added in tokenizer.added_tokens_decoder.items() if added.special
    }


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    end_of_turn: int | None  # index of the final trained end-of-turn/eos token, if there is one


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


@dataclass
class Encoder:
    """Encodes examples for one tokenizer and data section; picklable for `num_proc`."""

    tokenizer: Any
    train_on: str = "assistant"
    chat_template: str | None = None
    _special: set[int] = field(default_factory=set, init=False, repr=False)
    _blank: dict[int, bool] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        tok = self.tokenizer
        self._special = special_token_ids(tok)

    def encode(self, example: dict) -> Encoded:
        if "text" in example:
            return self._encode_completion(example["text"])
        return self._encode_chat(example["messages"])

    def _encode_completion(self, text: str) -> Encoded:
        tok = self.tokenizer
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids.insert(0, tok.bos_token_id)
        end = None
        if tok.eos_token_id is not None:
            if ids[-1] != tok.eos_token_id:
                ids.append(tok.eos_token_id)
            end = len(ids) - 1
        return Encoded(ids, list(ids), end)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        # a template can raise anything (jinja's raise_exception, undefined variables, ...)
        except Exception as error:  # noqa: BLE001 — any template error becomes one BadRow
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BadRow(f"the chat template rejected this conversation: {message}") from None

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Token ids of `text` and each token's character span (None from a slow tokenizer)."""
        if not getattr(self.tokenizer, "is_fast", False):
            return self._ids(text), None
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]

    def _encode_chat(self, messages: list[dict]) -> Encoded:
        text = self._render(messages, False)
        ids, offsets = self._tokens(text)
        spans = self._spans_by_prefix(messages, ids)
        if spans is None:
            spans = self._spans_by_offsets(messages, text, ids, offsets)
        elif offsets is not None:
            contents = [m["content"] for m in messages if m["role"] == "assistant"]
            spans = [
                self._content_of(span, content, text, ids, offsets)
                for span, content in zip(spans, contents, strict=True)
            ]
        if self.train_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for start, stop in spans[-1:] if self.train_on == "last_assistant" else spans:
                labels[start:stop] = ids[start:stop]
        last = spans[-1][1] - 1
        return Encoded(ids, labels, last if ids[last] in self._special else None)

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank:
            self._blank[token_id] = (
                token_id not in self._special and not self.tokenizer.decode([token_id]).strip()
            )
        return self._blank[token_id]

    def _spans_by_prefix(self, messages, ids) -> list[tuple[int, int]] | None:
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._ids(self._render(messages[:index], True))
            through = self._ids(self._render(messages[: index + 1], False))
            if not (_is_prefix(before, through) and _is_prefix(through, ids)):
                return None
            start, stop = len(before), len(through)
            while stop > start + 1 and self._is_blank(ids[stop - 1]):
                stop -= 1
            spans.append((start, stop))
        return spans

    def _find(self, content, text, ids, offsets, begin, end=None) -> tuple[int, int, int] | None:
        """(first token, token stop, character end) of `content` in text[begin:end]: as written,
        or stripped (templates that trim it), and never inside a special token's text (a short
        answer such as "end" must not match `<|end|>`)."""
        end = len(text) if end is None else end
        for needle in dict.fromkeys((content, content.strip())):
            position = text.find(needle, begin, end) if needle else -1
            while position >= 0:
                stop = position + len(needle)
                inside = [i for i, (s, e) in enumerate(offsets) if s < stop and e > position]
                if inside and not any(ids[i] in self._special for i in inside):
                    return inside[0], inside[-1] + 1, stop
                position = text.find(needle, position + 1, end)
        return None

    def _content_of(self, span, content, text, ids, offsets) -> tuple[int, int]:
        """The part of an assistant turn's tokens that the model writes: its content and the
        end-of-turn token right after it. What a template adds around the content carries no
        loss: Qwen3's empty <think></think> block before it, Phi-3's eos after the turn's
        <|end|>. A template that rewrites the content keeps the whole turn."""
        start, stop = span
        found = self._find(content, text, ids, offsets, offsets[start][0], offsets[stop - 1][1])
        if found is None:
            return span
        first, content_stop, _ = found
        if content_stop < stop and ids[content_stop] in self._special:
            return first, content_stop + 1
        return first, stop

    def _spans_by_offsets(self, messages, text, ids, offsets) -> list[tuple[int, int]]:
        if offsets is None:
            raise BadRow(
                "the chat template is not prefix-stable and a slow tokenizer has no "
                "offsets to locate assistant turns; set data.chat_template"
            )
        spans, cursor = [], 0
        for number, message in enumerate(messages, start=1):
            # Templates put the system prompt where they like (Mistral: into the last user
            # turn), so it is not searched for, and turns are found in order after each other.
            if message["role"] == "system":
                continue
            found = self._find(message["content"], text, ids, offsets, cursor)
            if found is None:
                if message["role"] == "assistant":
                    raise BadRow(
                        f"message {number} (assistant) is not in the chat template's "
                        "rendering; set data.chat_template"
                    )
                continue
            start, stop, cursor = found
            if message["role"] != "assistant":
                continue
            if stop < len(ids) and ids[stop] in self._special:
                stop += 1  # the end-of-turn token right after the content
            spans.append((start, stop))
        return spans


def render_loss_mask(tokenizer, input_ids, labels, marks: tuple[str, str] = ("«", "»")) -> str:
    """The decoded example with the loss-carrying spans wrapped in «…»."""
    pieces, run, trained = [], [], None
    for token_id, label in zip(list(input_ids), list(labels)):
        if run and (label != IGNORE_INDEX) != trained:
            pieces.append((trained, run))
            run = []
        trained = label != IGNORE_INDEX
        run.append(int(token_id))
    if run:
        pieces.append((trained, run))
    text = []
    for is_trained, ids in pieces:
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        text.append(f"{marks[0]}{decoded}{marks[1]}" if is_trained else decoded)
    return "".join(text)
