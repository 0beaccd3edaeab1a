"""The model card of a published model (README.md with huggingface_hub `ModelCardData`).

Metadata: license (carried from the base), base_model (when it has a hub id), tags, and the
eval results as `model-index` (task, dataset, metric, value; the bootstrap stderr and the
number of scored rows go in each metric's `args`). Body: how to run it (transformers and
llama.cpp, asked a question from the run's own data), lineage, training summary, data with
sha256, eval table with ± stderr against the base and the teacher, verification numbers,
intended use and limits, and the recipe. Models, runs, recipes and data are named as
`publish.portable` says (hub id, `builtin:NAME`, a path relative to the project, a data file's
basename and sha256), never by an absolute path.

Every function takes the `publish.flow.Publication` being built (`result`); the card reads
it and the source run dir, and writes nothing but the text it returns.
"""

from __future__ import annotations

import json
from pathlib import Path

from publish.lineage import base_of, hub_id_of, license_of, lineage_chain
from publish.portable import data_files
from still.fsutil import file_sha256
from still.rundir import RunDir

TASK_TYPES = {
    "generate": "text-generation",
    "multiple_choice": "multiple-choice",
    "perplexity": "text-generation",
}
LOGGED = ("step", "loss", "eval_loss")  # the last values of these go in the training summary


def build_card(result):
    from huggingface_hub import ModelCard, ModelCardData

    lineage = result.lineage
    base = base_of(lineage)
    license_id = license_of(lineage)
    tags = ["still", "distillation" if lineage.get("kind") == "distill" else "fine-tuned"]
    if lineage.get("method") in ("lora", "dora", "qlora"):
        tags.append(lineage["method"])
    if result.gguf:
        tags.append("gguf")
    hub_datasets = [d["hf"] for d in lineage.get("data", []) if d.get("hf")]
    data = ModelCardData(
        model_name=result.out.name,
        license=license_id or "other",
        base_model=hub_id_of(base),
        datasets=hub_datasets or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        eval_results=eval_results(result) or None,
    )
    shown_base = result.project.name(base)  # how the card names it: never an absolute path
    sections = [
        f"# {result.out.name}\n\n{_summary(result, shown_base)}",
        _usage(result),
        _lineage_section(result),
        _training_section(result),
        _data_section(data_files(lineage.get("data", []))),
        _eval_section(result),
        _regression_section(result),
        _verification_section(result),
        _gguf_section(result),
        _limits_section(result, shown_base, license_id),
        _recipe_section(result),
    ]
    body = "\n\n".join(s for s in sections if s)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


# --------------------------------------------------------------------------- model-index
def eval_results(result) -> list:
    from huggingface_hub import EvalResult

    rows = []
    for summary in result.evals:
        info = task_info(result, summary["task"])
        for metric, value in summary["metrics"].items():
            rows.append(
                EvalResult(
                    task_type=TASK_TYPES.get(info.get("type"), "text-generation"),
                    task_name=summary["task"],
                    dataset_type=info.get("dataset") or summary["task"],
                    dataset_name=summary["task"],
                    dataset_revision=info.get("sha256"),
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=round(value["mean"], 6),
                    metric_args={
                        "stderr": round(value["stderr"], 6),
                        "n": summary["n"],
                        "limit": summary.get("limit"),
                    },
                )
            )
    return rows


def task_info(result, task_name: str) -> dict:
    from eval.lm_eval_tasks import is_lm_eval_task
    from eval.tasks import load_task

    for path in result.tasks:
        if is_lm_eval_task(path):
            if Path(path.removeprefix("lm_eval:")).stem == task_name or path.endswith(task_name):
                return {"type": "lm-eval", "dataset": task_name, "sha256": None, "path": None}
            continue
        task = load_task(path)
        if task.name == task_name:
            data_path = getattr(task.data, "path", None)
            sha = file_sha256(Path(data_path)) if data_path and Path(data_path).is_file() else None
            file_name = Path(data_path).name if data_path else None
            dataset = getattr(task.data, "hf", None) or file_name
            return {"type": task.type, "dataset": dataset, "sha256": sha, "path": data_path}
    return {}


# --------------------------------------------------------------------------- body
def _summary(result, base) -> str:
    lineage = result.lineage
    if lineage.get("kind") == "distill":
        carved = lineage.get("carved") or {}
        made = f"distilled from the teacher `{result.project.name(lineage.get('teacher'))}`"
        if carved:
            made += (
                f" into a student carved from it ({len(carved.get('kept_layers', []))} "
                f"layers, {carved.get('param_fraction', 0):.1%} of its parameters)"
            )
    else:
        made = f"fine-tuned ({lineage.get('method')}) from `{base}`"
    merged = " with the adapter merged" if result.merge.get("merged") else ""
    gguf = ", plus GGUF files for llama.cpp" if result.gguf else ""
    return (
        f"A small model {made}, with the `still` recipe `{lineage.get('name')}`. "
        f"Weights are {result.dtype} safetensors{merged}{gguf}."
    )


def _usage(result) -> str:
    name = result.hub or result.out.name
    # the question is the run's own (its first eval or train prompt), so the example shows
    # the kind of input the model was made for; json.dumps quotes it as a Python literal
    message = json.dumps({"role": "user", "content": result.samples.prompts[0]}, ensure_ascii=False)
    text = (
        "## How to use\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
        f"messages = [{message}]\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
        'return_tensors="pt", return_dict=True)\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))\n```"
    )
    for report in result.gguf:
        text += (
            f"\n\n```bash\nllama-cli -m {report['file']} -cnv   # {report['type']}, "
            f"{report['bytes'] / 1e6:.1f} MB\n```"
        )
    return text


def _lineage_section(result) -> str:
    rows = ["## Lineage", "", "| step | model | how |", "|---|---|---|"]
    for link in lineage_chain(result):
        published = "adapter merged in fp32" if link.get("merged") else "full weights"
        if link.get("gguf"):
            published += f"; GGUF: {', '.join(link['gguf'])}"
        how = {
            "base": link.get("hub_id") or "",
            "teacher": f"{link.get('kind') or ''} {link.get('method') or ''}".strip(),
            "student": f"distill, {link.get('method')}",
            "fine-tuned": f"finetune, {link.get('method')}",
            "published": published,
        }[link["role"]]
        rows.append(f"| {link['role']} | `{link.get('ref')}` | {how} |")
    rows.append("\nThe whole chain, with hashes, is in `lineage.json`.")
    return "\n".join(rows)


def _training_section(result) -> str:
    lineage, train = result.lineage, result.recipe.get("train", {})
    commit = f", git commit `{lineage['git_commit']}`" if lineage.get("git_commit") else ""
    lines = [
        "## Training",
        "",
        (
            f"- recipe kind `{lineage.get('kind')}`, method `{lineage.get('method')}`, "
            f"recipe sha256 `{lineage.get('recipe_sha256')}`{commit}"
        ),
    ]
    if train:
        lines.append(
            f"- lr {train.get('lr')}, batch size {train.get('batch_size')} × grad accum "
            f"{train.get('grad_accum', 1)}, max steps {train.get('max_steps')}, "
            f"seed {train.get('seed')}"
        )
    if result.recipe.get("distill"):
        d = result.recipe["distill"]
        lines.append(
            f"- distillation loss `{d.get('loss')}`, T={d.get('temperature')}, "
            f"kd weight {d.get('kd_weight')}, ce weight {d.get('ce_weight')}"
        )
    metrics = _last_metrics(RunDir(result.run_dir))
    for key in LOGGED:
        if key in metrics:
            value = metrics[key]
            lines.append(
                f"- last logged {key}: {value:.4g}"
                if isinstance(value, float)
                else f"- last logged {key}: {value}"
            )
    return "\n".join(lines)


def _last_metrics(run: RunDir) -> dict:
    last = {}
    for row in run.metrics():
        last.update({k: v for k, v in row.items() if k in LOGGED})
    return last


def _data_section(files: list[dict]) -> str:
    if not files:
        return ""
    rows = ["## Training data", "", "| source | sha256 |", "|---|---|"]
    for entry in files:
        source = entry.get("file") or (
            f"{entry.get('hf')} ({entry.get('subset') or 'default'}, {entry.get('split')})"
        )
        rows.append(f"| `{source}` | `{entry.get('sha256', 'hub dataset')}` |")
    return "\n".join(rows)


def _eval_section(result) -> str:
    if not result.evals:
        return (
            "## Evaluation\n\nNot evaluated at publish time (the recipe names no `eval_tasks`, "
            "or `--no-eval`)."
        )
    roles = [r for r in ("base", "teacher") if r in result.comparisons]
    header = "| task | metric | n | this model |" + "".join(f" {role} |" for role in roles)
    rows = ["## Evaluation", "", header, "|" + "---|" * (4 + len(roles))]
    for summary in result.evals:
        for metric, value in summary["metrics"].items():
            cells = [f"{value['mean']:.4f} ± {value['stderr']:.4f}"]
            for role in roles:
                cells.append(
                    _compared_cell(result.comparisons[role], summary["task"], metric, value["mean"])
                )
            rows.append(
                f"| {summary['task']} | {metric} | {summary['n']} | " + " | ".join(cells) + " |"
            )
    limit = (
        f"the first {result.eval_limit} rows of each task (`--quick`)"
        if result.eval_limit
        else "the rows each task YAML selects (its `limit`, if any)"
    )
    rows.append(
        f"\n± is the bootstrap standard error. Scored by `still eval` on the published "
        f"weights, {limit}; per-question outputs are in `eval/`."
    )
    return "\n".join(rows)


def _regression_section(result) -> str:
    """The forgetting check the training run made (regression_tasks), as it recorded it."""
    from eval.regression import markdown_table

    report = RunDir(result.run_dir).read_regression()
    if not report or not report.get("rows"):
        return ""
    verdict = (
        f"Flagged (a drop beyond {report['tolerance']:g}): {'; '.join(report['flagged'])}."
        if report.get("flagged")
        else f"No drop beyond the tolerance of {report['tolerance']:g}."
    )
    base = result.project.name(report.get("base", "base"))
    return (
        "## Forgetting check\n\nScored at the end of training on tasks it was not trained "
        f"for, base ({base}) against this model, with 95% paired "
        f"bootstrap CIs over the same questions. {verdict}\n\n{markdown_table(report)}"
    )


def _compared_cell(summaries: list[dict], task: str, metric: str, ours: float) -> str:
    other = next((s for s in summaries if s["task"] == task), None)
    if not other or metric not in other["metrics"]:
        return "—"
    theirs = other["metrics"][metric]
    return f"{theirs['mean']:.4f} ± {theirs['stderr']:.4f} (Δ {ours - theirs['mean']:+.4f})"


def _verification_section(result) -> str:
    lines = ["## Verification", ""]
    merge = result.merge
    if merge.get("merged"):
        lines.append(
            f"- merge: in fp32, the merged model's logits equal the adapter model's on "
            f"{merge['tokens']} tokens: max |Δ| {merge['max_abs_logit_diff']:.2e} "
            f"(tolerance {merge['tolerance']:.1e})"
        )
    else:
        lines.append("- merge: none needed (the run saved full weights)")
    if result.dtype != "fp32":
        lines.append(f"- the safetensors were cast from fp32 to {result.dtype} after every check")
    for g in result.gguf:
        exact = (
            f"equal to the source with {g['type']} rounding (max |Δ| "
            f"{g['exact_max_abs_diff']:.1e}); "
            if g["exact_max_abs_diff"] is not None
            else f"quantized by llama.cpp ({g['type']}); "
        )
        lines.append(
            f"- `{g['file']}` loaded back with transformers: {exact}vs fp32: rms Δlogit "
            f"{g['rms_relative_diff']:.4f} of the logits' std (tolerance {g['tolerance']}), "
            f"max |Δ| {g['max_abs_diff']:.3f}, top-1 agreement {g['top1_agreement']:.1%}, "
            f"mean KL {g['mean_kl']:.2e} over {g['tokens']} tokens"
        )
        if "llama_cpp" in g:
            run = g["llama_cpp"]
            lines.append(
                f"- `{g['file']}` run in {run['runtime']}: same tokens as the source; per token "
                f"vs fp32: mean KL {run['mean_kl']:.2e}, mean |Δ log p| "
                f"{run['mean_abs_logprob_diff']:.4f}, top-1 agreement {run['top1_agreement']:.1%} "
                f"(tolerance KL ≤ {run['tolerance']['mean_kl']}, top-1 ≥ "
                f"{run['tolerance']['top1_agreement']:.0%}); greedy text agrees for "
                f"{run['greedy_agreement']:.0%} of its first tokens"
            )
    return "\n".join(lines)


def _gguf_section(result) -> str:
    """The on-device table: every GGUF file next to fp32, all measured in llama.cpp."""
    if not result.gguf_fp32 or not all("table" in g for g in result.gguf):
        return ""
    from publish.gguf_table import markdown

    rows = [result.gguf_fp32] + [g["table"] for g in result.gguf]
    return (
        "## On-device: GGUF in llama.cpp\n\n"
        "Each file measured in llama.cpp on the publishing machine's CPU (fp32: an f32 GGUF of "
        "the same weights); perplexity on the run's held-out texts; task scores through "
        "llama.cpp with Δ vs the fp32 model paired by question, 95% bootstrap CI (* when it "
        "excludes 0).\n\n" + markdown(rows)
    )


def _limits_section(result, base, license_id) -> str:
    task_names = ", ".join(s["task"] for s in result.evals) or "the tasks in its recipe"
    license_line = (
        f"License `{license_id}`, carried from the base model `{base}`; its terms apply."
        if license_id
        else f"The license of the base `{base}` could not be determined: check it before use."
    )
    return (
        "## Intended use and limits\n\n"
        f"A small domain model for the data it was trained on, measured on {task_names}. It "
        "inherits the biases and failure modes of its base model and, when distilled, of its "
        "teacher; small models state wrong facts fluently, so check its answers before relying "
        "on them. Not evaluated for safety, for other languages or for other domains.\n\n"
        f"{license_line}"
    )


def _recipe_section(result) -> str:
    project = result.project
    source = project.name(RunDir(result.run_dir).recipe_source())
    command = f"still run {source}" if source else "still run RECIPE"
    text = f"## Recipe\n\nTrained with `{command}`"
    if result.command:
        text += f" and published with `{project.command(result.command)}`"
    return (
        text + ". The resolved recipe (also in `recipe.yaml`):\n\n"
        f"```yaml\n{project.recipe_text(result.recipe_text).strip()}\n```"
    )
