"""Offline teacher cache: run the teacher once, distill many students (and epochs) from disk.

`still cache R.yaml` runs the distill recipe's teacher over its training (and eval) data and
stores, for every loss-carrying token, the teacher's top-k log-probabilities at the recipe's
temperature, their token ids, and the log of the probability mass outside the top k:

    <distill.teacher_cache>/
      manifest.json                teacher, tokenizer and data hashes, k, temperature, dtypes,
                                   per split: shards, tokens, bytes/token, fidelity
      train/shard-00000.safetensors   log_probs [T, k] fp16 (or uint8 + per-token max and
      train/...                       step), ids [T, k] uint16 (int32 for a vocab over
                                      65536), rest_log [T] fp16, offsets [E + 1]
      eval/...

Rows follow the prepared dataset's example order; `offsets[i]:offsets[i+1]` are example i's
loss tokens in sequence order, which is also the order the KD loss visits them in a batch.
Shards are written whole and renamed into place, so an interrupted `still cache` resumes at
the first missing shard. The loss treats the mass outside the top k as one more "rest" bucket
(see distill/losses.py): with k = vocab it is exact KD.

When the teacher's vocabulary differs from the student's (distill.cross_tokenizer), the rows
are the student's loss tokens and the ids the teacher's, with three more columns per row (which
rows are aligned, and the teacher's rest mass on matched and on unmatched entries); see
distill/xtok_cache.py.

A cache is refused for a recipe whose tokenizer, data (files, data settings), teacher reference
or temperature differ from the ones it was made with, and across tokenizers for another
teacher tokenizer, teacher chat template or vocabulary map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from distill import xtok_cache
from distill.losses import MIN_REST_MASS
from still import data as data_module
from still import models
from still.errors import StillError
from still.fsutil import atomic_write_bytes, atomic_write_json
from still.losses import IGNORE_INDEX
from still.model_files import check_safetensors, read_json_object

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXAMPLES_PER_SHARD = 1024
FIDELITY_SAMPLE_TOKENS = 4096
# What a shard's batches are made of (the teacher's two columns only across tokenizers).
_BATCH_COLUMNS = ("input_ids", "labels", "teacher_input_ids", "teacher_positions")


def expected_manifest(recipe, tokenizer, cross=None) -> dict:
    """What a cache for this recipe must say about itself (everything that changes its rows).
    Across tokenizers (`cross`) the data is the student tokenizer's, and the pair is recorded."""
    if cross is not None:
        tokenizer = cross.student_tokenizer
    splits = {"train": data_module.split_fingerprint(recipe.data, tokenizer, "train")}
    if recipe.data.eval is not None:
        splits["eval"] = data_module.split_fingerprint(recipe.data, tokenizer, "eval")
    return {
        "format_version": FORMAT_VERSION,
        "teacher": models.absolute_ref(recipe.teacher.ref),
        "tokenizer_sha256": data_module.tokenizer_hash(tokenizer),
        "temperature": recipe.distill.temperature,
        "data_sha256": splits,
        **xtok_cache.manifest_entry(cross),
    }


def read_manifest(path: Path) -> dict:
    """A cache's manifest.json, its fields of the types the reader relies on, or one line."""
    manifest = read_json_object(path, what="teacher cache manifest")
    shapes = {
        "splits": dict,
        "top_k": int,
        "examples_per_shard": int,
        "complete": bool,
        "data_sha256": dict,
        "dtypes": dict,
    }
    for key, kind in shapes.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or (kind is int and value < 1):
            raise StillError(
                f"{path}: damaged teacher cache manifest ({key} is {value!r})",
                hint=f"delete {path.parent} and build it again with `still cache`",
            )
    return manifest


def _mismatch(found: dict, expected: dict) -> str | None:
    for key, value in expected.items():
        if found.get(key) != value:
            if key == "data_sha256":
                split = next(s for s in value if found.get(key, {}).get(s) != value[s])
                return f"the {split} data (files or data settings) changed since it was made"
            if key == "cross_tokenizer":
                return xtok_cache.mismatch(found.get(key), value)
            what = {"tokenizer_sha256": "tokenizer"}.get(key, key)
            return f"it was made with another {what} ({found.get(key)!r}, recipe: {value!r})"
    return None


# --------------------------------------------------------------------------- building
@dataclass
class CacheReport:
    split: str
    tokens: int
    examples: int
    bytes_per_token: float
    # Measured on the shards this call wrote; None when an earlier run wrote them all.
    mass_covered: float | None  # mean teacher probability inside the top k
    kl_full_to_cached: float | None  # mean KL(full ‖ cached) per token, nats, on a sample

    def summary(self) -> str:
        if self.mass_covered is None or self.kl_full_to_cached is None:
            quality = "top-k mass and KL not re-measured (every shard was already written)"
        else:
            quality = (
                f"top-k mass {self.mass_covered:.4f}, "
                f"KL(full‖cached) {self.kl_full_to_cached:.2e} nats/token"
            )
        return (
            f"{self.split}: {self.examples} examples, {self.tokens} loss tokens, "
            f"{self.bytes_per_token:.0f} bytes/token, {quality}"
        )


def topk_entries(log_probs: torch.Tensor, k: int):
    """(top-k log-probs, ids, log of the rest mass) of [T, V] log-probabilities."""
    values, ids = log_probs.topk(k, dim=-1)
    covered = torch.logsumexp(values, dim=-1).exp().clamp(max=1.0)
    rest_log = torch.log((1.0 - covered).clamp(min=MIN_REST_MASS))
    return values, ids, rest_log


def kl_full_to_cached(
    log_probs: torch.Tensor,
    topk_ids: torch.Tensor,
    rest_log: torch.Tensor,
    stored_topk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per token KL(p ‖ q), q = the top k as stored (p itself unless `stored_topk`, the
    log-probs after storage rounding, is given) and the rest mass spread evenly over the other
    tokens: what the cache loses (0 for an already even tail, or k = vocab, stored exactly)."""
    vocab, k = log_probs.shape[-1], topk_ids.shape[-1]
    p = log_probs.exp()
    kl = log_probs.new_zeros(log_probs.shape[:-1])
    if stored_topk is not None:
        picked = log_probs.gather(-1, topk_ids)
        kl = kl + (picked.exp() * (picked - stored_topk.to(picked.dtype))).sum(-1)
    if k < vocab:
        outside = torch.ones_like(log_probs, dtype=torch.bool).scatter_(-1, topk_ids, False)
        tail_q = rest_log - math.log(vocab - k)  # log q for each token outside the top k
        kl = kl + torch.where(outside, p * (log_probs - tail_q[:, None]), 0.0).sum(-1)
    return kl.clamp(min=0.0)


def quantize_log_probs(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """[T, k] descending log-probs → uint8 steps below each token's top-1 value: 1 byte each."""
    top = values[:, :1]
    step = ((top - values[:, -1:]) / 255).clamp(min=1e-6)
    steps = ((top - values) / step).round().clamp(0, 255).to(torch.uint8)
    return {
        "log_probs_q": steps,
        "log_probs_top": top.squeeze(1).half(),
        "log_probs_step": step.squeeze(1).half(),
    }


def dequantize_log_probs(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    return (
        stored["log_probs_top"].float()[:, None]
        - stored["log_probs_q"].float() * stored["log_probs_step"].float()[:, None]
    )


def _stored_log_probs(values: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    return {"log_probs": values.half()} if dtype == "float16" else quantize_log_probs(values)


def _read_log_probs(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    return stored["log_probs"].float() if "log_probs" in stored else dequantize_log_probs(stored)


def _teacher_log_probs(teacher, batch: dict, temperature: float, vocab: int) -> torch.Tensor:
    """Teacher log-probs at the loss-carrying positions of a batch, in order: [T, vocab]."""
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = teacher(**batch).logits[:, :-1, :vocab].float()
    keep = labels[:, 1:] != IGNORE_INDEX
    return torch.log_softmax(logits[keep] / temperature, dim=-1)


def _cache_inputs(recipe, teacher, tokenizer, progress: bool):
    """(prepared splits, collator, cross-tokenizer setup or None): the examples a run of this
    recipe trains on, made by the student's tokenizer and aligned when the vocabularies differ."""
    from distill import xtok

    mode, student_tokenizer = xtok.cross_tokenizer_mode(recipe, tokenizer)
    cross = None
    if mode is not None:
        cross = xtok.build(recipe, mode, teacher, tokenizer, None, student_tokenizer)
        tokenizer = student_tokenizer
    splits = {}
    for split in ("train", "eval"):
        prepared = data_module.prepare(recipe.data, tokenizer, split=split, progress=progress)
        if prepared is not None:
            if cross is not None:
                xtok.add_teacher_columns(recipe.data, split, prepared, cross)
            splits[split] = prepared
    collator = data_module.PaddedCollator(tokenizer.pad_token_id)
    if cross is not None:
        xtok.require_alignment(cross, recipe)
        print(f"still: {cross.summary()}")
        collator = xtok.with_teacher_inputs(collator, models.pad_token_id(cross.teacher_tokenizer))
    return splits, collator, cross


def build_cache(recipe, *, progress: bool = True) -> list[CacheReport]:
    """`still cache`: write (or finish) the cache at recipe.distill.teacher_cache."""
    from distill.teacher import load_teacher

    out = recipe.distill.teacher_cache
    if not out:
        raise StillError(
            "the recipe has no distill.teacher_cache", hint="set distill.teacher_cache: DIR"
        )
    out = Path(out)
    teacher, tokenizer = load_teacher(recipe)
    k, vocab = recipe.distill.cache_top_k, len(tokenizer)
    if k > vocab:
        raise StillError(
            f"distill.cache_top_k {k} is larger than the teacher's vocabulary ({vocab})",
            hint=f"use at most {vocab} (= exact KD)",
        )
    splits, collator, cross = _cache_inputs(recipe, teacher, tokenizer, progress)
    expected = expected_manifest(recipe, tokenizer, cross)
    manifest_path = out / MANIFEST
    _refuse_another_cache(out, expected, k, recipe)
    out.mkdir(parents=True, exist_ok=True)
    ids_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    manifest = {
        **expected,
        "top_k": k,
        "vocab_size": vocab,
        "teacher_sha256": models.model_content_hash(teacher),
        "dtypes": {
            "log_probs": recipe.distill.cache_dtype,
            "ids": str(ids_dtype).removeprefix("torch."),
            "rest_log": "float16",
            **({} if cross is None else {"aligned": "uint8"}),
            **{name: "float16" for name in (() if cross is None else xtok_cache.CROSS_COLUMNS[1:])},
        },
        "examples_per_shard": EXAMPLES_PER_SHARD,
        "splits": {},
        "complete": False,
    }
    atomic_write_json(manifest_path, manifest, indent=1)
    reports = []
    for split, prepared in splits.items():
        report, manifest["splits"][split] = _cache_split(
            teacher,
            prepared.dataset,
            out / split,
            collator,
            recipe,
            (k, vocab, ids_dtype, cross),
            progress=progress,
        )
        reports.append(report)
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest, indent=1)
    return reports


def _refuse_another_cache(out: Path, expected: dict, k: int, recipe) -> None:
    """A cache dir may be finished only by the recipe and settings that started it."""
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        return
    found = read_manifest(manifest_path)
    problem = (
        _mismatch(found, expected)
        or (None if found.get("top_k") == k else f"it was made with top_k {found.get('top_k')}")
        or (
            None
            if found.get("dtypes", {}).get("log_probs") == recipe.distill.cache_dtype
            else f"it stores {found.get('dtypes', {}).get('log_probs')} log-probs"
        )
        or (
            None
            if found.get("examples_per_shard") == EXAMPLES_PER_SHARD
            else "its shards are sized differently"
        )
    )
    if problem:
        raise StillError(
            f"{out} holds another cache: {problem}",
            hint="point distill.teacher_cache at a new dir, or delete this one",
        )


def _cache_split(
    teacher, dataset, split_dir: Path, collator, recipe, layout: tuple, *, progress: bool
) -> tuple[CacheReport, dict]:
    """Write one split's missing shards; return its report and its manifest entry.

    `layout` is (top_k, teacher vocab size, ids dtype, cross-tokenizer setup or None)."""
    from tqdm.auto import tqdm

    split = split_dir.name
    split_dir.mkdir(exist_ok=True)
    shards = math.ceil(len(dataset) / EXAMPLES_PER_SHARD)
    bar = tqdm(total=len(dataset), desc=f"teacher cache ({split})", disable=not progress, unit="ex")
    fidelity: list[torch.Tensor] = []
    mass: list[torch.Tensor] = []
    for shard in range(shards):
        start, stop = (
            shard * EXAMPLES_PER_SHARD,
            min((shard + 1) * EXAMPLES_PER_SHARD, len(dataset)),
        )
        path = split_dir / f"shard-{shard:05d}.safetensors"
        if not path.exists():  # else done by an earlier, interrupted run
            _write_shard(
                teacher,
                dataset,
                range(start, stop),
                collator,
                recipe,
                layout,
                path,
                fidelity,
                mass,
            )
        bar.update(stop - start)
    bar.close()
    tokens = sum(_shard_tokens(split_dir / f"shard-{i:05d}.safetensors") for i in range(shards))
    size = sum((split_dir / f"shard-{i:05d}.safetensors").stat().st_size for i in range(shards))
    report = CacheReport(
        split,
        tokens,
        len(dataset),
        size / max(tokens, 1),
        float(torch.cat(mass).mean()) if mass else None,
        float(torch.cat(fidelity).mean()) if fidelity else None,
    )
    return report, {
        "shards": shards,
        "examples": len(dataset),
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": report.bytes_per_token,
        "mass_covered": report.mass_covered,
        "kl_full_to_cached": report.kl_full_to_cached,
    }


def _batch_entries(teacher, batch: dict, recipe, k: int, vocab: int, cross):
    """(full teacher log-probs, their cached entries, which rows are aligned or None) for the
    batch's loss tokens, in order: at once with one vocabulary, a few rows at a time across."""
    if cross is not None:
        yield from xtok_cache.batch_rows(teacher, batch, recipe.distill.temperature, k, cross)
        return
    full = _teacher_log_probs(teacher, batch, recipe.distill.temperature, vocab)
    values, ids, rest_log = topk_entries(full, k)
    yield full, {"values": values, "ids": ids, "rest_log": rest_log}, None


def _write_shard(teacher, dataset, indices, collator, recipe, layout, path, fidelity, mass):
    k, vocab, ids_dtype, cross = layout
    batch_size = recipe.train.batch_size
    dtype = recipe.distill.cache_dtype
    columns: dict[str, list] = {}
    offsets = [0]
    sampled = sum(t.numel() for t in fidelity)
    for first in range(indices.start, indices.stop, batch_size):
        rows = [dataset[i] for i in range(first, min(first + batch_size, indices.stop))]
        batch = collator([{name: r[name] for name in _BATCH_COLUMNS if name in r} for r in rows])
        batch = {name: value.to(teacher.device) for name, value in batch.items()}
        per_example = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
        for full, entries, aligned in _batch_entries(teacher, batch, recipe, k, vocab, cross):
            stored = _stored_log_probs(entries["values"], dtype)
            if sampled < FIDELITY_SAMPLE_TOKENS:
                sample = slice(None) if aligned is None else aligned
                as_read = _read_log_probs(stored)[sample]
                rest = entries["rest_log"][sample].half().float()
                fidelity.append(
                    kl_full_to_cached(full[sample], entries["ids"][sample], rest, as_read).cpu()
                )
                mass.append(entries["values"][sample].exp().sum(-1).cpu())
                sampled += int(as_read.shape[0])
            stored["ids"] = entries["ids"].to(torch.int32)
            for name in ("rest_log", *(() if cross is None else xtok_cache.CROSS_COLUMNS[1:])):
                stored[name] = entries[name].half()
            if aligned is not None:
                stored["aligned"] = aligned.to(torch.uint8)
            for name, tensor in stored.items():
                columns.setdefault(name, []).append(tensor.cpu())
        for count in per_example:
            offsets.append(offsets[-1] + count)
    tensors = {name: torch.cat(parts) for name, parts in columns.items()}
    tensors["ids"] = tensors["ids"].to(ids_dtype)
    tensors["offsets"] = torch.tensor(offsets, dtype=torch.int64)
    atomic_write_bytes(path, save(tensors, metadata={"first_example": str(indices.start)}))


def _shard_tokens(path: Path) -> int:
    with safe_open(str(path), "pt") as handle:
        return int(handle.get_slice("rest_log").get_shape()[0])


# --------------------------------------------------------------------------- reading
class TeacherCache:
    """Read side: cached teacher rows for a batch's examples, in batch order."""

    def __init__(self, directory: Path, split: str, manifest: dict):
        self.directory, self.split, self.manifest = Path(directory), split, manifest
        self.shards: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, recipe, tokenizer, split: str = "train", cross=None) -> TeacherCache:
        directory = Path(recipe.distill.teacher_cache)
        path = directory / MANIFEST
        hint = f"build it with `still cache {getattr(recipe, '_source', None) or 'R.yaml'}`"
        if not path.exists():
            raise StillError(f"no teacher cache at {directory}", hint=hint)
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            raise StillError(f"teacher cache {directory} is incomplete", hint=f"finish it: {hint}")
        problem = _mismatch(manifest, expected_manifest(recipe, tokenizer, cross))
        if problem:
            raise StillError(
                f"teacher cache {directory} does not fit this recipe: {problem}", hint=hint
            )
        if split not in manifest["splits"]:
            raise StillError(f"teacher cache {directory} has no {split} split", hint=hint)
        return cls(directory, split, manifest)

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        if number not in self.shards:
            path = self.directory / self.split / f"shard-{number:05d}.safetensors"
            rebuild = f"delete {self.directory} and build it again with `still cache`"
            if not path.is_file():
                raise StillError(f"teacher cache shard {path} is missing", hint=rebuild)
            check_safetensors(path)  # size, header and extents, before any tensor is read
            with safe_open(str(path), "pt") as handle:
                shard = {name: handle.get_tensor(name) for name in handle.keys()}
            needed = {"offsets", "ids", "rest_log"}
            if self.manifest.get("cross_tokenizer"):
                needed |= set(xtok_cache.CROSS_COLUMNS)
            missing = needed - set(shard)
            if missing:
                raise StillError(
                    f"{path}: damaged teacher cache shard (no {', '.join(sorted(missing))})",
                    hint=rebuild,
                )
            self.shards[number] = shard
        return self.shards[number]

    def columns(self, example_ids: list[int]) -> dict[str, torch.Tensor]:
        """Every stored column's rows for these examples, in order (log_probs read as fp32)."""
        parts: dict[str, list[torch.Tensor]] = {}
        per_shard = self.manifest["examples_per_shard"]
        for example in example_ids:
            shard = self._shard(example // per_shard)
            local = example % per_shard
            start, stop = int(shard["offsets"][local]), int(shard["offsets"][local + 1])
            rows = {name: tensor[start:stop] for name, tensor in shard.items() if name != "offsets"}
            rows = {
                "log_probs": _read_log_probs(rows),
                **{name: t for name, t in rows.items() if not name.startswith("log_probs")},
            }
            for name, tensor in rows.items():
                parts.setdefault(name, []).append(tensor)
        return {name: torch.cat(tensors) for name, tensors in parts.items()}

    def rows(self, example_ids: list[int]):
        """(log_probs [T, k] fp32, ids [T, k] int64, rest_log [T] fp32) for these examples."""
        columns = self.columns(example_ids)
        return (
            columns["log_probs"],
            columns["ids"].to(torch.int64),
            columns["rest_log"].float(),
        )
