"""The teacher cache across tokenizers: what `still cache` stores when the teacher's vocabulary
differs from the student's, and how a recipe proves its cache still fits it.

The student's tokenizer and template make the examples, exactly as a cross-tokenizer run does
(distill/xtok.py), so a shard has one row per student loss token, in the same order as the
same-tokenizer cache. Each row holds what the teacher predicts at the teacher position aligned
with that student position: its top-k log-probabilities in the teacher's own vocabulary and
their teacher ids, plus

    aligned             [T] uint8   1 where a teacher position teaches this student position
    matched_rest_log    [T] fp16    log of the teacher's mass outside the top k on the entries
                                    that map one-to-one to student tokens (distill/align.py)
    unmatched_rest_log  [T] fp16    log of its mass outside the top k on all other entries

computed from the full distribution before any rounding, so the loss
(`distill.xtok_losses.xtok_cached_kd_loss`) sees each bucket's true mass. `rest_log` is their
sum, as in a same-tokenizer shard. Both cross-tokenizer losses (uld and gold) read the same
cache. The manifest also records the teacher's tokenizer, its chat template and the vocabulary
map, so a cache made for another pair, template or map is refused.
"""

from __future__ import annotations

import hashlib
import json

import torch

from distill.losses import MIN_REST_MASS
from still import data as data_module
from still.losses import IGNORE_INDEX

# Teacher rows projected onto its vocabulary at once: [rows × teacher vocab] fp32 each time.
TEACHER_ROWS_AT_ONCE = 256
CROSS_COLUMNS = ("aligned", "matched_rest_log", "unmatched_rest_log")


def manifest_entry(cross) -> dict:
    """What a cache made across tokenizers says about the pair (None: one vocabulary)."""
    if cross is None:
        return {"cross_tokenizer": None}
    mapping = cross.mapping
    digest = hashlib.sha256()
    for part in (mapping.student_ids, mapping.teacher_ids):
        digest.update(part.to(torch.int64).numpy().tobytes())
    digest.update(f"{mapping.student_vocab}/{mapping.teacher_vocab}".encode())
    template = json.dumps(cross.teacher_chat_template or cross.teacher_tokenizer.chat_template)
    return {
        "cross_tokenizer": {
            "teacher_tokenizer_sha256": data_module.tokenizer_hash(cross.teacher_tokenizer),
            "teacher_chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "vocab_map_sha256": digest.hexdigest(),
        }
    }


def mismatch(found, expected) -> str:
    """Why a manifest's cross_tokenizer entry differs from the recipe's, in words."""
    if expected is None:
        return "it was made for cross-tokenizer KD (another tokenizer than the student's)"
    if found is None:
        return "it was made for same-tokenizer KD, and this recipe distils across tokenizers"
    names = {
        "teacher_tokenizer_sha256": "teacher tokenizer",
        "teacher_chat_template_sha256": "distill.teacher_chat_template",
        "vocab_map_sha256": "vocabulary map (tokenizers or chat templates)",
    }
    changed = [names[key] for key in names if found.get(key) != expected[key]]
    return f"it was made with another {', '.join(changed) or 'cross-tokenizer setup'}"


def matched_mask(cross, device) -> torch.Tensor:
    """[teacher vocab] bool: the teacher entries with a one-to-one student token."""
    mask = torch.zeros(cross.mapping.teacher_vocab, dtype=torch.bool, device=device)
    mask[cross.mapping.teacher_ids.to(device)] = True
    return mask


def teacher_entries(log_probs: torch.Tensor, k: int, matched: torch.Tensor) -> dict:
    """[N, V_T] teacher log-probs → its top k (values, ids) and the log mass outside them on
    matched and on unmatched entries (each floored at MIN_REST_MASS), all in full precision."""
    values, ids = log_probs.topk(k, dim=-1)
    probs = log_probs.exp()
    top = values.exp()
    top_matched = matched[ids]
    matched_total = (probs * matched).sum(-1)
    matched_rest = matched_total - (top * top_matched).sum(-1)
    unmatched_rest = (1.0 - matched_total) - (top * ~top_matched).sum(-1)
    matched_rest, unmatched_rest = (
        rest.clamp(min=MIN_REST_MASS) for rest in (matched_rest, unmatched_rest)
    )
    return {
        "values": values,
        "ids": ids,
        "rest_log": (matched_rest + unmatched_rest).log(),
        "matched_rest_log": matched_rest.log(),
        "unmatched_rest_log": unmatched_rest.log(),
    }


def batch_rows(teacher, batch: dict, temperature: float, k: int, cross):
    """For each student loss token of a collated cross-tokenizer batch, in order, the teacher's
    entries at its aligned teacher position; yields a few hundred rows at a time as
    (full teacher log-probs [n, V_T], entries, aligned [n] bool)."""
    keep = batch["labels"][:, 1:].reshape(-1) != IGNORE_INDEX
    index = batch["teacher_index"].to(keep.device)[keep]
    with torch.no_grad():
        out = teacher(
            input_ids=batch["teacher_input_ids"],
            attention_mask=batch["teacher_attention_mask"],
            logits_to_keep=1,
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])[index.clamp(min=0).to(hidden.device)]
        head = teacher.get_output_embeddings()
        matched = matched_mask(cross, hidden.device)
        vocab = cross.mapping.teacher_vocab
        for start in range(0, hidden.shape[0], TEACHER_ROWS_AT_ONCE):
            logits = head(hidden[start : start + TEACHER_ROWS_AT_ONCE])[:, :vocab].float()
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            del logits
            aligned = index[start : start + TEACHER_ROWS_AT_ONCE] >= 0
            yield log_probs, teacher_entries(log_probs, k, matched), aligned
