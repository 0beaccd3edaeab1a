"""lm-evaluation-harness next to our tasks, on the tiny Llama and local lm-eval task YAMLs:
the same numbers through `still eval`, through `lm_eval --model hf` and through
`lm_eval --model still`, for multiple_choice, loglikelihood_rolling and generate_until."""

import json
import tomllib
from pathlib import Path

import pytest

from eval.lm_eval_backend import StillLM, register_lm_eval_models
from eval.lm_eval_tasks import is_lm_eval_task
from still import cli

ROOT = Path(__file__).resolve().parents[3]
LOGLIK_TOLERANCE = 1e-4

TASKS = {
    "mc": """task: tiny_mc
dataset_path: json
dataset_kwargs: {data_files: {test: data/docs.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "rolling": """task: tiny_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: data/docs.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
    "generate": """task: tiny_generate
dataset_path: json
dataset_kwargs: {data_files: {test: data/docs.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 10, do_sample: false}
metric_list: [{metric: exact_match}]
""",
}
NAMES = {"mc": "tiny_mc", "rolling": "tiny_rolling", "generate": "tiny_generate"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three lm-eval task YAMLs whose data file sits next to them (a relative data_files)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    (root / "data").mkdir()
    with (root / "data" / "docs.jsonl").open("w") as handle:
        for i in range(9):
            row = {
                "id": f"d{i}",
                # lengths vary so batches are padded; choices share word-boundary merges
                "question": f"What does json.f{i} do" + " exactly" * (i % 3) + "?",
                "choices": [f" json.f{i}", "os.path", f"re.sub{i} x y"],
                "label": i % 3,
                "text": "Serialize obj to a JSON formatted str. " * (1 + i % 4),
                "answer": f"thing {i}",
            }
            handle.write(json.dumps(row) + "\n")
    for kind, text in TASKS.items():
        (root / f"{kind}.yaml").write_text(text)
    return root


def lm_eval_run(backend: str, model_args: str, task_yaml: Path, batch_size: int = 4) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_tasks import buildable, check_lm_eval_task

    # the YAML as still reads it (data_files relative to the YAML), so both see the same docs
    spec = check_lm_eval_task(task_yaml).spec
    manager = TaskManager(include_defaults=False)
    return simple_evaluate(
        model=backend,
        model_args=model_args,
        tasks=[buildable(manager, spec)],
        task_manager=manager,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )


def by_doc(output: dict, task: str) -> list[dict]:
    return sorted(output["samples"][task], key=lambda s: int(s["doc_id"]))


def still_eval(model_dir, task: str, out: Path, *extra: str) -> list[dict]:
    assert (
        cli.main(["eval", "--model", str(model_dir), "--task", task, "--out", str(out), *extra])
        == 0
    )
    return out


def read_samples(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{task}.samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_outputs(tiny_model_dir, task_dir):
    args = f"pretrained={tiny_model_dir},dtype=float32"
    return {kind: lm_eval_run("hf", args, task_dir / f"{kind}.yaml") for kind in TASKS}


@pytest.mark.parametrize("kind", list(TASKS))
def test_still_backend_matches_hf_backend(kind, tiny_model_dir, task_dir, hf_outputs):
    """`lm_eval --model still`: every request's answer as `hf` gives it (log-likelihoods within
    1e-4, the same is_greedy flags, the same generated text), so the same metrics."""
    ours = lm_eval_run("still", f"ref={tiny_model_dir}", task_dir / f"{kind}.yaml", batch_size=3)
    name = NAMES[kind]
    for our_doc, their_doc in zip(by_doc(ours, name), by_doc(hf_outputs[kind], name), strict=True):
        for our_response, their_response in zip(our_doc["resps"], their_doc["resps"], strict=True):
            mine, theirs = our_response[0], their_response[0]
            if kind == "generate":
                assert mine == theirs
            elif kind == "rolling":
                assert abs(mine - theirs) <= LOGLIK_TOLERANCE
            else:
                assert abs(mine[0] - theirs[0]) <= LOGLIK_TOLERANCE
                assert mine[1] == theirs[1]
    for key, value in hf_outputs[kind]["results"][name].items():
        if key.split(",")[0] in ("acc", "acc_norm", "exact_match", "bits_per_byte"):
            assert ours["results"][name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("kind", list(TASKS))
def test_still_eval_runs_lm_eval_tasks_with_hf_numbers(
    kind, tiny_model_dir, task_dir, hf_outputs, tmp_path
):
    """`still eval --task TASK.yaml` on an lm-eval YAML: lm-eval's metrics, our files."""
    name = NAMES[kind]
    out = still_eval(tiny_model_dir, str(task_dir / f"{kind}.yaml"), tmp_path / "out", "--force")
    summary = json.loads((out / f"{name}.json").read_text())
    samples = read_samples(out, name)
    theirs = by_doc(hf_outputs[kind], name)
    assert summary["harness"] == "lm-eval" and summary["n"] == len(theirs) == 9
    assert [s["idx"] for s in samples] == list(range(9))
    assert [s["id"] for s in samples] == [f"d{i}" for i in range(9)]
    for metric, score in summary["metrics"].items():
        expected = hf_outputs[kind]["results"][name][f"{metric},none"]
        assert score["mean"] == pytest.approx(expected, rel=1e-5, abs=1e-6), metric
        assert score["stderr"] >= 0
    for sample, their_doc in zip(samples, theirs):
        if kind == "mc":
            their_logliks = [response[0][0] for response in their_doc["resps"]]
            assert max(abs(a - b) for a, b in zip(sample["logliks"], their_logliks)) <= 1e-4
            assert sample["metrics"]["acc"] == their_doc["acc"]
            assert sample["target"] == sample["choices"][sample["label"]].strip()
        elif kind == "rolling":
            assert abs(sample["loglik"] - their_doc["resps"][0][0]) <= LOGLIK_TOLERANCE
            assert sample["weights"]["byte_perplexity"] == their_doc["byte_perplexity"][1]
        else:
            assert sample["prediction"] == their_doc["filtered_resps"][0]
            assert sample["metrics"]["exact_match"] == their_doc["exact_match"]


def test_results_are_cached_and_compared_over_the_same_docs(
    tiny_model_dir, tiny_model_dir_4layers, task_dir, tmp_path, capsys
):
    """A second eval of the same model is a cache hit; two models' lm-eval results go through
    `still compare` with a paired CI, as our tasks' do."""
    task = f"lm_eval:{task_dir / 'mc.yaml'}"  # the prefix form takes a path too
    first = still_eval(tiny_model_dir, task, tmp_path / "a")
    capsys.readouterr()
    again = still_eval(tiny_model_dir, task, tmp_path / "a2")
    assert "(cached)" in capsys.readouterr().out
    assert read_samples(first, "tiny_mc") == read_samples(again, "tiny_mc")
    other = still_eval(tiny_model_dir_4layers, task, tmp_path / "b")
    assert cli.main(["compare", str(first), str(other), "--out", str(tmp_path / "cmp")]) == 0
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    text = json.dumps(table)
    assert "tiny_mc" in text and "acc_norm" in text
    assert "[" in (tmp_path / "cmp" / "compare.md").read_text()  # the paired CI column


GROUP = """group: tiny_group
task:
  - task: tiny_group_q
    dataset_path: json
    dataset_kwargs: {data_files: {test: data/docs.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: choices
    doc_to_target: label
    metric_list: [{metric: acc}]
  - task: tiny_group_text
    dataset_path: json
    dataset_kwargs: {data_files: {test: data/docs.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{text}}"
    doc_to_choice: choices
    doc_to_target: label
    metric_list: [{metric: acc}]
aggregate_metric_list: [{metric: acc, weight_by_size: true}]
"""


def test_a_group_writes_its_aggregate_and_pairs_over_all_its_documents(
    tiny_model_dir, tiny_model_dir_4layers, task_dir, tmp_path
):
    """A group YAML (mmlu's shape: inline tasks, data relative to it, an aggregate): one result
    per leaf and one for the group, whose mean is lm-eval's aggregate and the mean over all
    its documents, each with an id naming its leaf, so `still compare` pairs the group."""
    (task_dir / "group.yaml").write_text(GROUP)
    theirs = lm_eval_run(
        "hf", f"pretrained={tiny_model_dir},dtype=float32", task_dir / "group.yaml"
    )
    out = still_eval(tiny_model_dir, str(task_dir / "group.yaml"), tmp_path / "a")
    leaves = [read_samples(out, name) for name in ("tiny_group_q", "tiny_group_text")]
    group = json.loads((out / "tiny_group.json").read_text())
    samples = read_samples(out, "tiny_group")
    assert group["n"] == len(samples) == 18 and [s["idx"] for s in samples] == list(range(18))
    assert [s["id"] for s in samples][:2] == ["tiny_group_q/d0", "tiny_group_q/d1"]
    assert samples[9]["id"] == "tiny_group_text/d0"
    assert [s["metrics"] for s in samples] == [s["metrics"] for s in leaves[0] + leaves[1]]
    mean = sum(s["metrics"]["acc"] for s in samples) / 18
    assert group["metrics"]["acc"]["mean"] == pytest.approx(mean, abs=1e-9)
    assert mean == pytest.approx(theirs["groups"]["tiny_group"]["acc,none"], abs=1e-6)
    other = still_eval(tiny_model_dir_4layers, str(task_dir / "group.yaml"), tmp_path / "b")
    assert cli.main(["compare", str(out), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert "tiny_group" in (tmp_path / "cmp" / "compare.md").read_text()


def test_an_lm_eval_yaml_is_told_from_ours(task_dir):
    ours = ROOT / "recipes" / "tasks" / "pydocs-choice.yaml"
    assert is_lm_eval_task(task_dir / "mc.yaml") and is_lm_eval_task("lm_eval:arc_easy")
    assert not is_lm_eval_task(ours) and not is_lm_eval_task(task_dir / "missing.yaml")


def test_an_eval_recipe_lists_lm_eval_tasks_next_to_ours(tiny_model_dir, task_dir, tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "kind: eval\nname: mixed\n"
        f"output_dir: {tmp_path / 'runs'}\n"
        f"models: [{tiny_model_dir}]\n"
        f"tasks: [{task_dir / 'mc.yaml'}, {ROOT / 'recipes/tasks/pydocs-choice.yaml'}]\n"
        "limit: 3\n"
    )
    assert cli.main(["run", str(recipe)]) == 0
    results = tmp_path / "runs" / "mixed" / tiny_model_dir.name
    assert json.loads((results / "tiny_mc.json").read_text())["n"] == 3
    assert (results / "pydocs-choice.json").is_file()


def test_still_backend_is_registered_and_declared():
    """The registry resolves `still` (importing the backend registers it), and the package
    declares the lm_eval.models entry point that `register_lm_eval_models` reads when installed."""
    from lm_eval.api.registry import get_model

    register_lm_eval_models()
    assert get_model("still") is StillLM
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lm_eval.models"]["still"] == "eval.lm_eval_backend:StillLM"
    assert project["scripts"]["still-lm-eval"] == "eval.lm_eval_backend:main"
    assert any(dep.startswith("lm-eval") for dep in project["dependencies"])


def test_the_command_lines_default_cuda_device_keeps_a_cpu_model_on_cpu(tiny_model_dir):
    """lm-eval's CLI passes device=cuda unless told otherwise; without CUDA the model stays."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the model would move there")
    lm = StillLM(ref=str(tiny_model_dir), device="cuda", max_batch_size=64)
    assert next(lm.model.parameters()).device.type == "cpu"
    assert (
        lm.batch_size == 8 and StillLM(ref=str(tiny_model_dir), batch_size="auto").batch_size == 8
    )
