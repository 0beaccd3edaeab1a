"""The cascade report on disk: cascade.json (every number, and what `still serve` reads),
cascade.md (the tables), cascade.png (quality vs deferral on test) and
cascade-reliability.png (each signal's calibrated confidence against the student's accuracy).
Everything is rendered first and written whole, so a failed run leaves no half report."""

from __future__ import annotations

import io
import math
from pathlib import Path

from eval.cascade import SIGNALS
from still.fsutil import atomic_write_bytes, atomic_write_json


def write_report(out_dir: Path, student: str, teacher: str, tasks: list[dict], serve=None) -> dict:
    """Write the four files for the analysed `tasks`; returns the cascade.json content.
    `serve` (model references and the generation settings of each task, by task name) makes
    the `serve` section `still serve` reads: the first generate task's winning signal."""
    out_dir = Path(out_dir)
    report = {"student": student, "teacher": teacher, "serve": None, "tasks": tasks}
    generated = [task for task in tasks if task["type"] == "generate"]
    if serve is not None and generated:
        task = generated[0]
        report["serve"] = {
            "student": serve["student"],
            "teacher": serve["teacher"],
            "task": task["task"],
            "signal": task["winner"],
            "direction": SIGNALS[task["winner"]][0],
            # defer when direction × signal < threshold; null: defer every request
            "threshold": task["signals"][task["winner"]]["calibration"]["threshold"],
            **serve["generation"][task["task"]],
        }
    report = _jsonable(report)
    rendered = {
        "cascade.md": markdown(report).encode("utf-8"),
        "cascade.png": _curve_png(tasks),
        "cascade-reliability.png": _reliability_png(tasks),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in rendered.items():
        atomic_write_bytes(out_dir / name, data)
    atomic_write_json(out_dir / "cascade.json", report)  # last: its presence means complete
    return report


def _jsonable(value):
    """Non-finite numbers as null (an infinite threshold: defer every question)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _number(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _with_ci(entry: dict) -> str:
    """`value [low, high]`; "—" where it has no value (a share of a teacher scoring 0)."""
    low, high = entry["ci"]
    if None in (entry["value"], low, high):
        return "—"
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def markdown(report: dict) -> str:
    lines = [f"# Cascade: {report['student']} first, {report['teacher']} when unsure", ""]
    for task in report["tasks"]:
        target = ", ".join(f"{k} {v:g}" for k, v in task["target"].items())
        any_signal = next(iter(task["signals"].values()))["test"]
        lines += [
            f"## {task['task']} ({task['metric']})",
            "",
            f"{task['n_calibration']} calibration and {task['n_test']} test questions (seed "
            f"{task['seed']}, disjoint by prompt); the threshold is chosen on calibration "
            f"only, for {target}. An error is {task['metric']} < {task['correct_at']:g}. "
            f"On test the student alone scores {any_signal['student_quality']:.3f}, the "
            f"teacher alone {any_signal['teacher_quality']:.3f}.",
            "",
            "| signal | AUROC (errors) | ECE | threshold | calib. deferral | test deferral "
            "[95% CI] | test quality [95% CI] | share of teacher [95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, signal in task["signals"].items():
            mark = " **(chosen)**" if name == task["winner"] else ""
            calibration, test = signal["calibration"], signal["test"]
            reached = "" if calibration["reached"] else " (target not reached)"
            lines.append(
                f"| {name}{mark} | {_number(signal['auroc'])} | {_number(signal['ece'])} | "
                f"{_number(calibration['threshold'], 4)} | {calibration['deferral']:.3f}{reached}"
                f" | {_with_ci(test['deferral'])} | {_with_ci(test['quality'])} | "
                f"{_with_ci(test['share_of_teacher'])} |"
            )
        lines += ["", *_cost_lines(task["cost"]), ""]
    lines.append(
        "Curve: cascade.png (quality vs deferral on test; 0 is the student alone, 1 the teacher "
        "alone). Reliability: cascade-reliability.png."
    )
    return "\n".join(lines) + "\n"


def _saved(share: float) -> str:
    return f"{share:.1%} saved" if share >= 0 else f"{-share:.1%} more than the teacher alone"


def _cost_lines(cost: dict) -> list[str]:
    lines = [f"- requests the teacher never sees: {cost['teacher_never_sees']:.1%}"]
    flops = cost.get("flops_per_request")
    if flops:
        lines.append(
            f"- generation FLOPs per request (2 × parameters × answer tokens): teacher alone "
            f"{flops['teacher_only']:.3g}, cascade {flops['cascade']:.3g} "
            f"({_saved(flops['saved'])})"
        )
    seconds = cost.get("seconds_per_request")
    if seconds:
        lines.append(
            f"- seconds per request, from the measured scoring time (batch "
            f"{seconds['batch_size']}): student {seconds['student']:.3f}, teacher alone "
            f"{seconds['teacher_only']:.3f}, cascade {seconds['cascade']:.3f} "
            f"({_saved(seconds['saved'])})"
        )
    if not flops and not seconds:
        lines.append("- FLOPs and latency: not recorded in these results (scored before they were)")
    return lines


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, n_panels, figsize=(5.0 * n_panels, 4.0), squeeze=False)
    return plt, figure, axes[0]


def _png(plt, figure) -> bytes:
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    return image.getvalue()


def _curve_png(tasks: list[dict]) -> bytes:
    plt, figure, axes = _figure(len(tasks))
    for panel, task in zip(axes, tasks):
        for name, signal in task["signals"].items():
            rates, qualities = zip(*signal["curve"])
            panel.plot(rates, qualities, label=name, linewidth=2 if name == task["winner"] else 1)
        rates, qualities = zip(*task["oracle_curve"])
        panel.plot(rates, qualities, ":", color="gray", label="oracle")
        ends = [task["oracle_curve"][0], task["oracle_curve"][-1]]
        panel.plot(*zip(*ends), "--", color="lightgray", label="random")
        panel.scatter(*zip(*ends), color="black", zorder=3)
        panel.annotate("student", ends[0], textcoords="offset points", xytext=(4, -12))
        panel.annotate("teacher", ends[1], textcoords="offset points", xytext=(-40, 6))
        chosen = task["signals"][task["winner"]]["test"]
        panel.scatter(
            [chosen["deferral"]["value"]],
            [chosen["quality"]["value"]],
            marker="*",
            s=150,
            color="red",
            zorder=4,
            label=f"operating point ({task['winner']})",
        )
        panel.set_xlabel("share deferred to the teacher (test)")
        panel.set_ylabel(task["metric"])
        panel.set_title(task["task"], fontsize=10)
        panel.legend(fontsize=7)
    return _png(plt, figure)


def _reliability_png(tasks: list[dict]) -> bytes:
    plt, figure, axes = _figure(len(tasks))
    for panel, task in zip(axes, tasks):
        panel.plot([0, 1], [0, 1], "--", color="lightgray")
        for name, signal in task["signals"].items():
            bins = signal["reliability"]
            if bins:
                panel.plot([b[2] for b in bins], [b[3] for b in bins], "o-", label=name)
        panel.set_xlabel("predicted P(student correct), logistic fit on calibration")
        panel.set_ylabel("observed share correct (test)")
        panel.set_title(task["task"], fontsize=10)
        panel.legend(fontsize=7)
    return _png(plt, figure)
