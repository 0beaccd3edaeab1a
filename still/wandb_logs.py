"""W&B logging beyond a training run: an eval's per-task metrics and sample tables, a
comparison's table and chart, and, after `wandb sync`, the lineage edges an offline run could
not record (`still link`). Runs are opened and closed by `still.tracking`; every failure here
is one warning, never a stopped run.
"""

from __future__ import annotations

import json
from pathlib import Path

from still.errors import StillError
from still.rundir import RunDir
from still.sections import WandbSection
from still.tracking import (
    finish_wandb,
    lineage_parents,
    open_wandb,
    recorded_wandb_settings,
    use_artifacts,
    wandb_mode,
    warn,
)


# --------------------------------------------------------------------------- eval + compare
def log_eval_task(summary: dict, samples_path: Path, *, model_name: str | None = None) -> None:
    """Per-task summary metrics and a table of per-sample predictions, into the active run."""
    import wandb

    if wandb.run is None:
        return
    try:
        task = summary["task"]
        values = {f"eval/{task}/n": summary.get("n")}
        for metric, score in summary["metrics"].items():
            values[f"eval/{task}/{metric}"] = score["mean"]
            values[f"eval/{task}/{metric}_stderr"] = score["stderr"]
        wandb.run.summary.update(values)
        wandb.run.log({f"eval/{task}/samples": samples_table(samples_path, model_name)})
    except Exception as exc:  # noqa: BLE001
        warn("eval logging", exc)


def samples_table(samples_path: Path, model_name: str | None = None):
    """`<task>.samples.jsonl` as a wandb.Table: one row per question, one column per metric."""
    import wandb

    rows = [
        json.loads(line)
        for line in Path(samples_path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    fields = list(dict.fromkeys(key for row in rows for key in row if key != "metrics"))
    metrics = list(dict.fromkeys(name for row in rows for name in row.get("metrics", {})))
    columns = ["model", *fields, *metrics]
    data = []
    for row in rows:
        cells = [_cell(row.get(key)) for key in fields] + [
            row.get("metrics", {}).get(name) for name in metrics
        ]
        data.append([model_name, *cells])
    return wandb.Table(columns=columns, data=data)


def _cell(value):
    return (
        value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)
    )


def log_comparison(out_dir: Path) -> None:
    """compare.json as a table and compare.png as an image, into the active run."""
    import wandb

    if wandb.run is None:
        return
    try:
        comparison = json.loads((Path(out_dir) / "compare.json").read_text(encoding="utf-8"))
        table = wandb.Table(columns=comparison["columns"], data=comparison["rows"])
        logged = {"compare/table": table}
        if (Path(out_dir) / "compare.png").is_file():
            logged["compare/plot"] = wandb.Image(str(Path(out_dir) / "compare.png"))
        wandb.run.log(logged)
        wandb.run.summary.update({"compare/reference": comparison.get("reference")})
    except Exception as exc:  # noqa: BLE001
        warn("comparison logging", exc)


def log_cascade(out_dir: Path) -> None:
    """cascade.json as a table (one row per task × signal) and the two PNGs, into the active
    run, like `log_comparison`."""
    import wandb

    if wandb.run is None:
        return
    try:
        report = json.loads((Path(out_dir) / "cascade.json").read_text(encoding="utf-8"))
        columns = ["task", "signal", "auroc", "ece", "test_deferral", "test_quality", "share"]
        rows = [
            [
                task["task"],
                name,
                signal["auroc"],
                signal["ece"],
                signal["test"]["deferral"]["value"],
                signal["test"]["quality"]["value"],
                signal["test"]["share_of_teacher"]["value"],
            ]
            for task in report["tasks"]
            for name, signal in task["signals"].items()
        ]
        logged = {"cascade/table": wandb.Table(columns=columns, data=rows)}
        for image in ("cascade.png", "cascade-reliability.png"):
            if (Path(out_dir) / image).is_file():
                logged[f"cascade/{image.removesuffix('.png')}"] = wandb.Image(
                    str(Path(out_dir) / image)
                )
        wandb.run.log(logged)
        wandb.run.summary.update({"cascade/signal": report["serve"]["signal"]})
    except Exception as exc:  # noqa: BLE001
        warn("cascade logging", exc)


def log_comparison_run(out_dir: Path, *, project: str, group: str | None = None, inputs=()) -> None:
    """`still compare --wandb PROJECT`: a comparison run holding compare.json and compare.png."""
    settings = WandbSection(project=project, group=group)
    run = open_wandb(
        settings,
        out_dir,
        job_type="compare",
        name=Path(out_dir).resolve().name,
        group=group,
        config={"inputs": [str(Path(path).resolve()) for path in inputs]},
    )
    if run is not None:
        log_comparison(out_dir)
        finish_wandb()


# --------------------------------------------------------------------------- after `wandb sync`
def link_lineage(run_dir: Path) -> list[str]:
    """Online, after `wandb sync`: mark the run's parent model artifacts as used by it."""
    import wandb

    run = RunDir(run_dir)
    run_id = run.tracker_run_id()
    if run_id is None or not run.lineage_file.is_file():
        raise StillError(
            f"{run_dir}: not a W&B-tracked still run dir "
            f"(no {run.tracker_run_id_file.name} or {run.lineage_file.name})"
        )
    if wandb_mode("auto") != "online":
        raise StillError(
            "linking lineage needs W&B online", hint="wandb login, then run this again"
        )
    settings = recorded_wandb_settings(run)
    parents = lineage_parents(run.read_lineage())
    online = wandb.init(
        project=settings.get("project", "still"),
        entity=settings.get("entity"),
        id=run_id,
        resume="must",
        mode="online",
    )
    use_artifacts(online, parents)
    online.finish()
    return parents
