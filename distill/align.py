"""Cross-tokenizer alignment: which teacher position teaches which student position, and which
vocabulary entries are the same token in both models.

Positions. Each model renders the same conversation with its own tokenizer and chat template;
the scaffolding differs (`<|im_start|>assistant` vs `<start_of_turn>model`), the assistant
contents do not. Inside each assistant content, tokens are keyed by the character at which they
start, measured from the start of that content through the fast tokenizers' offset mappings. A
token's key skips its leading whitespace, so a byte-level `Ġworld` (offsets with or without the
space) and a sentencepiece `▁world` both start at the `w`. A student position predicting the
token that starts at character c is paired with the teacher position predicting the teacher
token that starts at c; a student token with no teacher token starting where it does (the two
merged differently there) leaves its position unaligned, and that position then gets only the
hard-label cross entropy. The end-of-turn tokens right after a content (`<|im_end|>`,
`<end_of_turn>`) are paired with each other when both are special tokens.

Vocabularies. Every non-special token is turned into the bytes it stands for (byte-level BPE:
its characters mapped back through the GPT-2 byte table; sentencepiece: `▁` is a space and
`<0xNN>` one byte). A byte string that exactly one student token and exactly one teacher token
stand for is a one-to-one pair; the end-of-turn tokens are one more pair.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from still.errors import StillError
from still.formats import special_token_ids
from still.models import end_of_turn_token

NO_POSITION = -1  # a student position with no teacher position to learn from
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# --------------------------------------------------------------------------- vocabularies
def _gpt2_byte_table() -> dict[str, int]:
    """The byte-level BPE alphabet: the unicode character standing for each byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for value in range(256):
        if value in printable:
            table[chr(value)] = value
        else:
            table[chr(256 + extra)] = value
            extra += 1
    return table


def is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))


def token_bytes(tokenizer, vocab_rows: int) -> dict[int, bytes]:
    """id → the bytes the token stands for, for every non-special id below `vocab_rows`."""
    skip = special_token_ids(tokenizer)
    byte_level = is_byte_level(tokenizer)
    table = _gpt2_byte_table() if byte_level else None
    out = {}
    for piece, index in tokenizer.get_vocab().items():
        if index in skip or index >= vocab_rows:
            continue
        if byte_level and all(char in table for char in piece):
            out[index] = bytes(table[char] for char in piece)
            continue
        fallback = _BYTE_FALLBACK.match(piece)
        if fallback:
            out[index] = bytes([int(fallback.group(1), 16)])
        else:
            out[index] = piece.replace("▁", " ").encode("utf-8")
    return out


def _unique_inverse(pieces: dict[int, bytes]) -> dict[bytes, int]:
    seen: dict[bytes, int] = {}
    ambiguous = set()
    for index, piece in pieces.items():
        if piece in seen:
            ambiguous.add(piece)
        seen[piece] = index
    return {piece: index for piece, index in seen.items() if piece not in ambiguous}


@dataclass
class VocabMap:
    """The one-to-one pairs, as two aligned id tensors (sorted by student id)."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_vocab: int
    teacher_vocab: int

    @property
    def overlap(self) -> float:
        """Share of the student's vocabulary with a one-to-one teacher token."""
        return len(self.student_ids) / max(self.student_vocab, 1)


def vocab_map(
    student_tokenizer,
    teacher_tokenizer,
    student_vocab: int,
    teacher_vocab: int,
    templates: tuple[str | None, str | None] = (None, None),
) -> VocabMap:
    """The one-to-one pairs; `templates` are the (student, teacher) chat templates used in
    place of the tokenizers' own (None: their own), which tell the end-of-turn tokens."""
    student = _unique_inverse(token_bytes(student_tokenizer, student_vocab))
    teacher = _unique_inverse(token_bytes(teacher_tokenizer, teacher_vocab))
    pairs = {student[piece]: teacher[piece] for piece in student.keys() & teacher.keys()}
    ends = (
        end_of_turn_token(student_tokenizer, templates[0]),
        end_of_turn_token(teacher_tokenizer, templates[1]),
    )
    if None not in ends and ends[0] < student_vocab and ends[1] < teacher_vocab:
        if ends[0] not in pairs and ends[1] not in pairs.values():
            pairs[ends[0]] = ends[1]
    ordered = sorted(pairs.items())
    return VocabMap(
        torch.tensor([s for s, _ in ordered], dtype=torch.long),
        torch.tensor([t for _, t in ordered], dtype=torch.long),
        student_vocab,
        teacher_vocab,
    )


# --------------------------------------------------------------------------- positions
@dataclass
class Rendering:
    """One model's text of a conversation, its tokens and their character offsets."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    specials: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, tokenizer, messages: list[dict], chat_template: str | None = None):
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
        return cls.of_text(tokenizer, text)

    @classmethod
    def of_text(cls, tokenizer, text: str):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(pair) for pair in encoded["offset_mapping"]]
        return cls(text, list(encoded["input_ids"]), offsets, special_token_ids(tokenizer))

    def content_spans(self, messages: list[dict]) -> list[tuple[int, int] | None]:
        """The character span of each assistant content (None where the text lacks it)."""
        spans, cursor = [], 0
        for message in messages:
            needle = message["content"].strip()
            position = self.text.find(needle, cursor) if needle else -1
            if position >= 0:
                cursor = position + len(needle)
            if message["role"] == "assistant":
                spans.append(None if position < 0 else (position, position + len(needle)))
        return spans

    def keys(self, span: tuple[int, int]) -> dict[int, int]:
        """Character (from the span's start) → the token starting there, inside the span."""
        out = {}
        for index, (start, end) in enumerate(self.offsets):
            if end <= start:
                continue
            piece = self.text[start:end]
            key = start + len(piece) - len(piece.lstrip()) if piece.strip() else start
            if span[0] <= key < span[1]:
                out.setdefault(key - span[0], index)
        return out

    def token_after(self, end: int) -> int | None:
        """The first token after character `end` that is not whitespace, if it is special."""
        for index, (start, stop) in enumerate(self.offsets):
            if start < end or stop <= start:
                continue
            if self.ids[index] in self.specials:
                return index
            if self.text[start:stop].strip():
                return None
        return None


def align_positions(
    student: Rendering,
    teacher: Rendering,
    messages: list[dict],
    shift: int = 0,
) -> list[int]:
    """For every student position i (predicting student token i + 1), the teacher position
    predicting the same text, or NO_POSITION. `shift` is how many tokens the student's encoded
    example has before its rendering's first token (a bos the encoder added)."""
    positions = [NO_POSITION] * (len(student.ids) + shift)
    student_spans = student.content_spans(messages)
    teacher_spans = teacher.content_spans(messages)
    for student_span, teacher_span in zip(student_spans, teacher_spans):
        if student_span is None or teacher_span is None:
            continue
        teacher_keys = teacher.keys(teacher_span)
        pairs = [
            (token, teacher_keys[char])
            for char, token in student.keys(student_span).items()
            if char in teacher_keys
        ]
        student_end = student.token_after(student_span[1])
        teacher_end = teacher.token_after(teacher_span[1])
        if student_end is not None and teacher_end is not None:
            pairs.append((student_end, teacher_end))
        for student_token, teacher_token in pairs:
            if student_token + shift >= 1 and teacher_token >= 1:
                positions[student_token + shift - 1] = teacher_token - 1
    return positions


def require_offsets(tokenizer, role: str, ref: str) -> None:
    """Alignment reads character offsets, which only fast tokenizers have."""
    if not getattr(tokenizer, "is_fast", False):
        raise StillError(
            f"the {role} {ref} has a slow tokenizer ({type(tokenizer).__name__}) with no "
            "character offsets, so its tokens cannot be aligned with the other model's",
            hint="give the model a fast tokenizer (a tokenizer.json, e.g. saved by "
            "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained), or set "
            "distill.cross_tokenizer: off and use sequence-level KD",
        )
