"""`still` as an lm-evaluation-harness model: `--model still --model_args ref=runs/x`.

`StillLM` answers lm-eval's three request types with the kit's own scorer (`eval/scorer.py`):

- `loglikelihood`: lm-eval's `TemplateLM` tokenises each (context, continuation) pair as its
  `hf` backend does; we then group the requests that share a context and score each group in
  one forward pass, the context once and every continuation as its own masked branch;
- `loglikelihood_rolling`: lm-eval's own rolling windows (`get_rolling_token_windows`,
  `make_disjoint_window`) over the model's context length, scored as above;
- `generate_until`: left-padded batched generation with per-row stop strings, with lm-eval's
  own normalisation of the task's generation kwargs and stop sequences.

Any model reference the kit takes works (`ref=` a run dir with its adapter, a model dir, a
`.gguf`, `builtin:NAME`, a hub id); the model loads in float32 unless `dtype=` says otherwise.

Registration: importing this module registers `still` in lm-eval's model registry (its public
`register_model`). The package also declares it as an `lm_eval.models` entry point;
lm-eval 0.4.13 does not scan that group itself, so `register_lm_eval_models()` registers every
installed entry point of the group lazily, and `still-lm-eval` (this module's `main`) is
lm-eval's own command line with them registered:
`still-lm-eval run --model still --model_args ref=runs/x --tasks arc_easy`.
"""

from __future__ import annotations

import json
import logging
from importlib import metadata

import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    resolve_max_length,
)
from tqdm.auto import tqdm

from eval.scorer import continuation_scores, generate_texts
from eval.tasks import Generation
from still import models
from still.errors import StillError

ENTRY_POINT_GROUP = "lm_eval.models"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM.max_gen_toks

log = logging.getLogger(__name__)


@register_model("still")
class StillLM(TemplateLM):
    """An lm-eval `LM` over a model the kit loads (or one already loaded: `model=`,
    `tokenizer=`, as `still eval` passes it)."""

    def __init__(
        self,
        ref: str | None = None,
        *,
        model=None,
        tokenizer=None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_length: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        **ignored,
    ) -> None:
        super().__init__()
        if model is None:
            if not ref:
                raise StillError(
                    "the still backend needs a model: --model_args ref=REF",
                    hint="REF is anything still takes: a run dir, a model dir, a .gguf, "
                    "builtin:NAME",
                )
            model, tokenizer = models.load_model(str(ref), dtype=dtype)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line defaults to cuda; the model stays where the kit put it
            log.info("still backend: %s is not available, keeping the model on its device", device)
        elif device:
            model = model.to(device)
        if ignored:
            log.info("still backend: ignoring lm-eval options %s", sorted(ignored))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else None
        self._name = str(ref) if ref else getattr(model, "name_or_path", "still")

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # the `hf` backend's choice: BOS when the tokenizer has one, else EOS
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(self.model.config, self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self._name)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        # `HFLM.tok_encode`: the tokenizer's default special tokens, unless the text has BOS.
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and has_bos_prefix(string, prefix):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log-likelihood, is_greedy) per request; requests sharing a context share a pass."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            # The `hf` backend keeps the last max_length + 1 tokens of context + continuation.
            overflow = len(context) + len(continuation) - (self.max_length + 1)
            context = context[overflow:] if overflow > 0 else context
            groups.setdefault(tuple(context), []).append(index)
        items = [
            (list(context), [requests[i][2] for i in group]) for context, group in groups.items()
        ]
        bar = tqdm(total=len(items), disable=disable_tqdm, desc="still loglikelihood", unit="ctx")
        with torch.inference_mode():
            scores = continuation_scores(self.model, items, self.batch_size, bar)
        bar.close()
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for group, group_scores in zip(groups.values(), scores):
            for index, score in zip(group, group_scores):
                results[index] = score
        for (arguments, _, _), result in zip(requests, results):
            if arguments is not None:
                self.cache_hook.add_partial("loglikelihood", arguments, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for number, (string,) in enumerate(request.args for request in requests):
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                context, continuation = lm_eval_utils.make_disjoint_window(window)
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (loglik, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += loglik
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) text per request, grouped by generation kwargs like `hf`."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="still generate", unit="q")
        for group in groups.values():
            options = normalize_gen_kwargs(dict(requests[group[0]].args[1]), DEFAULT_MAX_GEN_TOKS)
            settings = _generation(options, handle_stop_sequences(options.get("until"), eos=eos))
            room = self.max_length - settings.max_new_tokens
            if room <= 0:
                raise StillError(
                    f"the task asks for {settings.max_new_tokens} new tokens, but the model's "
                    f"context is {self.max_length} tokens",
                    hint="lower max_gen_toks in the task's generation_kwargs",
                )
            encoded = [self.tok_encode(requests[i].args[0])[-room:] for i in group]
            with torch.inference_mode():
                texts = generate_texts(
                    self.model, self.tokenizer, encoded, settings, self.batch_size, bar
                )
            for index, text in zip(group, texts):
                results[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        bar.close()
        return results


def _batch_size(value: int | str) -> int:
    text = str(value)
    if text.startswith("auto"):
        # No probing: our batches are questions (each context once), not (context, choice)
        # pairs, and the default fits the small models this kit makes.
        log.info("still backend: batch_size %s -> %d", text, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    if not text.isdigit() or int(text) < 1:
        raise StillError(f"batch_size must be a whole number >= 1 (got {value!r})")
    return int(text)


def _generation(options: dict, stop: list[str]) -> Generation:
    """lm-eval's normalised generation kwargs as the kit's `Generation` settings."""
    sampling = bool(options.get("do_sample")) and float(options.get("temperature") or 0) > 0
    return Generation(
        max_new_tokens=int(options["max_gen_toks"]),
        stop=stop,
        do_sample=sampling,
        temperature=float(options.get("temperature") or 1.0) if sampling else 1.0,
        top_p=float(options.get("top_p") or 1.0) if sampling else 1.0,
    )


def register_lm_eval_models() -> list[str]:
    """Register every installed `lm_eval.models` entry point in lm-eval's model registry, as a
    lazy "module:Class" placeholder (lm-eval 0.4.13 does not read the group). Returns the names
    registered; a name lm-eval already has is left as it is."""
    names = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if model_registry.get(entry_point.name, None) is None:
            model_registry.register(entry_point.name, target=entry_point.value)
        names.append(entry_point.name)
    return names


def main() -> None:
    """`still-lm-eval`: lm-eval's command line, with the installed model entry points
    (`still` among them) registered first."""
    from lm_eval.__main__ import cli_evaluate

    register_lm_eval_models()
    cli_evaluate()


if __name__ == "__main__":
    main()
