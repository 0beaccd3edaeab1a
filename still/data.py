"""Data: rows (read by `still/rows.py`) into input_ids + labels (-100 = no loss), collate.

`prepare(data, tokenizer, split=...)` is what the runners call. Rows are read and checked in
the calling process (so every rank reports a bad row the same way, as `file:line: reason`);
tokenization runs through `datasets.map` with a cache file keyed by the data files' contents,
the tokenizer and the data section, and rank 0 does it first while the others wait and reuse
the cache. Formats and loss masks live in `still/formats.py`.

Packing (`PackedCollator`) flattens a batch into one row. With sdpa/eager attention,
`position_ids` alone do NOT keep packed examples apart (measured: 0.2 logit difference), so the
collator also builds a 4-D block-diagonal causal mask. transformers passes a 4-D mask through
untouched; eager attention *adds* it to the scores, so it must be additive float (0 where
allowed, dtype-min elsewhere): a bool mask is silently wrong under eager (True adds 1.0).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
from accelerate import PartialState

from still import formats
from still.errors import StillError
from still.formats import IGNORE_INDEX, render_loss_mask  # noqa: F401  (re-exported)
from still.rows import BadRow, read_rows, source_files

CACHE_VERSION = "2"  # bump when the encoding changes, so old caches are not reused
MAX_BAD_ROW_EXAMPLES = 3
KEPT = ("ok", "truncated")
# data.num_proc unset: one tokenizing process per this many examples, up to the usable CPU
# cores. On the 2-core CI box 2 processes lost at 1,000 examples (0.75 s vs 0.57 s serial) and
# won from 2,000 (0.95 s vs 1.1 s; 11.7 s vs 21.3 s at 39,000).
EXAMPLES_PER_PROCESS = 1500


@dataclass
class DataStats:
    """What happened to one split's rows; `still check` and the run log print `summary()`."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0  # kept, but cut to max_len
    dropped_too_long: int = 0
    dropped_no_loss: int = 0
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    eos_trained: bool = False  # every kept example's last trained token ends its turn/text

    def summary(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    dataset: datasets.Dataset  # input_ids, labels, length
    stats: DataStats


# --------------------------------------------------------------------------- fingerprints
def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    parts = [
        type(tokenizer).__name__,
        vocab,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        json.dumps(tokenizer.chat_template, default=str),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _source_hash(source) -> str:
    digest = hashlib.sha256(source.model_dump_json().encode())
    if source.hf is not None:
        return digest.hexdigest()  # no content to hash: the id, subset and split are the key
    for path in source_files(source):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _settings_json(data) -> str:
    # pack_row_tokens only arranges batches: the tokenized rows (and caches keyed by them) are the
    # same
    return data.model_dump_json(exclude={"train", "mix", "eval", "pack_row_tokens"})


def data_fingerprint(data, tokenizer) -> str:
    """sha256 of the data files (or dataset ids), the tokenizer and the data section."""
    parts = [
        CACHE_VERSION,
        _settings_json(data),
        tokenizer_hash(tokenizer),
        *[_source_hash(source) for source in data.train_sources()],
        _source_hash(data.eval) if data.eval else "",
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def split_fingerprint(data, tokenizer, split: str) -> str:
    # Per split, so that editing the eval file does not re-tokenize the training set.
    sources = data.train_sources() if split == "train" else [data.eval]
    parts = [
        CACHE_VERSION,
        split,
        _settings_json(data),
        tokenizer_hash(tokenizer),
        *[_source_hash(source) for source in sources],
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("STILL_CACHE", "~/.cache/still")).expanduser() / "data"


# --------------------------------------------------------------------------- tokenization
FEATURES = datasets.Features(
    {
        "origin": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "loss_tokens": datasets.Value("int32"),
        "status": datasets.Value("string"),  # ok | truncated | too_long | no_loss | bad: reason
        "eos_trained": datasets.Value("bool"),
    }
)


def _tokenize_batch(batch, *, encoder, max_len: int, truncation: str) -> dict[str, list]:
    out = {name: [] for name in FEATURES if name != "origin"}
    for example in batch["example"]:
        status, ids, labels, end = "ok", [], [], None
        try:
            encoded = encoder.encode(json.loads(example))
            ids, labels, end = encoded.input_ids, encoded.labels, encoded.end_of_turn
        except BadRow as bad:
            status = f"bad: {bad.reason}"
        if len(ids) > max_len:
            if truncation == "drop":
                status, ids, labels = "too_long", [], []
            else:
                status, ids, labels = "truncated", ids[:max_len], labels[:max_len]
        # Position 0 is never predicted (labels shift by one), so it never carries loss.
        loss = sum(label != IGNORE_INDEX for label in labels[1:])
        if status in KEPT and loss == 0:
            status, ids, labels = "no_loss", [], []
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["loss_tokens"].append(loss if status in KEPT else 0)
        out["status"].append(status)
        out["eos_trained"].append(end is not None and end < len(ids))
    return out


def _examples(data, source, split: str, stats: DataStats) -> list[dict]:
    """Read and check rows; bad ones raise or are counted, per data.on_bad_rows."""
    records = []
    for origin, row in read_rows(source):
        stats.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            example = formats.row_to_example(
                row, source, split=split, system_prompt=data.system_prompt
            )
        except BadRow as bad:
            _bad_row(data, stats, origin, bad)
            continue
        records.append({"origin": origin, "example": json.dumps(example)})
    return records


def check_rows(data) -> None:
    """Read and check every row of every split as `prepare` would, without a tokenizer: a
    bad row (a conversation with no assistant turn, say) or a split left with no examples is
    one StillError (a pipeline checks each stage's data before any stage starts)."""
    for split, sources in (("train", data.train_sources()), ("eval", [data.eval])):
        for source in sources:
            if source is None:
                continue
            stats = DataStats()
            if not _examples(data, source, split, stats):
                raise StillError(
                    f"{source.path or source.hf}: no usable examples ({_breakdown(data, stats)})",
                    _no_examples_hint(data, stats),
                )


def _bad_row(data, stats: DataStats, origin: str, bad: BadRow) -> None:
    if data.on_bad_rows == "error":
        hint = (
            f"{bad.hint}, or set data.on_bad_rows: skip"
            if bad.hint
            else ("fix the row, or set data.on_bad_rows: skip")
        )
        raise StillError(f"{origin}: {bad.reason}", hint)
    stats.bad_rows += 1
    if len(stats.bad_row_examples) < MAX_BAD_ROW_EXAMPLES:
        stats.bad_row_examples.append(f"{origin}: {bad.reason}")


def _check_template(data, source, tokenizer) -> None:
    if source.format != "completion" and not (data.chat_template or tokenizer.chat_template):
        raise StillError(
            f"the tokenizer has no chat template, which format '{source.format}' needs",
            "set data.chat_template to a Jinja template, or use format: completion",
        )


def tokenizing_processes(num_proc: int | None, examples: int) -> int:
    """data.num_proc if set, else one process per EXAMPLES_PER_PROCESS examples, up to the
    cores this process may run on; never more processes than examples."""
    if num_proc is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        num_proc = min(cores or 1, examples // EXAMPLES_PER_PROCESS)
    return max(1, min(num_proc, examples))


def _tokenize(
    data, tokenizer, records, cache_file: Path, fingerprint: str, split: str, progress: bool
) -> datasets.Dataset:
    encoder = formats.Encoder(tokenizer, data.train_on, data.chat_template)
    num_proc = tokenizing_processes(data.num_proc, len(records))
    bars_were_on = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return datasets.Dataset.from_list(records).map(
            _tokenize_batch,
            batched=True,
            fn_kwargs={"encoder": encoder, "max_len": data.max_len, "truncation": data.truncation},
            remove_columns=["example"],
            features=FEATURES,
            num_proc=num_proc if num_proc > 1 else None,
            new_fingerprint=fingerprint[:40] + split,
            cache_file_name=str(cache_file),
            load_from_cache_file=True,
            desc=f"Tokenizing {split}",
        )
    finally:
        if bars_were_on and not progress:
            datasets.enable_progress_bars()


def _finish(data, mapped: datasets.Dataset, stats: DataStats, source_name: str):
    table = mapped.data
    statuses = table.column("status").to_pylist()
    origins = table.column("origin").to_pylist()
    for origin, status in zip(origins, statuses):
        if status.startswith("bad: "):
            _bad_row(data, stats, origin, BadRow(status[5:], "fix the row or the chat template"))
    keep = [index for index, status in enumerate(statuses) if status in KEPT]
    stats.examples = len(keep)
    stats.truncated = statuses.count("truncated")
    stats.dropped_too_long = statuses.count("too_long")
    stats.dropped_no_loss = statuses.count("no_loss")
    stats.tokens = sum(table.column("length").to_pylist())
    stats.loss_tokens = sum(table.column("loss_tokens").to_pylist())
    eos = table.column("eos_trained").to_pylist()
    stats.eos_trained = bool(keep) and all(eos[index] for index in keep)
    if not keep:
        raise StillError(
            f"{source_name}: no usable examples ({_breakdown(data, stats)})",
            _no_examples_hint(data, stats),
        )
    dataset = mapped.select(keep) if len(keep) < len(statuses) else mapped
    return dataset.select_columns(["input_ids", "labels", "length"])


def _breakdown(data, stats: DataStats) -> str:
    counts = [
        (stats.bad_rows, "bad"),
        (stats.dropped_too_long, f"longer than max_len {data.max_len}"),
        (stats.dropped_no_loss, "with no loss token left after truncation"),
    ]
    return ", ".join([f"{stats.rows} rows"] + [f"{n} {what}" for n, what in counts if n])


def _no_examples_hint(data, stats: DataStats) -> str:
    if stats.dropped_too_long:
        return "raise data.max_len or set data.truncation: truncate"
    if stats.dropped_no_loss:
        return "raise data.max_len: truncation cut off every trained token"
    if stats.bad_row_examples:
        return f"every row is bad, e.g. {stats.bad_row_examples[0]}"
    return "check the data file"


def prepare(
    data,
    tokenizer,
    *,
    split: Literal["train", "eval"] = "train",
    cache_dir: Path | None = None,
    progress: bool = True,
) -> PreparedData | None:
    """Read, check, tokenize and mask one split; None for split="eval" without eval data."""
    sources = data.train_sources() if split == "train" else [data.eval]
    if sources[0] is None:
        return None
    stats = DataStats()
    records = []
    for source in sources:
        _check_template(data, source, tokenizer)
        records += _examples(data, source, split, stats)
    source_name = " + ".join(source.path or source.hf for source in sources)
    if not records:
        raise StillError(
            f"{source_name}: no usable examples ({_breakdown(data, stats)})",
            _no_examples_hint(data, stats),
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = split_fingerprint(data, tokenizer, split)
    cache_file = cache_dir / f"{fingerprint[:40]}-{split}.arrow"
    # One process per machine tokenizes (in its own pool) while that machine's other ranks wait,
    # then they read its cache: a cache dir that is not shared between machines is filled once on
    # each. On a shared one, each machine's writer renames its finished files into place.
    with PartialState().local_main_process_first():
        mapped = _tokenize(data, tokenizer, records, cache_file, fingerprint, split, progress)
    dataset = _finish(data, mapped, stats, source_name)
    return PreparedData(dataset=dataset, stats=stats)


# --------------------------------------------------------------------------- collators
class PackedCollator:
    """Padding-free batches: the batch's examples, in order, concatenated into rows.

    position_ids restart at 0 per example and each example's first label is -100 (nothing
    predicts across a boundary). With `row_tokens` (the recipe's max_len), examples fill rows
    of at most that many tokens, so attention costs the sum of each row's length squared, not
    the square of the whole batch; rows are right-padded to the longest with pad tokens that
    continue the row's last example (label -100, seen by nothing before them). Without it the
    whole batch is ONE row. "block_mask" adds an additive float [rows, 1, L, L]
    block-diagonal causal mask (exact for sdpa and eager); pass `mask_dtype` = the model's
    compute dtype for bf16/fp16 weights. "position_ids" adds no mask: for flash-attention
    varlen, which separates examples from position_ids alone.
    """

    def __init__(
        self,
        pad_token_id: int,
        attention: Literal["block_mask", "position_ids"] = "block_mask",
        *,
        mask_dtype: torch.dtype = torch.float32,
        row_tokens: int | None = None,
    ):
        if attention not in ("block_mask", "position_ids"):
            raise ValueError(f"unknown attention mode {attention!r}")
        self.pad_token_id = pad_token_id
        self.attention = attention
        self.mask_dtype = mask_dtype
        self.row_tokens = row_tokens

    def _rows(self, features: list[dict]) -> list[list[dict]]:
        rows: list[list[dict]] = [[]]
        used = 0
        for feature in features:
            size = len(feature["input_ids"])
            if rows[-1] and self.row_tokens is not None and used + size > self.row_tokens:
                rows.append([])
                used = 0
            rows[-1].append(feature)
            used += size
        return rows

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = self._rows(features)
        width = max(sum(len(f["input_ids"]) for f in row) for row in rows)
        input_ids, labels, positions, owners = [], [], [], []
        example = 0
        for row in rows:
            row_ids, row_labels, row_positions, row_owner = [], [], [], []
            for feature in row:
                ids = list(feature["input_ids"])
                example_labels = list(feature["labels"])
                example_labels[0] = IGNORE_INDEX
                row_ids += ids
                row_labels += example_labels
                row_positions += range(len(ids))
                row_owner += [example] * len(ids)
                example += 1
            padding = width - len(row_ids)
            input_ids.append(row_ids + [self.pad_token_id] * padding)
            labels.append(row_labels + [IGNORE_INDEX] * padding)
            last = row_positions[-1]
            positions.append(row_positions + list(range(last + 1, last + 1 + padding)))
            owners.append(row_owner + [row_owner[-1]] * padding)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }
        if self.attention == "block_mask":
            batch["attention_mask"] = torch.cat(
                [block_causal_mask(torch.tensor(owner), self.mask_dtype) for owner in owners]
            )
        return batch


def block_causal_mask(owner: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, 1, N, N] additive mask: token i sees token j iff same example and j <= i."""
    size = owner.numel()
    allowed = (owner[:, None] == owner[None, :]) & torch.ones(size, size, dtype=torch.bool).tril()
    mask = torch.zeros(size, size, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class PaddedCollator:
    """Right padding: input_ids/attention_mask/labels [B, L]; labels padded with -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        input_ids, attention, labels = [], [], []
        for feature in features:
            ids, padding = list(feature["input_ids"]), width - len(feature["input_ids"])
            input_ids.append(ids + [self.pad_token_id] * padding)
            attention.append([1] * len(ids) + [0] * padding)
            labels.append(list(feature["labels"]) + [IGNORE_INDEX] * padding)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


# ------------------------------------------------------------------------ prompts to generate from
def batches_longest_first(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (less padding; order restored later)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, L] with left padding: every prompt ends where
    generation starts."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask
