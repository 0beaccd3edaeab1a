"""Every GGUF file the kit writes, run in llama.cpp itself before it ships.

Three things are checked against the fp32 transformers model the file was written from, on the
run's own held-out texts:
  1. llama.cpp loads the file and tokenizes every text into the same ids as the source;
  2. its per-token log-likelihoods: mean KL(fp32 ‖ llama.cpp) per token, the mean |Δ log p| of
     the text's own tokens, and top-1 agreement, within `TOLERANCES[type]`;
  3. it generates: greedy continuations of the first prompt from llama.cpp and from the fp32
     model, and the share of their first tokens that agree (reported; 4-bit files may part
     ways after a few tokens, so the bound on it is per type too).
The tolerances were measured on tiny random models and on SmolLM2-135M (docs/publishing.md),
and set with headroom; a file beyond them is refused with a one-line error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from still.errors import StillError

# Per type: (max mean KL per token, min top-1 agreement), about twice the worst measured on
# the quickstart student (SmolLM2 carved, 576 wide) and a tiny overfit model (docs/publishing.md):
# loose enough for a small model's honest 4-bit loss, far below a file that is not the model.
TOLERANCES = {
    "f32": (1e-3, 0.99),
    "f16": (1e-3, 0.97),
    "q8_0": (0.05, 0.85),
    "q6_k": (0.15, 0.80),
    "q5_k_m": (0.40, 0.70),
    "q4_k_m": (1.0, 0.55),
    "q4_0": (1.5, 0.40),
}
GREEDY_TOKENS = 16


def check_in_llama_cpp(path: Path, reference_model, tokenizer, texts: list[str], gguf_type: str):
    """Load `path` in llama.cpp and compare it with `reference_model` on `texts`; returns the
    numbers, or raises StillError when a tolerance fails."""
    import torch

    from eval.llama_cpp import LlamaCppModel, log_softmax, runtime_version

    path = Path(path)
    runner = LlamaCppModel(path, tokenizer)
    kl, delta, agree, total = 0.0, 0.0, 0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        theirs = runner.llm.tokenize(text.encode(), add_bos=_adds_bos(tokenizer, ids), special=True)
        if list(theirs) != list(ids):
            raise StillError(
                f"GGUF {path.name}: llama.cpp splits {text[:40]!r} differently "
                f"({list(theirs)[:12]} vs {ids[:12]})",
                hint="a tokenizer the GGUF metadata cannot describe; publish without --gguf",
            )
        with torch.inference_mode():
            reference = reference_model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        got = runner.logits(ids)
        vocab = min(reference.shape[-1], got.shape[-1])
        p_ref, p_got = log_softmax(reference[:, :vocab]), log_softmax(got[:, :vocab])
        kl += float((np.exp(p_ref) * (p_ref - p_got)).sum())
        targets = np.array(ids[1:])
        rows = np.arange(len(targets))
        delta += float(np.abs(p_ref[rows, targets] - p_got[rows, targets]).sum())
        agree += int((reference.argmax(-1) == got[:, :vocab].argmax(-1)).sum())
        total += len(ids)
    report = {
        "runtime": f"llama.cpp (llama-cpp-python {runtime_version()})",
        "mean_kl": kl / total,
        "mean_abs_logprob_diff": delta / max(1, total - len(texts)),
        "top1_agreement": agree / total,
        "greedy_agreement": _greedy_agreement(runner, reference_model, tokenizer, texts[-1]),
        "tokens": total,
        "tolerance": dict(zip(("mean_kl", "top1_agreement"), TOLERANCES[gguf_type])),
    }
    max_kl, min_agree = TOLERANCES[gguf_type]
    if not (report["mean_kl"] <= max_kl and report["top1_agreement"] >= min_agree):
        raise StillError(
            f"GGUF {path.name} in llama.cpp: mean KL {report['mean_kl']:.3g} per token "
            f"(≤ {max_kl}), top-1 agreement {report['top1_agreement']:.1%} (≥ {min_agree:.0%}) "
            "against the fp32 model",
            hint="use a wider type (q8_0 or f16) for this model",
        )
    return report


def _adds_bos(tokenizer, ids: list[int]) -> bool:
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def _greedy_agreement(runner, reference_model, tokenizer, prompt: str) -> float:
    """Share of the first GREEDY_TOKENS greedy tokens where llama.cpp and fp32 agree, up to the
    first difference (after it the two continue from different texts)."""
    import torch

    from still import models

    ids = tokenizer(prompt)["input_ids"]
    stops = set(models.stop_token_ids(reference_model, tokenizer))
    with torch.inference_mode():
        output = reference_model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=models.pad_token_id(tokenizer),
        )[0, len(ids) :].tolist()
    runner.llm.reset()
    theirs = []
    for token in runner.llm.generate(ids, temp=0.0, repeat_penalty=1.0, min_p=0.0):
        theirs.append(token)
        if token in stops or len(theirs) >= len(output):
            break
    same = 0
    for a, b in zip(output, theirs):
        if a != b:
            break
        same += 1
    return same / max(1, len(output))
