"""Fold a LoRA adapter into its base, reloaded at full precision, and prove nothing moved.

Merging into a quantized or half-precision base would bake rounding into the weights, so the
base is always loaded in fp32 here, and the merged model's logits are checked against the
adapter model's on texts from the run's own data. `merge_run` is the `still merge RUN --out
DIR` verb; `still publish` (`publish.flow`) does this and more (eval, model card, GGUF, hub).
Output is built in a staging dir beside its target and renamed into place, so an interrupted
merge leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path

from publish.samples import Samples, run_samples
from still import models
from still.errors import StillError
from still.fsutil import staged_dir
from still.rundir import RunDir

# fp32 adapter model vs fp32 merged model: max |Δ logit| / max(1, max |logit|). Only the order
# of float operations differs (W·x + B·A·x vs (W + B·A)·x).
MERGE_TOLERANCE = 1e-4
# What `still publish --dtype` may save: its name → the torch dtype's. The merge and its check
# are fp32 whatever is saved; the cast comes last.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_texts(tokenizer, samples: Samples) -> list[str]:
    """What the merge and GGUF checks run on: the samples as plain text, and the first prompt
    through the chat template when there is one (the way the model will be asked)."""
    texts = list(samples.texts)
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": samples.prompts[0]}]
        texts.append(
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        )
    return texts


def refuse_existing_out(out: Path, force: bool) -> None:
    """An output that is a file or a dir with anything in it is kept unless `force`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise StillError(f"output dir {out} already exists", hint="add --force to replace it")


def merged_model(run_dir: Path, samples: Samples | None = None):
    """(model, tokenizer, report): the run's model in fp32, its adapter merged and checked.

    `samples` are the texts the check runs on; by default the run's own (`run_samples`)."""
    import torch

    resolved = models.resolve(str(run_dir))
    # fp32 and no quantization_config: a QLoRA adapter is merged into the full-precision base,
    # never into the 4-bit weights it was trained against.
    model, tokenizer = models.load_model(str(run_dir), dtype="float32")
    model.eval()
    if resolved.adapter is None:
        return model, tokenizer, {"merged": False, "source": "model/ (full weights)"}
    samples = samples or run_samples(RunDir(run_dir))
    texts = check_texts(tokenizer, samples)
    inputs = [torch.tensor([tokenizer(text)["input_ids"]]) for text in texts]
    with torch.inference_mode():
        before = [model(input_ids=ids).logits.float() for ids in inputs]
    merged = model.merge_and_unload()
    merged.eval()
    with torch.inference_mode():
        after = [merged(input_ids=ids).logits.float() for ids in inputs]
    diff = max((a - b).abs().max().item() for a, b in zip(before, after))
    tolerance = MERGE_TOLERANCE * max(1.0, max(a.abs().max().item() for a in before))
    report = {
        "merged": True,
        "source": "adapter/ merged into the fp32 base",
        "base_weights": resolved.weights,
        "max_abs_logit_diff": diff,
        "tolerance": tolerance,
        "tokens": sum(ids.shape[1] for ids in inputs),
    }
    if not diff <= tolerance:  # written so that a NaN fails too
        raise StillError(
            f"the merged model's logits differ from the adapter model's by {diff:.3g} "
            f"(tolerance {tolerance:.3g})",
            hint="the adapter may use a layer type PEFT cannot merge exactly",
        )
    return merged, tokenizer, report


def save_model(model, tokenizer, target: Path, *, name: str, dtype: str = "fp32") -> None:
    """Safetensors weights in `dtype` (a key of DTYPES), config (its `dtype` says which),
    generation config, tokenizer and chat template. The model is cast in place: whatever needs
    its fp32 weights (checks, GGUF) comes first."""
    import torch
    from transformers import GenerationConfig

    model.config.name_or_path = name
    generation = getattr(model, "generation_config", None) or GenerationConfig()
    # llama.cpp, Ollama and `generate` read the special ids from here, not from the tokenizer
    if generation.eos_token_id is None and tokenizer.eos_token_id is not None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        pad = tokenizer.pad_token_id
        generation.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
    if generation.bos_token_id is None:
        generation.bos_token_id = tokenizer.bos_token_id
    model.generation_config = generation
    model.to(getattr(torch, DTYPES[dtype]))
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def merge_run(ref: str, out: Path, *, force: bool = False) -> Path:
    """`still merge`: write the run's adapter merged into its fp32 base to `out`."""
    out = Path(out)
    refuse_existing_out(out, force)
    resolved = models.resolve(ref)
    if resolved.adapter is None:
        raise StillError(f"{ref} has no LoRA adapter to merge", hint="it is already a full model")
    merged, tokenizer, report = merged_model(Path(ref))
    # an empty dir already there passed the check above and is replaced like before
    with staged_dir(out, replace=force or out.exists()) as staging:
        save_model(merged, tokenizer, staging, name=out.name)
    print(
        f"still: merged {ref} into {out} "
        f"(max |Δlogit| vs the adapter model {report['max_abs_logit_diff']:.2g})"
    )
    return out
