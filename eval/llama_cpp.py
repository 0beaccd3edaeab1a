"""A GGUF file scored as it ships: llama.cpp through llama-cpp-python (the `still[gguf]` extra).

`LlamaCppModel` answers the two questions eval/scorer.py asks of a transformers model, so
`still eval --model x.Q4_K_M.gguf`, eval recipes, lm-eval tasks and the publish check score
the quantized file with llama.cpp's own kernels, not a dequantized copy in torch:

  continuation_scores  each context is decoded once; every continuation branches off it (the
                       KV cache is cut back to the context's end before each one), and its
                       tokens' log-probabilities come from the logits llama.cpp returns.
  generate_texts       llama.cpp's sampler (greedy, or temperature/top-p with the task's seed),
                       stopped at the model's end-of-turn ids and the task's stop strings.

Token ids come from the transformers tokenizer in the file's metadata (the publish check has
proven it splits like the source's), so both backends score the same tokens. The model is
loaded on CPU unless `n_gpu_layers` is given.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from still.errors import StillError

INSTALL_HINT = (
    "install the llama.cpp runtime: `bash scripts/setup.sh dev` builds it once and caches the "
    "wheel (or pip install 'still[gguf]')"
)


def runtime(needed_for: str = "scoring a GGUF file through llama.cpp"):
    """The llama_cpp module, or a one-line error naming what needs it and how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise StillError(
            f"{needed_for} needs llama-cpp-python, which is not installed", hint=INSTALL_HINT
        ) from None
    return llama_cpp


def runtime_version() -> str | None:
    try:
        return runtime().__version__
    except StillError:
        return None


def file_hash(path: Path) -> str:
    """The cache key of a GGUF file scored by llama.cpp: its bytes and the runtime's version."""
    digest = hashlib.sha256(f"llama.cpp {runtime_version()}\n".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LlamaCppModel:
    """One GGUF file in llama.cpp, with the scorer's two entry points."""

    scores_itself = True  # eval/scorer.py hands it the requests instead of running torch

    def __init__(self, path: Path, tokenizer, *, n_ctx: int = 2048, n_gpu_layers: int = 0):
        llama_cpp = runtime()
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=max(1, len(os.sched_getaffinity(0))),
            logits_all=True,
            n_gpu_layers=n_gpu_layers,
            verbose=False,
        )
        self.n_ctx = n_ctx
        self.vocab_size = self.llm.n_vocab()

    # What the harness asks of every model around scoring: no torch parameters, no train mode.
    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        return iter(())

    # ------------------------------------------------------------------ log-likelihood
    def logits(self, ids: list[int], *, keep: int = 0) -> np.ndarray:
        """Logits after each of `ids`, decoded after the first `keep` tokens already in the
        KV cache (which must be a prefix of `ids`)."""
        self._fits(len(ids))
        self.llm.n_tokens = keep  # eval() cuts the cache back to here, then appends
        self.llm.eval(ids[keep:])
        return np.array(self.llm.scores[: len(ids), : self.vocab_size], dtype=np.float64)

    def continuation_scores(self, items, bar=None) -> list[list[tuple[float, bool]]]:
        """Summed log-probability of each continuation after its context, and whether every
        continuation token is the argmax (eval/scorer.py's `continuation_scores`)."""
        results = []
        for context, continuations in items:
            longest = max(len(c) for c in continuations)
            context = context[-max(1, self.n_ctx - longest) :]
            self.logits(context)
            row = []
            for continuation in continuations:
                logits = self.logits(context + continuation, keep=len(context))
                predicting = logits[len(context) - 1 : len(context) + len(continuation) - 1]
                logprobs = log_softmax(predicting)
                picked = logprobs[np.arange(len(continuation)), continuation]
                greedy = bool((predicting.argmax(-1) == np.array(continuation)).all())
                row.append((float(picked.sum()), greedy))
            results.append(row)
            if bar is not None:
                bar.update(1)
        return results

    # ------------------------------------------------------------------ generation
    def generate_texts(self, encoded: list[list[int]], settings, stop_ids, bar=None) -> list[str]:
        """The text generated after each encoded prompt (special tokens skipped), cut at the
        first stop string. `settings` is a task's `Generation`."""
        from eval.scorer import cut_at_stop

        texts = []
        for number, prompt in enumerate(encoded):
            self._fits(len(prompt) + 1)
            sampling = (
                {"temp": settings.temperature, "top_p": settings.top_p, "top_k": 0}
                if settings.do_sample
                else {"temp": 0.0}
            )
            self.llm.set_seed(settings.seed + number)
            self.llm.reset()
            generated: list[int] = []
            for token in self.llm.generate(prompt, min_p=0.0, repeat_penalty=1.0, **sampling):
                if token in stop_ids:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                done = settings.stop and any(stop in text for stop in settings.stop)
                if done or len(generated) >= settings.max_new_tokens:
                    break
                if len(prompt) + len(generated) >= self.n_ctx:
                    break
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            texts.append(cut_at_stop(text, settings.stop))
            if bar is not None:
                bar.update(1)
        return texts

    def _fits(self, n_tokens: int) -> None:
        if n_tokens > self.n_ctx:
            raise StillError(
                f"{self.path.name}: {n_tokens} tokens do not fit llama.cpp's context of "
                f"{self.n_ctx}",
                hint="shorten the task's prompts or few-shot examples",
            )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def load(path: Path, *, n_ctx: int = 2048):
    """(LlamaCppModel, transformers tokenizer from the file's metadata) for a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(path)
    runtime()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if not getattr(tokenizer, "chat_template", None):  # transformers' GGUF reader skips it
        tokenizer.chat_template = _metadata_string(path, "tokenizer.chat_template")
    return LlamaCppModel(path, tokenizer, n_ctx=n_ctx), tokenizer


def _metadata_string(path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return field.contents() if field is not None else None
