"""`still merge RUN --out DIR`: fold a LoRA adapter into its base, reloaded at full precision.

Merging into a quantized or half-precision base would bake rounding into the weights, so the
base is always loaded in fp32 here, and the merged model's logits are checked against the
adapter model's (`still.publish.merged_model`). The result is written to a temp dir and renamed
into place, so an interrupted merge leaves nothing half-written. `still publish` does this and
more (eval, model card, GGUF, hub).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from still import models
from still.errors import StillError


def merge_run(ref: str, out: Path, *, force: bool = False) -> Path:
    from still.publish import merged_model, save_model

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise StillError(f"output dir {out} already exists", hint="add --force to replace it")
    resolved = models.resolve(ref)
    if resolved.adapter is None:
        raise StillError(f"{ref} has no LoRA adapter to merge", hint="it is already a full model")
    merged, tokenizer, report = merged_model(Path(ref))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_model(merged, tokenizer, staging, name=out.name)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"still: merged {ref} into {out} (max |Δlogit| vs the adapter model {report['max_abs_logit_diff']:.2g})")
    return out
