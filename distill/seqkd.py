"""Teacher-written data (sequence-level KD): the teacher answers data.train's prompts.

`still generate R.yaml` reads top to bottom: prompts from the recipe's training data (through
`formats.row_to_example`, so system prompts, alpaca inputs and chat histories are what training
would see) → answers, from the local teacher (batched, left-padded, seeded) or from any
OpenAI-compatible endpoint → drop empty and truncated answers → an optional judge (exact or
regex against the dataset's reference answer, or a model's score) → a chat-format JSONL file
and `<out>.report.json` saying how many answers were kept and why the others were dropped.
A finetune or distill recipe then trains on the file with `format: chat`.

The endpoint client (`distill/endpoint.py`) is plain `urllib`, one POST per prompt with
`batch_size` requests in flight.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.endpoint import Answer, generate_endpoint
from still import formats, models
from still.data import batches_longest_first, left_padded
from still.errors import StillError
from still.fsutil import atomic_write_text
from still.rows import BadRow, strict_rows

MAX_EXAMPLES_PER_REASON = 3
# Stands in for a missing answer so that `formats.row_to_example` builds the prompt messages
# exactly as for a training row; it is cut off again before anything sees it.
_PLACEHOLDER = "(the teacher answers here)"


@dataclass
class Prompt:
    origin: str  # "file:line"
    messages: list[dict]  # ends with a user message
    reference: str | None  # the dataset's answer, if the row has one

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Report:
    out: str
    prompts: int = 0
    samples: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    bad_rows: int = 0
    prompts_without_answer: int = 0
    judge_scores: dict[str, int] = field(default_factory=dict)
    drop_examples: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def drop(self, reason: str, prompt: Prompt, answer: Answer, **detail) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if self.dropped[reason] <= MAX_EXAMPLES_PER_REASON:
            self.drop_examples.append(
                {"origin": prompt.origin, "reason": reason, "answer": answer.text[:300], **detail}
            )

    def summary(self) -> str:
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
        dropped = sum(self.dropped.values())
        return (
            f"{self.samples} answers to {self.prompts} prompts: kept {self.kept}, dropped "
            f"{dropped}{f' ({why})' if why else ''}"
        )


# --------------------------------------------------------------------------- prompts
def row_to_prompt(row, source, *, system_prompt: str | None) -> tuple[list[dict], str | None]:
    """A data row → (prompt messages ending with a user turn, the row's reference answer)."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object, got {type(row).__name__}")
    row, reference = dict(row), None
    if source.format == "instruction":
        value = row.get(source.response)
        if isinstance(value, str) and value.strip():
            reference = value
        else:
            row[source.response] = _PLACEHOLDER
    else:
        messages = row.get(source.messages)
        if isinstance(messages, str):  # CSV and Parquet cells hold the list as JSON text
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                messages = None  # row_to_example reports it
        if isinstance(messages, list) and messages:
            last = messages[-1]
            if isinstance(last, dict) and last.get("role") == "assistant":
                content = last.get("content")
                reference = content if isinstance(content, str) and content.strip() else None
                messages = messages[:-1]
            row[source.messages] = [*messages, {"role": "assistant", "content": _PLACEHOLDER}]
    example = formats.row_to_example(row, source, split="train", system_prompt=system_prompt)
    return example["messages"][:-1], reference


def load_prompts(data, report: Report) -> list[Prompt]:
    """The prompts of data.train; bad rows raise, or are counted under on_bad_rows: skip."""
    source = data.train
    if source.format == "completion":
        raise StillError(
            "still generate needs prompts: data.train has format completion",
            hint="use format instruction (prompt field) or chat (messages)",
        )
    prompts = []
    for origin, row in strict_rows(source):
        try:
            messages, reference = row_to_prompt(row, source, system_prompt=data.system_prompt)
        except BadRow as bad:
            if data.on_bad_rows == "error":
                raise StillError(
                    f"{origin}: {bad.reason}",
                    bad.hint or "fix the row, or set data.on_bad_rows: skip",
                ) from None
            report.bad_rows += 1
            continue
        prompts.append(Prompt(origin, messages, reference))
    if not prompts:
        raise StillError(
            f"{source.path or source.hf}: no prompts to answer", hint="check data.train"
        )
    return prompts


def _check_references(prompts: list[Prompt], judge) -> None:
    needs = judge is not None and (
        judge.type in ("exact", "regex") or "{reference}" in judge.prompt
    )
    missing = next((p for p in prompts if p.reference is None), None) if needs else None
    if missing is not None:
        raise StillError(
            f"{missing.origin}: judge type {judge.type} compares with the row's "
            "reference answer, and this row has none",
            hint="give every row a response (or a final assistant turn), or use "
            "a model judge without {reference}",
        )


# --------------------------------------------------------------------------- local generation
def load_generator(ref_or_section):
    """(model, tokenizer) in eval mode, adapter merged, on the GPU when there is one."""
    import torch

    if isinstance(ref_or_section, str):
        model, tokenizer = models.load_model(ref_or_section)
    else:
        model, tokenizer = models.load_from_section(ref_or_section)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval().requires_grad_(False)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def _prompt_ids(tokenizer, messages: list[dict], chat_template: str | None, origin: str):
    # Rendered and tokenized as formats.Encoder does, so the teacher sees the very tokens a
    # training example has before its assistant turn.
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
    # a template can raise anything (jinja's raise_exception, undefined variables, ...)
    except Exception as error:  # noqa: BLE001 — any template error becomes one StillError
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise StillError(f"{origin}: the chat template rejected this prompt: {first}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_local(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    chat_template: str | None = None,
    origins: list[str] | None = None,
) -> list[list[Answer]]:
    """`samples` answers per conversation. Greedy answers do not depend on batch_size; sampled
    ones depend on the seed and on which prompts share a batch (one seed per batch)."""
    import torch
    from transformers import GenerationConfig

    if not (chat_template or tokenizer.chat_template):
        raise StillError(
            f"{tokenizer.name_or_path}: the tokenizer has no chat template to render prompts with",
            hint="set data.chat_template to a Jinja template",
        )
    origins = origins or [f"prompt {i}" for i in range(len(conversations))]
    encoded = [
        _prompt_ids(tokenizer, messages, chat_template, origin)
        for messages, origin in zip(conversations, origins)
    ]
    stop = models.stop_token_ids(model, tokenizer)
    pad = models.pad_token_id(tokenizer)
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        num_return_sequences=samples,
        pad_token_id=pad,
        eos_token_id=stop,
        **sampling,
    )
    device = next(model.parameters()).device
    answers: list[list[Answer]] = [[] for _ in conversations]
    for number, batch in enumerate(
        batches_longest_first([len(ids) for ids in encoded], batch_size)
    ):
        input_ids, attention_mask = left_padded([encoded[i] for i in batch], pad)
        width = input_ids.shape[1]
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.inference_mode(),
        ):
            torch.manual_seed(seed + number)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
        for row, generated in enumerate(output[:, width:].tolist()):
            end = next((k for k, token in enumerate(generated) if token in stop), None)
            text = tokenizer.decode(generated[:end], skip_special_tokens=True).strip()
            answers[batch[row // samples]].append(Answer(text, truncated=end is None))
    return answers


# --------------------------------------------------------------------------- judges
def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_verdict(answer: str, reference: str) -> str | None:
    """None when accepted, else the drop reason."""
    return None if normalize(answer) == normalize(reference) else "exact_mismatch"


def _extract(pattern: re.Pattern, text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def regex_verdict(pattern: str, answer: str, reference: str) -> str | None:
    compiled = re.compile(pattern)
    found = _extract(compiled, answer)
    if found is None:
        return "regex_no_match"
    expected = _extract(compiled, reference)
    expected = reference if expected is None else expected
    return None if normalize(found) == normalize(expected) else "regex_mismatch"


def parse_score(reply: str) -> int | None:
    match = re.search(r"-?\d+", reply)
    return int(match.group(0)) if match else None


def fill_judge_prompt(template: str, prompt: Prompt, answer: str) -> str:
    # Plain replacement, not str.format: questions and answers hold braces (code, JSON).
    values = {
        "{question}": prompt.question,
        "{answer}": answer,
        "{reference}": prompt.reference or "",
    }
    return re.sub(r"\{question\}|\{answer\}|\{reference\}", lambda m: values[m.group(0)], template)


def judge_scores(
    judge, pairs: list[tuple[Prompt, Answer]], settings, teacher
) -> list[tuple[int | None, str]]:
    """The model judge's (score, reply) for each (prompt, answer); score None when the reply
    holds no integer."""
    requests = [
        [{"role": "user", "content": fill_judge_prompt(judge.prompt, prompt, answer.text)}]
        for prompt, answer in pairs
    ]
    options = dict(
        samples=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=judge.max_new_tokens,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    if judge.endpoint is not None:
        replies = generate_endpoint(judge.endpoint, requests, **options)
    else:
        if teacher is not None and teacher[2] == judge.ref:
            model, tokenizer = teacher[0], teacher[1]  # the teacher judges itself: load it once
        else:
            model, tokenizer = load_generator(judge.ref)
        replies = generate_local(model, tokenizer, requests, **options)
    return [(parse_score(reply[0].text), reply[0].text) for reply in replies]


def _apply_judge(judge, pairs, settings, teacher, report: Report) -> list[tuple[Prompt, Answer]]:
    if judge is None or not pairs:
        return pairs
    kept = []
    if judge.type == "model":
        for (prompt, answer), (score, reply) in zip(
            pairs, judge_scores(judge, pairs, settings, teacher)
        ):
            key = "none" if score is None else str(score)
            report.judge_scores[key] = report.judge_scores.get(key, 0) + 1
            if score is None:
                report.drop("judge_no_score", prompt, answer, reply=reply[:100])
            elif score < judge.min_score:
                report.drop("judge_score_below_min", prompt, answer, score=score)
            else:
                kept.append((prompt, answer))
        return kept
    for prompt, answer in pairs:
        if judge.type == "exact":
            reason = exact_verdict(answer.text, prompt.reference)
        else:
            reason = regex_verdict(judge.pattern, answer.text, prompt.reference)
        if reason:
            report.drop(reason, prompt, answer, reference=prompt.reference[:300])
        else:
            kept.append((prompt, answer))
    return kept


# --------------------------------------------------------------------------- the verb
def _report_path(out: Path) -> Path:
    return out.with_name(out.name + ".report.json")


def generate(recipe, *, force: bool = False) -> Report:
    """Answer data.train's prompts with the teacher, filter, write `out` and its report."""
    settings = recipe.generate
    out = Path(settings.out)
    if out.exists() and not force:
        raise StillError(f"{out} exists", hint="pass --force to replace it, or change generate.out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StillError(f"cannot create {out.parent}: {error.strerror}") from None
    started = time.monotonic()
    report = Report(out=str(out), settings=_settings(recipe))
    prompts = load_prompts(recipe.data, report)
    _check_references(prompts, settings.judge)
    options = dict(
        samples=settings.samples_per_prompt,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    conversations = [prompt.messages for prompt in prompts]
    teacher = None
    if settings.endpoint is not None:
        answers = generate_endpoint(settings.endpoint, conversations, **options)
    else:
        model, tokenizer = load_generator(recipe.teacher)
        answers = generate_local(
            model,
            tokenizer,
            conversations,
            **options,
            chat_template=recipe.data.chat_template,
            origins=[prompt.origin for prompt in prompts],
        )
        judge = settings.judge
        if judge is not None and judge.type == "model" and judge.ref == recipe.teacher.ref:
            teacher = (model, tokenizer, recipe.teacher.ref)  # kept for judging; else freed
        del model
    report.prompts, report.samples = len(prompts), sum(len(a) for a in answers)
    pairs = []
    for prompt, prompt_answers in zip(prompts, answers):
        for answer in prompt_answers:
            if not answer.text:
                report.drop("empty", prompt, answer)
            elif answer.truncated and not settings.keep_truncated:
                report.drop("truncated", prompt, answer)
            else:
                pairs.append((prompt, answer))
    kept = _apply_judge(settings.judge, pairs, settings, teacher, report)
    report.kept = len(kept)
    answered = {id(prompt) for prompt, _ in kept}
    report.prompts_without_answer = sum(id(prompt) not in answered for prompt in prompts)
    report.seconds = round(time.monotonic() - started, 3)
    report_path = _report_path(out)
    atomic_write_text(report_path, json.dumps(_report_dict(report), indent=2) + "\n")
    if not kept:
        left = f"; the existing {out} is left as it was" if out.exists() else ""
        raise StillError(
            f"no answer was kept ({report.summary()}); nothing written to {out}{left}",
            hint=f"see {report_path}",
        )
    lines = [
        json.dumps(
            {
                "messages": [*prompt.messages, {"role": "assistant", "content": answer.text}],
                "origin": prompt.origin,
            },
            ensure_ascii=False,
        )
        + "\n"
        for prompt, answer in kept
    ]
    atomic_write_text(out, "".join(lines))
    return report


def _settings(recipe) -> dict:
    settings = recipe.generate.model_dump(mode="json")
    teacher = "endpoint" if recipe.generate.endpoint else recipe.teacher.ref
    source = recipe.data.train
    return {
        **settings,
        "teacher": teacher,
        "data": source.path or source.hf,
        "system_prompt": recipe.data.system_prompt,
        "recipe": getattr(recipe, "_source", None),
    }


def _report_dict(report: Report) -> dict:
    return {
        "out": report.out,
        "prompts": report.prompts,
        "samples": report.samples,
        "kept": report.kept,
        "dropped": dict(sorted(report.dropped.items())),
        "bad_rows_skipped": report.bad_rows,
        "prompts_without_answer": report.prompts_without_answer,
        "judge_scores": report.judge_scores,
        "drop_examples": report.drop_examples,
        "settings": report.settings,
        "seconds": report.seconds,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
