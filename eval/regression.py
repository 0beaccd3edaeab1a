"""The forgetting check: what a fine-tune or distillation cost on tasks it was not trained for.

A finetune or distill recipe lists `regression_tasks` (our task YAMLs or lm-eval tasks, e.g. a
general-knowledge multiple-choice set, `lm_eval:arc_easy`). At the end of the run the base
model and the result are scored on them with the same harness and the same documents; the
base's scores come from the eval cache when an earlier run scored it (the cache is keyed by the
model's content hash). The change in every metric gets a paired bootstrap 95% CI over the same
questions, and a drop larger than `regression_tolerance` (in the metric's own units: 0.02 is two
points of accuracy) is flagged. The report is printed, written to the run dir
(`regression.json`, next to `regression/` with both models' per-question results), carried into
the run summary and the model card, and `still run --strict` exits non-zero on a flag.

The base is what the run started from: a finetune's `model.ref`; a distill's `student.ref`,
or its teacher when the student is carved from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.compare import values_by_question
from eval.metrics import paired_ci_by_question
from eval.run import evaluate_model
from still.rundir import RunDir

BASE_NAME = "base"
DEFAULT_TOLERANCE = 0.02  # two points of accuracy
FLOAT_SLACK = 1e-9  # 0.48 - 0.53 is -0.05000000000000004 in floating point
# lm-eval's perplexities and bits per byte, and our loss and perplexity: lower is better
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")


def base_reference(recipe) -> str:
    if recipe.kind == "finetune":
        return recipe.model.ref
    return recipe.student.ref or recipe.teacher.ref


def tolerance_of(recipe) -> float:
    tolerance = recipe.regression_tolerance
    return DEFAULT_TOLERANCE if tolerance is None else tolerance


def check_regression(run: RunDir, recipe) -> dict:
    """Score base and result on the recipe's regression tasks; write, print and return the
    report's headline numbers for the run summary (`regression_flagged` and each change)."""
    if not recipe.regression_tasks:
        return {}
    out = run.regression_dir
    base_ref = base_reference(recipe)
    base = evaluate_model(
        base_ref, recipe.regression_tasks, out_dir=out / BASE_NAME, name=BASE_NAME
    )
    result = evaluate_model(
        str(run.path), recipe.regression_tasks, out_dir=out / run.name, name=run.name
    )
    report = regression_report(base, result, out / BASE_NAME, out / run.name, tolerance_of(recipe))
    report["base"] = base_ref
    run.write_regression(report)
    print(format_report(report, run.name))
    headline = {"regression_flagged": len(report["flagged"])}
    for row in report["rows"]:
        headline[f"regression/{row['task']}/{row['metric']}"] = row["change"]
    return headline


def regression_report(
    base: list[dict], result: list[dict], base_dir: Path, result_dir: Path, tolerance: float
) -> dict:
    """One row per task × metric: base, result, change, its paired CI, and the flag."""
    rows, flagged = [], []
    results_by_task = {summary["task"]: summary for summary in result}
    for base_summary in base:
        task = base_summary["task"]
        base_samples = _samples(base_dir, task)
        result_samples = _samples(result_dir, task)
        for metric, score in base_summary["metrics"].items():
            after = results_by_task[task]["metrics"][metric]["mean"]
            change = after - score["mean"]
            low = high = None
            before_values = values_by_question(base_samples, metric)
            after_values = values_by_question(result_samples, metric)
            if before_values and after_values and before_values.keys() == after_values.keys():
                _, low, high = paired_ci_by_question(after_values, before_values)
            worse = -change if not _lower_is_better(metric) else change
            row = {
                "task": task,
                "metric": metric,
                "base": score["mean"],
                "result": after,
                "change": change,
                "ci95": [low, high] if low is not None else None,
                # "beyond": a drop of exactly the tolerance (0.53 -> 0.48 at 0.05) is not one
                "flagged": worse > tolerance + FLOAT_SLACK,
            }
            rows.append(row)
            if row["flagged"]:
                flagged.append(f"{task} {metric} {_signed(change)} (tolerance {tolerance:g})")
    return {"tolerance": tolerance, "rows": rows, "flagged": flagged}


def format_report(report: dict, name: str) -> str:
    lines = [f"still: forgetting check, {report.get('base', BASE_NAME)} → {name}:"]
    for row in report["rows"]:
        ci = row["ci95"]
        interval = f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else ""
        flag = "  DROP beyond tolerance" if row["flagged"] else ""
        lines.append(
            f"  {row['task']} {row['metric']}: {row['base']:.4f} → {row['result']:.4f} "
            f"({_signed(row['change'])}{interval}){flag}"
        )
    verdict = (
        f"{len(report['flagged'])} drop(s) beyond tolerance {report['tolerance']:g}"
        if report["flagged"]
        else f"no drop beyond tolerance {report['tolerance']:g}"
    )
    lines.append(f"  {verdict} (95% paired bootstrap CIs over the same questions)")
    return "\n".join(lines)


def markdown_table(report: dict) -> str:
    """The report as a markdown table, for the model card."""
    lines = [
        "| task | metric | base | this model | change [95% paired CI] | |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.get("rows", []):
        ci = row.get("ci95")
        interval = f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else ""
        flag = "drop beyond tolerance" if row.get("flagged") else ""
        lines.append(
            f"| {row['task']} | {row['metric']} | {row['base']:.4f} | {row['result']:.4f} | "
            f"{_signed(row['change'])}{interval} | {flag} |"
        )
    return "\n".join(lines)


def _samples(directory: Path, task: str) -> list[dict]:
    path = directory / f"{task}.samples.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _lower_is_better(metric: str) -> bool:
    return metric.split(",")[0].endswith(LOWER_IS_BETTER)


def _signed(value: float) -> str:
    return f"{value:+.4f}"
