"""The KD Trainer: its loss is KD (+ optional hard-label CE) against a frozen teacher, online,
from a teacher cache, across tokenizers, or on the student's own samples (on-policy).

The loss never materialises [tokens × vocab] logits for the whole batch: both models return
their final hidden states and `fused_kd_loss` applies each lm_head chunk by chunk. distill/kd.py
builds it; this module holds only the training step.
"""

from __future__ import annotations

import random

import torch
from transformers import Trainer

from distill import xtok
from distill.batches import prompts_and_budgets
from distill.losses import FusedKDLoss, cached_kd_loss, fused_kd_loss, kd_loss
from distill.teacher import (
    place_teacher,
)
from still import data as data_module
from still import models
from still.errors import StillError
from still.losses import IGNORE_INDEX
from still.train import (
    token_mean_loss,
    zero_stage,
)


# --------------------------------------------------------------------------- loss
class KDTrainer(Trainer):
    """Trainer whose loss is KD (+ optional hard-label CE) against a frozen teacher."""

    # compute_loss normalises by the global number of loss tokens itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        teacher,
        distill,
        vocab_size: int,
        loss_chunk_size: int,
        teacher_placement: str = "auto",
        teacher_cache: dict | None = None,
        cross_tokenizer: xtok.CrossTokenizer | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.cross_tokenizer = cross_tokenizer  # None: one vocabulary, the fused loss below
        self.teacher_cache = teacher_cache  # split -> TeacherCache, instead of a teacher model
        if teacher_cache is not None and zero_stage(self) == 3:
            raise StillError(
                "distill.teacher_cache does not work under zero3 yet (the student's head "
                "is partitioned)",
                hint="use strategy ddp or zero2 with a teacher cache",
            )
        self.teacher = None if teacher is None else self._place_teacher(teacher, teacher_placement)
        # The same draws on every rank, so all ranks generate (or not) at the same step.
        self._on_policy_draws = random.Random(self.args.seed)
        self._on_policy_counts = {"batches": 0, "on_policy": 0}
        self.distill = distill
        self.loss_chunk_size = loss_chunk_size
        self.vocab_size = vocab_size
        self._component_sums = {"kd": 0.0, "ce": 0.0, "tokens": 0.0}

    def _place_teacher(self, teacher, choice: str):
        """A copy per process, or sharded like the student under ZeRO-3 / FSDP."""
        stage = zero_stage(self)
        if stage is not None:
            strategy = f"zero{stage}"
        elif self.is_fsdp_enabled:
            strategy = "fsdp"
        else:
            strategy = "ddp" if self.accelerator.num_processes > 1 else "single"
        state = self.accelerator.state
        return place_teacher(
            teacher,
            choice,
            strategy=strategy,
            device=self.args.device,
            num_processes=self.accelerator.num_processes,
            deepspeed_plugin=state.deepspeed_plugin if stage is not None else None,
            fsdp_plugin=state.fsdp_plugin if self.is_fsdp_enabled else None,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        inputs.pop("length", None)
        inputs.pop("skip_logits", None)  # Trainer's hint to Liger's loss, which is not used here
        example_ids = inputs.pop("example_ids", None)
        examples = inputs.pop("examples", None)  # across tokenizers: to re-render samples
        if model.training and self._draw_on_policy():
            inputs, labels = self._student_answers(model, inputs, labels, examples)
            # Trainer counted the dataset answers' tokens; these answers have their own count
            num_items_in_batch = None
        teacher_inputs = {key: inputs.pop(key) for key in xtok.BATCH_KEYS if key in inputs}
        # logits_to_keep=1: the models skip their own full-vocab projection; we do it chunked.
        student_out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
        if self.teacher_cache is not None:
            out = self._cached_loss(model, student_out, labels, example_ids)
            return self._normalise(out, model, num_items_in_batch, student_out, return_outputs)
        if self.cross_tokenizer is not None:
            out = xtok.cross_tokenizer_loss(self, model, student_out, labels, teacher_inputs)
            return self._normalise(out, model, num_items_in_batch, student_out, return_outputs)
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, logits_to_keep=1, output_hidden_states=True)
        # position i predicts token i + 1
        student_hidden = student_out.hidden_states[-1][:, :-1].reshape(
            -1, student_out.hidden_states[-1].shape[-1]
        )
        teacher_hidden = teacher_out.hidden_states[-1][:, :-1].reshape(
            -1, teacher_out.hidden_states[-1].shape[-1]
        )
        target = labels[:, 1:].reshape(-1)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        teacher_head = getattr(self.teacher, "module", self.teacher).get_output_embeddings()
        if head.weight.numel() == 0 or teacher_head.weight.numel() == 0:
            # ZeRO-3 partitions the heads; only a call of the module gathers them.
            out = self._unfused_loss(head, teacher_head, student_hidden, teacher_hidden, target)
        else:
            out = self._fused_loss(head, teacher_head, student_hidden, teacher_hidden, target)
        return self._normalise(out, model, num_items_in_batch, student_out, return_outputs)

    def _draw_on_policy(self) -> bool:
        self._on_policy_counts["batches"] += 1
        ratio = self.distill.on_policy_ratio
        chosen = ratio > 0 and self._on_policy_draws.random() < ratio
        self._on_policy_counts["on_policy"] += chosen
        return chosen

    def _student_answers(self, model, inputs, labels, examples=None):
        """GKD: the batch's prompts answered by the student itself; the teacher then scores
        those answers token by token. Loss on the sampled tokens (and the end-of-turn token:
        the first stop token, which for Gemma-3's <end_of_turn> or Phi-3's <|end|> is not the
        tokenizer's eos)."""
        student = self.accelerator.unwrap_model(model)
        tokenizer = self.processing_class
        stops = models.stop_token_ids(student, tokenizer)
        prompts, budgets = prompts_and_budgets(inputs, labels)
        limit = self.distill.on_policy_max_new_tokens
        budgets = [min(b, limit) if limit else b for b in budgets]
        pad = models.pad_token_id(tokenizer)
        ids, mask = data_module.left_padded(prompts, pad)
        width = ids.shape[1]
        device = inputs["input_ids"].device
        was_training = student.training
        student.eval()
        with torch.no_grad():
            generated = student.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(budgets),
                do_sample=True,
                temperature=self.distill.on_policy_temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
                eos_token_id=stops,
                synced_gpus=zero_stage(self) == 3,
            )[:, width:].tolist()
        student.train(was_training)
        features = []
        for prompt, budget, sample in zip(prompts, budgets, generated):
            sample = sample[:budget]
            ends = [position for position, token in enumerate(sample) if token in stops]
            if ends:  # up to and including the end of the turn
                sample = sample[: ends[0] + 1]
            features.append(
                {"input_ids": prompt + sample, "labels": [IGNORE_INDEX] * len(prompt) + sample}
            )
        if self.cross_tokenizer is not None:  # both models re-tokenize the samples' text
            features = xtok.sample_features(self.cross_tokenizer, examples, features, prompts)
        batch = self._prepare_inputs(self.data_collator(features))
        labels = batch.pop("labels")
        batch.pop("example_ids", None)
        return batch, labels

    def _normalise(self, out: FusedKDLoss, model, num_items_in_batch, student_out, return_outputs):
        """Loss sums → the loss Trainer backpropagates, normalised by the global token count."""
        loss = token_mean_loss(self, model, out.loss, out.n_tokens, num_items_in_batch)
        if model.training:
            self._component_sums["kd"] += float(out.kd_sum)
            self._component_sums["ce"] += float(out.ce_sum)
            self._component_sums["tokens"] += float(out.n_tokens)
        return (loss, student_out) if return_outputs else loss

    def loss_settings(self) -> dict:
        """The recipe's divergence and weights, as every chunked KD loss takes them."""
        d = self.distill
        return dict(
            divergence=d.loss,
            temperature=d.temperature,
            beta=d.beta,
            alpha=d.alpha,
            kd_weight=d.kd_weight,
            ce_weight=d.ce_weight,
        )

    def _cached_loss(self, model, student_out, labels, example_ids) -> FusedKDLoss:
        """KD against the teacher cache's rows for this batch's examples (see distill/cache.py)."""
        cache = self.teacher_cache["train" if model.training else "eval"]
        hidden = student_out.hidden_states[-1][:, :-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        if self.cross_tokenizer is not None:
            return xtok.cached_cross_tokenizer_loss(self, head, hidden, labels, cache, example_ids)
        log_probs, ids, rest_log = cache.rows(example_ids.tolist())
        return cached_kd_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            log_probs,
            ids,
            rest_log,
            labels[:, 1:].reshape(-1),
            vocab_size=self.vocab_size,
            chunk_size=self.loss_chunk_size,
            **self.loss_settings(),
            student_head_bias=getattr(head, "bias", None),
        )

    def _fused_loss(
        self, head, teacher_head, student_hidden, teacher_hidden, target
    ) -> FusedKDLoss:
        return fused_kd_loss(
            student_hidden,
            head.weight,
            teacher_hidden.to(student_hidden.dtype),
            teacher_head.weight.to(head.weight.dtype),
            target,
            vocab_size=self.vocab_size,
            chunk_size=self.loss_chunk_size,
            **self.loss_settings(),
            student_head_bias=getattr(head, "bias", None),
            teacher_head_bias=getattr(teacher_head, "bias", None),
        )

    def _unfused_loss(
        self, head, teacher_head, student_hidden, teacher_hidden, target
    ) -> FusedKDLoss:
        """Same sums from full logits: costs [tokens x vocab] memory, used only under ZeRO-3."""
        d, vocab = self.distill, self.vocab_size
        student_logits = head(student_hidden)[:, :vocab].float()
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)[:, :vocab].float()
        mask = target != IGNORE_INDEX
        kd_sum = kd_loss(
            student_logits,
            teacher_logits,
            mask,
            divergence=d.loss,
            temperature=d.temperature,
            beta=d.beta,
            alpha=d.alpha,
            reduction="sum",
        )
        ce_sum = torch.nn.functional.cross_entropy(
            student_logits, target, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss = d.kd_weight * kd_sum + d.ce_weight * ce_sum
        return FusedKDLoss(loss, kd_sum.detach(), ce_sum.detach(), mask.sum())

    def log(self, logs, *args, **kwargs):
        sums = self._component_sums
        if sums["tokens"] and "loss" in logs:
            logs["kd_loss"] = sums["kd"] / sums["tokens"]
            logs["ce_loss"] = sums["ce"] / sums["tokens"]
            if self.distill.on_policy_ratio > 0:
                counts = self._on_policy_counts
                logs["on_policy_fraction"] = counts["on_policy"] / max(counts["batches"], 1)
                self._on_policy_counts = {"batches": 0, "on_policy": 0}
            self._component_sums = {"kd": 0.0, "ce": 0.0, "tokens": 0.0}
        super().log(logs, *args, **kwargs)
