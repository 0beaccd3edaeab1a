"""recipes/catalog/, checked three ways for every recipe (no weights, no hub):

(a) it validates;
(b) `still check` passes with every model reference swapped for a tiny random twin of the same
    architecture (tests/families.py, matched by the real config's model_type), so the recipe's
    shape — LoRA targets, packing, the KD pair, QLoRA, ZeRO-3 — is exercised end to end;
(c) its header says how to run it, and the GPU memory and parameters it quotes are what the
    estimator prints today for the real sizes (still/configs/), so the comment cannot go stale.

A distill recipe whose teacher is the run dir of an earlier catalog recipe names the teacher's
base in its header's `still check` command (teacher.ref=...): that is what (b) and (c) use.
"""

import re
from pathlib import Path

import pytest
from families import save_twin

from still import recipe as recipe_module
from still.cli import main
from still.preflight import estimate_summary, shipped_estimate
from still.shipped_configs import shipped_config

ROOT = Path(__file__).resolve().parents[2]
CATALOG = sorted((ROOT / "recipes" / "catalog").glob("*.yaml"))
HEADER = re.compile(r"^# GPU memory: (.*) at real size: `still check (\S+)((?: \S+)*)`$")
# model_type of a real config -> the tests/families.py twin with that architecture
TWIN_FAMILY = {
    "llama": "llama3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "mistral": "mistral",
    "phi3": "phi3",
    "qwen3_moe": "qwen3_moe",
}
ROLES = {"finetune": ("model",), "distill": ("teacher", "student")}


def header(path: Path):
    """(run line, quoted summary, the `still check` recipe path, its overrides)."""
    lines = path.read_text().splitlines()
    match = HEADER.match(lines[1])
    assert match, f"{path.name}: line 2 must be '# GPU memory: ... at real size: `still check ...`'"
    return lines[0], match.group(1), match.group(2), match.group(3).split()


def real_refs(path: Path) -> dict[str, str]:
    """role -> the hub id the header's estimate is for."""
    _, _, _, overrides = header(path)
    recipe = recipe_module.load(path, overrides)
    return {role: getattr(recipe, role).ref for role in ROLES[recipe.kind]}


def test_catalog_has_the_issue_pairs():
    refs = [tuple(real_refs(path).values()) for path in CATALOG]
    for wanted in [
        ("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B"),
        ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("google/gemma-3-4b-it", "google/gemma-3-1b-it"),
        ("google/gemma-3-4b-it", "google/gemma-3-270m-it"),
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct"),
        ("Qwen/Qwen2.5-32B-Instruct",),
        ("meta-llama/Llama-3.1-70B-Instruct",),
    ]:
        assert wanted in refs, wanted


@pytest.mark.parametrize("path", CATALOG, ids=lambda p: p.name)
def test_header_quotes_the_run_command_and_todays_real_size_estimate(path):
    run, quoted, check_path, overrides = header(path)
    relative = path.relative_to(ROOT).as_posix()
    assert run.startswith("# Run: still run ") and f"still run {relative}" in run
    assert check_path == relative
    est, _ = shipped_estimate(recipe_module.load(path, overrides))
    assert quoted == estimate_summary(est), f"{path.name}: update line 2 to what still check prints"


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """family -> (teacher-sized twin dir, smaller student twin dir), built on first use."""
    built = {}

    def twin(family: str, role: str) -> str:
        if family not in built:
            root = tmp_path_factory.mktemp(f"twin-{family}")
            built[family] = tuple(
                str(save_twin(family, root / name, layers=layers, max_position_embeddings=4096))
                for name, layers in (("big", 4), ("small", 2))
            )
        return built[family][role == "student"]

    return twin


@pytest.mark.parametrize("path", CATALOG, ids=lambda p: p.name)
def test_still_check_passes_against_tiny_twins(path, twins, capsys):
    overrides = []
    for role, ref in real_refs(path).items():
        model_type = shipped_config(ref).model_type
        overrides.append(f"{role}.ref={twins(TWIN_FAMILY[model_type], role)}")
    overrides += ["data.train.limit=24", "data.eval.limit=8"]
    recipe_module.load(path, overrides)  # (a)
    assert main(["check", str(path), *overrides]) == 0  # (b)
    out = capsys.readouterr().out
    assert "still check: " in out and "memory ~" in out
    assert "real size from shipped configs" not in out  # the twins, not the shipped configs
