"""`still merge RUN --out DIR`: fold a LoRA adapter into its base, reloaded at full precision.

Merging into a quantized or half-precision base would bake rounding into the weights, so the
base is always loaded in fp32 here. The result is written to a temp dir and renamed into
place, so an interrupted merge leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from still import models
from still.errors import StillError


def merge_run(ref: str, out: Path, *, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise StillError(f"output dir {out} already exists", hint="add --force to replace it")
    resolved = models.resolve(ref)
    if resolved.adapter is None:
        raise StillError(f"{ref} has no LoRA adapter to merge", hint="it is already a full model")
    model, tokenizer = models.load_model(ref, dtype="float32")
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"still: merged {ref} into {out}")
    return out
