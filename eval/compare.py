"""Put several models' eval results side by side: one table, paired CIs, one chart.

Input: eval output dirs (each holds `<task>.json` + `<task>.samples.jsonl` for one model, as
`evaluate` writes them; a run dir whose `eval/` holds them works too). Output: `compare.md`
(the table and one line per caveat), `compare.json` (the same table with numbers, which a W&B
comparison run logs) and `compare.png` (one panel per task metric, a bar per model with its
bootstrap error bar).

The difference to the reference model is a *paired* bootstrap over the question ids both
models answered: question difficulty is shared, so pairing shows differences that two
overlapping error bars hide. Models that did not score the same questions are refused rather
than compared on different sets.
"""

from __future__ import annotations

import difflib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from eval.metrics import PAIRED_BOOTSTRAP_SAMPLES, paired_ci_by_question
from still.errors import StillError
from still.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text

LOWER_IS_BETTER = {"loss", "perplexity"}


@dataclass
class ModelResults:
    name: str
    directory: Path
    summaries: dict[str, dict] = field(default_factory=dict)  # task name -> summary
    samples: dict[str, list[dict]] = field(default_factory=dict)  # task name -> sample rows


def compare(
    results: list[Path],
    *,
    reference: str | None,
    out_dir: Path | None = None,
    teacher: str | None = None,
) -> str:
    """Write compare.md, compare.json and compare.png into `out_dir` (default: the current
    directory), print the table, return the markdown.

    `reference` and `teacher` name a model by display name or by its results path; without a
    reference the first model is the reference. Two inputs at least: a comparison of one model
    with itself is refused, not written.
    """
    loaded = [_load_results(Path(path)) for path in results]
    if len(loaded) < 2:
        given = f" (got only {results[0]})" if results else ""
        raise StillError(
            f"compare needs the eval results of at least two models{given}",
            hint="e.g. still compare runs/base runs/tuned; a single model's scores are in "
            "its eval/<task>.json",
        )
    models = _name_models(loaded)
    caveats = []
    if reference is None:
        reference_model = models[0]
        caveats.append(f"reference defaulted to the first model, {reference_model.name}")
    else:
        reference_model = _find_model(models, reference, "reference")
    teacher_model = _find_model(models, teacher, "teacher") if teacher else None

    header = [
        "task",
        "metric",
        "model",
        "score ± stderr",
        f"Δ vs {reference_model.name} [95% paired CI]",
    ]
    if teacher_model:
        header.append(f"% of {teacher_model.name}")
    table, numbers = [], []
    for task, metric in _task_metrics(models):
        for model in models:
            row = _table_row(task, metric, model, reference_model, teacher_model)
            table.append(row)
            score = model.summaries.get(task, {}).get("metrics", {}).get(metric) or {}
            numbers.append(
                [task, metric, model.name, score.get("mean"), score.get("stderr"), *row[4:]]
            )
    caveats += _caveats(models)
    caveats.append(
        f"Δ is the mean per-question difference to {reference_model.name}; "
        "its CI resamples the same "
        f"question ids for both models ({PAIRED_BOOTSTRAP_SAMPLES} paired bootstrap draws); "
        "* marks a CI that excludes 0."
    )
    if teacher_model:
        caveats.append(
            f"% of {teacher_model.name} is model score / teacher score × 100 "
            "(higher-is-better metrics only)."
        )

    markdown = _markdown_table(header, table) + "\n" + "".join(f"- {line}\n" for line in caveats)
    out_dir = Path.cwd() if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.md", markdown)
    # The same table with numbers, for trackers (a W&B comparison run logs it as a table).
    comparison = {
        "reference": reference_model.name,
        "teacher": teacher_model.name if teacher_model else None,
        "columns": ["task", "metric", "model", "mean", "stderr", *header[4:]],
        "rows": numbers,
        "caveats": caveats,
    }
    atomic_write_json(out_dir / "compare.json", comparison, indent=1)
    _plot(models, _task_metrics(models), out_dir / "compare.png")
    print(markdown)
    return markdown


# --------------------------------------------------------------------------- loading
def _load_results(path: Path) -> ModelResults:
    if not path.exists():
        raise StillError(f"{path}: no such directory", hint="give run dirs or eval result dirs")
    if not path.is_dir():
        raise StillError(
            f"{path}: not a directory",
            hint="give the run dir or eval dir that holds <task>.json, not a file in it",
        )
    directory = path
    if not any(path.glob("*.samples.jsonl")) and (path / "eval").is_dir():
        directory = path / "eval"  # a run dir: its evals live in eval/
    loaded = ModelResults(name="", directory=directory)
    for summary_path in sorted(directory.glob("*.json")):
        samples_path = summary_path.with_name(summary_path.stem + ".samples.jsonl")
        if not samples_path.is_file():
            continue
        summary = _read_json(summary_path, summary_path.read_bytes())
        if not isinstance(summary, dict) or "task" not in summary or "metrics" not in summary:
            continue
        _check_scores(summary_path, summary)
        loaded.summaries[summary["task"]] = summary
        lines = samples_path.read_bytes().splitlines()
        loaded.samples[summary["task"]] = [
            _read_json(samples_path, line, number)
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
        _check_samples(samples_path, loaded.samples[summary["task"]])
    if not loaded.summaries:
        raise StillError(
            f"{path}: no eval results here (expected <task>.json next to <task>.samples.jsonl)",
            hint="run `still eval` for this model first",
        )
    return loaded


def _read_json(path, data: bytes, line: int | None = None):
    """JSON as the harness writes it; anything else (cut short, NaN, not UTF-8) is one line."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not a JSON number")

    where = f"{path}:{line}" if line else str(path)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=refuse)
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except json.JSONDecodeError as error:
        where = where if line else f"{path}:{error.lineno}"
        problem = f"not valid JSON ({error.msg})"
    except ValueError as error:
        problem = f"not valid JSON ({error})"
    raise StillError(f"{where}: {problem}", hint="re-run `still eval --force` for this model")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_scores(path: Path, summary: dict) -> None:
    """Every metric of a summary has a finite mean and stderr (a table cannot show less)."""
    metrics = summary["metrics"]
    scores = metrics.items() if isinstance(metrics, dict) else [("metrics", metrics)]
    for metric, score in scores:
        if not isinstance(score, dict) or not all(
            map(_finite, (score.get("mean"), score.get("stderr")))
        ):
            raise StillError(
                f"{path}: metric {metric!r} has no numeric mean and stderr",
                hint="re-run `still eval --force` for this model",
            )


def _check_samples(path: Path, samples: list) -> None:
    for number, sample in enumerate(samples, start=1):
        metrics = sample.get("metrics") if isinstance(sample, dict) else None
        if not isinstance(metrics, dict) or "idx" not in sample:
            problem = "is not an object with idx and metrics"
        elif not all(map(_finite, metrics.values())):
            problem = "has a metric that is not a finite number"
        else:
            continue
        raise StillError(
            f"{path}: sample {number} {problem}",
            hint="re-run `still eval --force` for this model",
        )


def _name_models(models: list[ModelResults]) -> list[ModelResults]:
    """model_name from the summaries, else the run dir's name (runs/<name>/eval -> <name>)."""

    def directory_name(model: ModelResults) -> str:
        directory = model.directory.resolve()
        return directory.parent.name if directory.name == "eval" else directory.name

    for model in models:
        given = {s.get("model_name") for s in model.summaries.values()} - {None}
        model.name = given.pop() if len(given) == 1 else directory_name(model)
    if len({m.name for m in models}) < len(models):
        for model in models:
            model.name = directory_name(model)
    if len({m.name for m in models}) < len(models):
        for model in models:
            model.name = str(model.directory)
    directories = [m.directory.resolve() for m in models]
    for index, directory in enumerate(directories):
        if directory in directories[:index]:
            raise StillError(f"{directory} is listed twice", hint="list each model's results once")
    return models


def _find_model(models: list[ModelResults], wanted: str, role: str) -> ModelResults:
    for model in models:
        directory = model.directory.resolve()
        places = (directory, directory.parent) if directory.name == "eval" else (directory,)
        if wanted == model.name or Path(wanted).resolve() in places:
            return model
    names = [m.name for m in models]
    close = difflib.get_close_matches(wanted, names, n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    raise StillError(
        f"--{role} {wanted!r} is not among the compared models{suggestion}",
        hint=f"the models are: {', '.join(names)}",
    )


def _task_metrics(models: list[ModelResults]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for model in models:
        for task, summary in model.summaries.items():
            for metric in summary["metrics"]:
                seen[(task, metric)] = None
    return list(seen)


# --------------------------------------------------------------------------- the table
def _table_row(task, metric, model, reference, teacher) -> list[str]:
    summary = model.summaries.get(task)
    if summary is None or metric not in summary["metrics"]:
        return [task, metric, model.name, "—", "—"] + (["—"] if teacher else [])
    score = summary["metrics"][metric]
    decimals = 1 if abs(score["mean"]) >= 100 else 3
    row = [
        task,
        metric,
        model.name,
        f"{score['mean']:.{decimals}f} ± {score['stderr']:.{decimals}f}",
    ]
    if model is reference:
        row.append("(reference)")
    elif task not in reference.summaries:
        row.append("—")
    else:
        row.append(_paired_difference(task, metric, model, reference))
    if teacher:
        teacher_score = teacher.summaries.get(task, {}).get("metrics", {}).get(metric)
        if metric in LOWER_IS_BETTER or not teacher_score or teacher_score["mean"] == 0:
            row.append("—")
        else:
            row.append(f"{100 * score['mean'] / teacher_score['mean']:.1f}%")
    return row


def _paired_difference(task: str, metric: str, model: ModelResults, reference: ModelResults) -> str:
    model_values = values_by_question(model.samples[task], metric)
    reference_values = values_by_question(reference.samples[task], metric)
    if model_values is None or reference_values is None:
        return "—"  # e.g. perplexity: only the token-weighted loss has per-question values
    if model_values.keys() != reference_values.keys():
        only_model = len(model_values.keys() - reference_values.keys())
        only_reference = len(reference_values.keys() - model_values.keys())
        raise StillError(
            f"{model.name} and {reference.name} did not score the same questions on {task} "
            f"({len(model_values)} vs {len(reference_values)} questions; {only_model} only in "
            f"{model.name}, {only_reference} only in {reference.name})",
            hint="evaluate both on the same task file, data and limit",
        )
    mean, low, high = paired_ci_by_question(model_values, reference_values)
    significant = "*" if low > 0 or high < 0 else ""
    return f"{_signed(mean)} [{_signed(low)}, {_signed(high)}]{significant}"


def values_by_question(samples: list[dict], metric: str) -> dict | None:
    """Per-question values keyed by row id when every row has a unique id, else by index."""
    if not samples or any(metric not in s["metrics"] for s in samples):
        return None
    ids = [s.get("id") for s in samples]
    use_ids = None not in ids and len(set(map(str, ids))) == len(ids)
    return {(str(s["id"]) if use_ids else s["idx"]): float(s["metrics"][metric]) for s in samples}


def _caveats(models: list[ModelResults]) -> list[str]:
    lines = []
    tasks = {task for model in models for task in model.summaries}
    for task in sorted(tasks):
        having = [m for m in models if task in m.summaries]
        missing = [m.name for m in models if task not in m.summaries]
        if missing:
            lines.append(f"{task}: no results for {', '.join(missing)}")
        if len({m.summaries[task].get("task_hash") for m in having}) > 1:
            lines.append(
                f"{task}: models scored different versions of the task (spec or data differ)"
            )
        limits = {m.summaries[task].get("limit") for m in having} - {None}
        if limits:
            n = having[0].summaries[task].get("n")
            lines.append(
                f"{task}: scored on the first {min(limits)} questions only (limit), n = {n}"
            )
        if any(LOWER_IS_BETTER & set(m.summaries[task]["metrics"]) for m in having):
            lines.append(
                f"{task}: loss/perplexity are lower-is-better and comparable only between "
                "models sharing a "
                "tokenizer; the score is token-weighted, Δ averages per-question losses"
            )
    if len({s.get("harness_version") for m in models for s in m.summaries.values()}) > 1:
        lines.append("results come from different harness versions")
    return lines


def _signed(value: float) -> str:
    return f"{value:+.1f}" if abs(value) >= 100 else f"{value:+.3f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the chart
def _plot(models: list[ModelResults], task_metrics: list[tuple[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    columns = min(3, len(task_metrics))
    rows = -(-len(task_metrics) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, (task, metric) in zip(axes.flat, task_metrics):
        for position, model in enumerate(models):
            score = model.summaries.get(task, {}).get("metrics", {}).get(metric)
            if score is None:
                continue
            color = colors[position % len(colors)]
            panel.bar(position, score["mean"], yerr=score["stderr"], capsize=4, color=color)
        direction = " (lower is better)" if metric in LOWER_IS_BETTER else ""
        panel.set_title(f"{task} / {metric}{direction}", fontsize=9)
        panel.set_xticks(
            range(len(models)), [m.name for m in models], rotation=20, ha="right", fontsize=8
        )
    for panel in list(axes.flat)[len(task_metrics) :]:
        panel.set_visible(False)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, image.getvalue())
