"""Shared, built-once ground for the family tests: each family's tokenizer and its saved twin.

The twins (tests/families.py) are built in the tests, never downloaded; a session builds each
family's at most once, whichever test asks first.
"""

import pytest
from families import build_tokenizer, save_twin


@pytest.fixture(scope="session")
def family_tokenizer():
    """family name -> its tokenizer (built once per session; do not modify it)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_tokenizer(name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def twin_dir(tmp_path_factory):
    """family name -> an HF dir with the family's tiny model, tokenizer and generation config."""
    saved = {}

    def get(name: str):
        if name not in saved:
            saved[name] = save_twin(name, tmp_path_factory.mktemp(f"twin-{name}"))
        return saved[name]

    return get


# A chat conversation per row: system, then two user/assistant turns (a Mistral template moves
# the system prompt into the last [INST]; Qwen3 renders earlier answers without <think>).
QA_PAIRS = [
    ("What does abs do?", "Return the absolute value of a number."),
    ("What does len do?", "Return the number of items in a container."),
    ("What does min do?", "Return the smallest item of an iterable."),
    ("What does max do?", "Return the largest item of an iterable."),
    ("What does sorted do?", "Return a new sorted list from the items."),
    ("What does repr do?", "Return the canonical string of the object."),
    ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
    ("What does os.path.join do?", "Join two or more pathname components."),
]


def chat_rows() -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(QA_PAIRS):
        follow_up, follow_answer = QA_PAIRS[(i + 3) % len(QA_PAIRS)]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": follow_up},
                    {"role": "assistant", "content": follow_answer},
                ]
            }
        )
    return rows


def write_recipe(directory, name: str, method: str, model_ref, extra: str = "") -> str:
    """A finetune recipe for a family twin on the chat rows in `directory`; runs under
    directory/runs. LoRA dropout 0: PEFT adapts a MoE's fused experts without dropout."""
    lora = "" if method == "full" else "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
    text = (
        f"# Run: still run {name}-{method}.yaml\n"
        f"kind: finetune\nname: {name}-{method}\noutput_dir: {directory / 'runs'}\n"
        f'model: {{ref: "{model_ref}"}}\nmethod: {method}\n{lora}'
        "data:\n  train: {path: chat.jsonl, format: chat}\n  max_len: 160\n"
        "train: {lr: 1.0e-2, batch_size: 4, max_steps: 3, save_steps: 100, warmup_ratio: 0.0, "
        "gradient_checkpointing: false, "
        "seed: 3}\n" + extra
    )
    path = directory / f"{name}-{method}.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory, twin_dir):
    """(name, method) -> the run dir of a 3-step finetune of that twin through `still run`
    (trained once per session, shared by the finetune and merge tests)."""
    import json

    from still import cli

    directory = tmp_path_factory.mktemp("family-runs")
    (directory / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    runs = {}

    def get(name: str, method: str = "lora"):
        if (name, method) not in runs:
            recipe = write_recipe(directory, name, method, twin_dir(name))
            assert cli.main(["run", recipe]) == 0, (name, method)
            runs[name, method] = directory / "runs" / f"{name}-{method}"
        return runs[name, method]

    get.directory = directory
    return get
