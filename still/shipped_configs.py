"""The real config.json dimensions of the catalog's models (recipes/catalog/), shipped as small
JSON files in `still/configs/` (no weights), so that `still check` can estimate a recipe at its
real size on a machine that has never downloaded the model.

Each file is named after the hub id (`Qwen/Qwen3-8B` → `Qwen--Qwen3-8B.json`) and holds the
fields of that model's published config.json that shape the network, plus `_source`, the page
it was read from. tests/unit/test_shipped_configs.py builds each on the meta device and checks
its parameter count against the published one.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")


def _file_for(ref: str) -> Path:
    return CONFIG_DIR / (ref.strip().replace("/", "--") + ".json")


def shipped_refs() -> list[str]:
    """Every hub id with a shipped config."""
    return sorted(path.stem.replace("--", "/", 1) for path in CONFIG_DIR.glob("*.json"))


def has_shipped_config(ref: str | None) -> bool:
    return bool(ref) and ref.count("/") == 1 and _file_for(ref).is_file()


def shipped_config(ref: str):
    """The transformers config of `ref` built from its shipped JSON; None if none is shipped."""
    if not has_shipped_config(ref):
        return None
    from transformers import AutoConfig

    fields = json.loads(_file_for(ref).read_text(encoding="utf-8"))
    fields.pop("_source", None)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
