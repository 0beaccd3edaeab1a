"""publish.portable: how a published dir names models, runs, recipes and data files."""

import yaml

from publish.portable import Project, data_files


def test_names_hub_ids_builtins_and_paths_inside_and_outside_the_project(tmp_path):
    project = Project.of_run(tmp_path / "proj" / "runs" / "student")
    assert project.root == (tmp_path / "proj").resolve()
    name = project.name
    assert name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert name("builtin:smollm2-135m-instruct") == "builtin:smollm2-135m-instruct"
    assert name("runs/teacher") == "runs/teacher"  # already relative: as the recipe wrote it
    assert name(str(tmp_path / "proj" / "runs" / "teacher")) == "runs/teacher"
    assert name(str(tmp_path / "proj" / "recipes" / ".." / "base")) == "base"
    assert name(str(tmp_path / "proj")) == "."
    assert name(str(tmp_path / "elsewhere" / "tiny-llama")) == "tiny-llama"
    assert name("/home/me/.cache/still/builtins/smollm2-q4") == "smollm2-q4"
    cached = "/home/me/.cache/huggingface/hub/models--google--gemma-3-270m/snapshots/ab12"
    assert name(cached) == "google/gemma-3-270m"
    assert name(None) is None and name(3) == 3 and name("adapter/ merged") == "adapter/ merged"


def test_a_run_dir_under_the_filesystem_root_names_every_path_alone():
    project = Project.of_run("/runs/x")  # its grandparent is "/": no project to name from
    assert project.name("/work/models/tiny") == "tiny"


def test_data_files_are_a_basename_and_a_sha256_and_hub_datasets_stay():
    entries = [
        {"path": "/tmp/abc/data/train.jsonl", "sha256": "f00"},
        {"hf": "org/set", "subset": None, "split": "train"},
    ]
    assert data_files(entries) == [
        {"file": "train.jsonl", "sha256": "f00"},
        {"hf": "org/set", "subset": None, "split": "train"},
    ]


def test_lineage_recipe_and_command_lose_every_absolute_path(tmp_path):
    root = tmp_path / "proj"
    project = Project.of_run(root / "runs" / "student")
    lineage = {
        "teacher": str(root / "runs" / "teacher"),
        "data": [{"path": "/data/t.jsonl", "sha256": "f00"}],
        "cross_tokenizer": {"teacher_tokenizer": str(tmp_path / "tok")},
        "carved": {"kept_layers": [0, 3]},
        "base": "/gone/My Models/tiny",  # a model field: named even when it is gone
    }
    assert project.lineage(lineage) == {
        "teacher": "runs/teacher",
        "data": [{"file": "t.jsonl", "sha256": "f00"}],
        "cross_tokenizer": {"teacher_tokenizer": "tok"},
        "carved": {"kept_layers": [0, 3]},
        "base": "tiny",
    }
    recipe = f"# Resolved from {root / 'recipes' / 'student.yaml'}\n" + yaml.safe_dump(
        {
            "kind": "distill",
            "teacher": {"ref": "runs/teacher"},
            "data": {"train": {"path": str(root / "data" / "t.jsonl")}},
            "eval_tasks": ["/elsewhere/tasks/qa.yaml"],
            "system_prompt": "/no_think",
        },
        sort_keys=False,
    )
    text = project.recipe_text(recipe)
    assert text.startswith("# Resolved from recipes/student.yaml\n# Published copy: ")
    assert yaml.safe_load(text) == {
        "kind": "distill",
        "teacher": {"ref": "runs/teacher"},
        "data": {"train": {"path": "data/t.jsonl"}},
        "eval_tasks": ["qa.yaml"],
        "system_prompt": "/no_think",  # Qwen3's switch is text, not a path
    }
    command = f"still publish {root}/runs/student --out 'my out' --task={root}/qa.yaml --quick"
    assert project.command(command) == (
        "still publish runs/student --out 'my out' --task=qa.yaml --quick"
    )
