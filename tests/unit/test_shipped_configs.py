"""The shipped real configs (still/configs/) against the parameter counts their model cards and
safetensors indexes publish: a mistyped dimension moves the count, so each file is built on the
meta device and counted."""

import pytest

from still.shipped_configs import has_shipped_config, shipped_config, shipped_refs

# Published totals (model cards / the hub's safetensors parameter count), in billions, with the
# tolerance the card's rounding allows.
PUBLISHED = {
    "Qwen/Qwen3-8B": (8.19, 0.01),
    "Qwen/Qwen3-4B": (4.02, 0.01),
    "Qwen/Qwen3-1.7B": (1.72, 0.01),
    "Qwen/Qwen3-0.6B": (0.596, 0.002),  # tied embeddings counted once
    "Qwen/Qwen2.5-32B-Instruct": (32.76, 0.01),
    "meta-llama/Llama-3.1-8B-Instruct": (8.03, 0.005),
    "meta-llama/Llama-3.1-70B-Instruct": (70.55, 0.01),
    "meta-llama/Llama-3.2-1B-Instruct": (1.236, 0.002),
    "google/gemma-3-4b-it": (4.30, 0.01),  # with its SigLIP vision tower
    "google/gemma-3-1b-it": (1.000, 0.002),
    "google/gemma-3-270m-it": (0.268, 0.001),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": (1.711, 0.002),
    "HuggingFaceTB/SmolLM2-360M-Instruct": (0.362, 0.001),
}


def test_every_shipped_config_has_a_published_count():
    assert set(shipped_refs()) == set(PUBLISHED)


@pytest.mark.parametrize("ref", sorted(PUBLISHED))
def test_shipped_config_builds_the_published_parameter_count(ref):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(shipped_config(ref))
    model.tie_weights()
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    published, tolerance = PUBLISHED[ref]
    assert abs(billions - published) <= tolerance, f"{ref}: {billions:.4f}B"


def test_unknown_or_local_refs_have_no_shipped_config(tmp_path):
    assert shipped_config("Qwen/Qwen9-1B") is None
    assert not has_shipped_config(str(tmp_path / "Qwen--Qwen3-8B"))
    assert not has_shipped_config(None)
