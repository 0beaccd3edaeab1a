"""Cross-tokenizer distillation in the KD runner: which method a recipe gets, the teacher's
tokens and alignment added to each prepared example, the batches, the loss, the report.

The student's tokenizer and chat template make the training examples and their loss mask
(`still.data.prepare`, as a fine-tune would). Each example is then rendered again by the
teacher's tokenizer and chat template and aligned (distill/align.py): two more columns,
`teacher_input_ids` and `teacher_positions` (per student position, the teacher position that
teaches it, or -1). The collator pads the teacher's tokens into a batch of their own (never
packed) and turns the positions into one flat index of teacher rows per student row, within
this process's batch only, so DDP and ZeRO need nothing more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from distill.align import (
    NO_POSITION,
    Rendering,
    VocabMap,
    align_positions,
    require_offsets,
    vocab_map,
)
from distill.xtok_losses import (
    CachedTeacher,
    xtok_cached_kd_loss,
    xtok_kd_loss,
    xtok_kd_loss_from_logits,
)
from still import formats, models
from still.errors import StillError
from still.losses import IGNORE_INDEX
from still.rows import BadRow, read_rows

TEACHER_KEYS = ("teacher_input_ids", "teacher_positions", "example")
BATCH_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_index")


@dataclass
class AlignStats:
    """How much of a split the teacher can teach (the preflight numbers)."""

    examples: int = 0
    loss_positions: int = 0
    aligned: int = 0
    exact: int = 0  # aligned positions whose target token has a one-to-one teacher token
    examples_without_alignment: int = 0
    teacher_template_errors: int = 0

    @property
    def aligned_share(self) -> float:
        return self.aligned / max(self.loss_positions, 1)

    @property
    def exact_share(self) -> float:
        return self.exact / max(self.aligned, 1)


@dataclass
class CrossTokenizer:
    """What the runner needs to distil across tokenizers."""

    mode: str  # uld | gold
    mapping: VocabMap
    teacher_tokenizer: object
    student_tokenizer: object
    teacher_chat_template: str | None = None
    data: object = None  # the recipe's data section: how samples are encoded again
    stats: dict[str, AlignStats] = field(default_factory=dict)

    def lineage(self) -> dict:
        train = self.stats.get("train", AlignStats())
        return {
            "mode": self.mode,
            "vocab_overlap": round(self.mapping.overlap, 6),
            "aligned_share": round(train.aligned_share, 6),
            "exact_share": round(train.exact_share, 6),
        }

    def summary(self) -> str:
        train = self.stats.get("train", AlignStats())
        return (
            f"cross-tokenizer KD ({self.mode}): vocab overlap {self.mapping.overlap:.1%} "
            f"({len(self.mapping.student_ids)} of {self.mapping.student_vocab} student tokens "
            f"map one-to-one to the teacher's {self.mapping.teacher_vocab}); "
            f"train loss positions aligned {train.aligned_share:.1%} "
            f"({train.aligned} of {train.loss_positions}); exact-match share "
            f"{train.exact_share:.1%} of aligned targets"
        )


# --------------------------------------------------------------------------- which method
def cross_tokenizer_mode(recipe, teacher_tokenizer):
    """(mode, student tokenizer), or (None, None) for same-tokenizer KD exactly as before:
    cross_tokenizer off, a student carved from the teacher, or `auto` with one vocabulary."""
    setting = recipe.distill.cross_tokenizer
    if setting == "off" or recipe.student.init is not None:
        return None, None
    student_tokenizer = models.load_tokenizer(
        recipe.student.ref, trust_remote_code=recipe.student.trust_remote_code
    )
    if setting == "auto" and student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab():
        return None, None
    mode = "gold" if setting == "auto" else setting
    require_offsets(teacher_tokenizer, "teacher", recipe.teacher.ref)
    require_offsets(student_tokenizer, "student", recipe.student.ref)
    template = recipe.distill.teacher_chat_template or teacher_tokenizer.chat_template
    formats_used = {source.format for source in recipe.data.train_sources()}
    if not template and formats_used != {"completion"}:
        raise StillError(
            f"the teacher {recipe.teacher.ref} has no chat template to render the "
            f"conversations with (cross-tokenizer KD renders each one with both models' templates)",
            hint="set distill.teacher_chat_template to the teacher's Jinja chat template",
        )
    return mode, student_tokenizer


def head_rows(model, tokenizer) -> int:
    """The real tokens of a head: its rows up to the tokenizer's size (padding rows dropped)."""
    rows = model.get_output_embeddings().weight.shape[0] if model is not None else len(tokenizer)
    if 0 < rows < len(tokenizer):
        raise StillError(
            f"an output layer has fewer rows ({rows}) than its tokenizer ({len(tokenizer)})",
            hint="resize the model's embeddings to its tokenizer",
        )
    return len(tokenizer)


def build(recipe, mode, teacher, teacher_tokenizer, student, student_tokenizer) -> CrossTokenizer:
    templates = (recipe.data.chat_template, recipe.distill.teacher_chat_template)
    mapping = vocab_map(
        student_tokenizer,
        teacher_tokenizer,
        head_rows(student, student_tokenizer),
        head_rows(teacher, teacher_tokenizer),
        templates=templates,
    )
    return CrossTokenizer(
        mode, mapping, teacher_tokenizer, student_tokenizer, templates[1], recipe.data
    )


# --------------------------------------------------------------------------- examples
def _kept_examples(data, source, split: str, encoder):
    """The examples `still.data.prepare` kept, in its order, with their (cut) encodings."""
    for _origin, row in read_rows(source):
        try:
            if isinstance(row, BadRow):
                raise row
            example = formats.row_to_example(
                row, source, split=split, system_prompt=data.system_prompt
            )
            encoded = encoder.encode(example)
        except BadRow:
            continue
        ids, labels = encoded.input_ids, encoded.labels
        if len(ids) > data.max_len:
            if data.truncation == "drop":
                continue
            ids, labels = ids[: data.max_len], labels[: data.max_len]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            yield example, ids


def _renderings(example, student_ids, setup: CrossTokenizer, chat_template):
    """(student rendering, teacher rendering, messages, student shift, teacher bos) or None."""
    student_tok, teacher_tok = setup.student_tokenizer, setup.teacher_tokenizer
    if "text" in example:
        messages = [{"role": "assistant", "content": example["text"]}]
        student = Rendering.of_text(student_tok, example["text"])
        teacher = Rendering.of_text(teacher_tok, example["text"])
        bos = teacher_tok.bos_token_id
    else:
        messages = example["messages"]
        student = Rendering.of(student_tok, messages, chat_template)
        teacher = Rendering.of(teacher_tok, messages, setup.teacher_chat_template)
        bos = None
    shift = next((k for k in (0, 1) if _same_start(student_ids[k:], student.ids)), None)
    return None if shift is None else (student, teacher, messages, shift, bos)


def _same_start(a: list[int], b: list[int]) -> bool:
    common = min(len(a), len(b))
    return common > 0 and a[:common] == b[:common]


def align_example(example, student_ids, setup: CrossTokenizer, chat_template, stats):
    """(teacher input ids, teacher position per student position) for one prepared example."""
    try:
        rendered = _renderings(example, student_ids, setup, chat_template)
    except Exception:  # noqa: BLE001 — a template may raise anything; the example stays unaligned
        stats.teacher_template_errors += 1
        rendered = None
    if rendered is None:
        return [setup.teacher_tokenizer.bos_token_id or 0], [NO_POSITION] * len(student_ids)
    student, teacher, messages, shift, bos = rendered
    positions = align_positions(student, teacher, messages, shift)[: len(student_ids)]
    positions[-1] = NO_POSITION  # it predicts past the (cut) example
    teacher_ids = teacher.ids
    if bos is not None and teacher_ids[:1] != [bos]:
        teacher_ids = [bos] + teacher_ids
        positions = [p + 1 if p >= 0 else p for p in positions]
    last = max(positions)
    return teacher_ids[: max(last, 0) + 1], positions


def add_teacher_columns(data, split: str, prepared, setup: CrossTokenizer) -> AlignStats:
    """Align every prepared example of one split and add the teacher's two columns."""
    sources = data.train_sources() if split == "train" else [data.eval]
    encoder = formats.Encoder(setup.student_tokenizer, data.train_on, data.chat_template)
    dataset = prepared.dataset
    examples = [kept for source in sources for kept in _kept_examples(data, source, split, encoder)]
    if len(examples) != len(dataset):
        raise RuntimeError(
            f"{split}: re-encoding found {len(examples)} examples, prepare kept {len(dataset)}"
        )
    matched = set(setup.mapping.student_ids.tolist())
    stats = AlignStats()
    teacher_ids, teacher_positions = [], []
    for (example, ids), row_ids, labels in zip(examples, dataset["input_ids"], dataset["labels"]):
        if list(ids) != list(row_ids):
            raise RuntimeError(f"{split}: re-encoding differs from the prepared example")
        example_ids, positions = align_example(example, ids, setup, data.chat_template, stats)
        teacher_ids.append(example_ids)
        teacher_positions.append(positions)
        _count(stats, positions, labels, matched)
    prepared.dataset = dataset.add_column("teacher_input_ids", teacher_ids).add_column(
        "teacher_positions", teacher_positions
    )
    # the conversation itself, for on-policy batches to re-render the student's samples in
    prepared.dataset = prepared.dataset.add_column(
        "example", [json.dumps(example) for example, _ in examples]
    )
    setup.stats[split] = stats
    return stats


def _count(stats: AlignStats, positions, labels, matched: set[int]) -> None:
    stats.examples += 1
    aligned_here = 0
    for position, target in zip(positions, labels[1:]):
        if target == IGNORE_INDEX:
            continue
        stats.loss_positions += 1
        if position >= 0:
            aligned_here += 1
            stats.exact += target in matched
    stats.aligned += aligned_here
    stats.examples_without_alignment += aligned_here == 0


def require_alignment(setup: CrossTokenizer, recipe) -> None:
    """Zero aligned positions means nothing to distil: one line naming both models."""
    stats = setup.stats["train"]
    if stats.aligned == 0:
        why = (
            f"the teacher's chat template failed on {stats.teacher_template_errors} examples"
            if stats.teacher_template_errors
            else "the two renderings share no assistant text at matching token boundaries"
        )
        raise StillError(
            f"cross-tokenizer KD: none of the {stats.loss_positions} training loss positions "
            f"of student {recipe.student.ref} aligns with a token of teacher "
            f"{recipe.teacher.ref} ({why})",
            hint="check that both chat templates write the assistant's text unchanged "
            "(data.chat_template applies to the student), or use sequence-level KD",
        )


# --------------------------------------------------------------------------- batches
def _example_starts(batch: dict, lengths: list[int]) -> list[tuple[int, int]]:
    """(row, column) where each example of the batch starts, padded or packed."""
    if "position_ids" not in batch:
        return [(row, 0) for row in range(len(lengths))]
    starts = []
    for row, positions in enumerate(batch["position_ids"]):
        starts += [(row, int(col)) for col in (positions == 0).nonzero().flatten()]
    if len(starts) != len(lengths):
        raise RuntimeError(f"packed batch has {len(starts)} example starts for {len(lengths)}")
    return starts


def with_teacher_inputs(collator, teacher_pad_id: int):
    """The student's batch plus the teacher's padded tokens and `teacher_index`: for each
    student row of [rows, width - 1] (position i predicts token i + 1), the flat row of the
    teacher's [examples, teacher width] hidden states that teaches it, or -1."""

    def collate(features: list[dict]) -> dict:
        batch = collator([{k: v for k, v in f.items() if k not in TEACHER_KEYS} for f in features])
        teacher_ids = [list(f["teacher_input_ids"]) for f in features]
        width = max(len(ids) for ids in teacher_ids)
        batch["teacher_input_ids"] = torch.tensor(
            [ids + [teacher_pad_id] * (width - len(ids)) for ids in teacher_ids]
        )
        batch["teacher_attention_mask"] = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in teacher_ids]
        )
        lengths = [len(f["input_ids"]) for f in features]
        rows, row_width = batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1
        index = torch.full((rows * max(row_width, 0),), NO_POSITION, dtype=torch.long)
        for example, (feature, (row, col)) in enumerate(
            zip(features, _example_starts(batch, lengths))
        ):
            positions = torch.tensor(list(feature["teacher_positions"]))[: lengths[example] - 1]
            aligned = (positions >= 0).nonzero().flatten()
            index[row * row_width + col + aligned] = example * width + positions[aligned]
        batch["teacher_index"] = index
        if all("example" in f for f in features):
            batch["examples"] = [f["example"] for f in features]
        return batch

    return collate


# --------------------------------------------------------------------------- on-policy
def sample_features(setup: CrossTokenizer, examples, features, prompts) -> list[dict]:
    """On-policy batches across tokenizers: each student sample's text becomes the answer to
    its example's first prompt, encoded again by the student (its canonical tokens: the loss
    mask covers the answer and its end-of-turn) and by the teacher, and aligned like the data."""
    if examples is None:
        raise RuntimeError("cross-tokenizer on-policy batches need the examples column")
    tokenizer, data = setup.student_tokenizer, setup.data
    encoder = formats.Encoder(tokenizer, "assistant", data.chat_template)
    out = []
    for example_json, feature, prompt in zip(examples, features, prompts):
        example = json.loads(example_json)
        sample = feature["input_ids"][len(prompt) :]
        text = tokenizer.decode(sample, skip_special_tokens=True).strip() or "."
        if "messages" in example:
            messages = example["messages"]
            first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            answered = {"messages": messages[:first] + [{"role": "assistant", "content": text}]}
        else:  # completion: the sample continues the prompt's text
            answered = {"text": tokenizer.decode(prompt, skip_special_tokens=True) + text}
        encoded = encoder.encode(answered)
        ids, labels = encoded.input_ids[: data.max_len], encoded.labels[: data.max_len]
        teacher_ids, positions = align_example(
            answered, ids, setup, data.chat_template, AlignStats()
        )
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "teacher_input_ids": teacher_ids,
                "teacher_positions": positions,
            }
        )
    return out


# --------------------------------------------------------------------------- loss
def cross_tokenizer_loss(trainer, model, student_out, labels, teacher_inputs: dict):
    """The batch's KD (+ CE) sums against the teacher's own tokenization of the same text."""
    with torch.no_grad():
        teacher_out = trainer.teacher(
            input_ids=teacher_inputs["teacher_input_ids"],
            attention_mask=teacher_inputs["teacher_attention_mask"],
            logits_to_keep=1,
            output_hidden_states=True,
        )
    hidden = student_out.hidden_states[-1][:, :-1]
    student_hidden = hidden.reshape(-1, hidden.shape[-1])
    teacher_hidden = teacher_out.hidden_states[-1]
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    index = teacher_inputs["teacher_index"]
    setup = trainer.cross_tokenizer
    head = trainer.accelerator.unwrap_model(model).get_output_embeddings()
    teacher_head = getattr(trainer.teacher, "module", trainer.teacher).get_output_embeddings()
    settings = _loss_settings(trainer)
    if head.weight.numel() == 0 or teacher_head.weight.numel() == 0:
        # ZeRO-3 partitions the heads; only a call of the module gathers them.
        keep = target != IGNORE_INDEX
        student_logits = head(student_hidden[keep])[:, : setup.mapping.student_vocab].float()
        with torch.no_grad():
            rows = teacher_hidden[index[keep].clamp(min=0)]
            teacher_logits = teacher_head(rows)[:, : setup.mapping.teacher_vocab].float()
        return xtok_kd_loss_from_logits(
            student_logits, teacher_logits, target[keep], index[keep] >= 0, **settings
        )
    return xtok_kd_loss(
        student_hidden,
        head.weight,
        teacher_hidden,
        teacher_head.weight,
        target,
        index,
        chunk_size=trainer.loss_chunk_size,
        student_head_bias=getattr(head, "bias", None),
        teacher_head_bias=getattr(teacher_head, "bias", None),
        **settings,
    )


def _loss_settings(trainer) -> dict:
    setup = trainer.cross_tokenizer
    return dict(mode=setup.mode, mapping=setup.mapping, **trainer.loss_settings())


def cached_cross_tokenizer_loss(trainer, head, hidden, labels, cache, example_ids):
    """The same sums against a teacher cache made across tokenizers (distill/xtok_cache.py)."""
    columns = cache.columns(example_ids.tolist())
    teacher = CachedTeacher(
        columns["log_probs"],
        columns["ids"].to(torch.int64),
        columns["matched_rest_log"].float(),
        columns["unmatched_rest_log"].float(),
    )
    return xtok_cached_kd_loss(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        teacher,
        columns["aligned"].bool(),
        labels[:, 1:].reshape(-1),
        chunk_size=trainer.loss_chunk_size,
        student_head_bias=getattr(head, "bias", None),
        **_loss_settings(trainer),
    )
