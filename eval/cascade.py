"""Small model first, teacher when unsure: how well a student's confidence signals tell when to
defer a question to the teacher, measured on two models' samples of the same questions.

Reads top to bottom: the two models' per-question scores and the student's signals
(`eval/harness.py` records them), a seeded split of the questions into calibration and test
(disjoint by prompt, so no question is on both sides), for each signal its AUROC at ranking
the student's errors and its calibration (a logistic fit on calibration, ECE on test), the
quality-vs-deferral curve on test, the threshold that reaches the target chosen on
calibration only, what it gives on test with a bootstrap CI, and the cost saved.
`eval/cascade_report.py` writes it as cascade.json, cascade.md and the PNGs.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from still.errors import StillError

# Signal → (direction: +1 when a higher value means more confident, the task types giving it).
SIGNALS = {
    "mean_logprob": (1, ("generate",)),
    "min_logprob": (1, ("generate",)),
    "mean_entropy": (-1, ("generate",)),
    "margin": (1, ("multiple_choice",)),
    "top_prob": (1, ("multiple_choice",)),
}
BOOTSTRAP_SAMPLES = 1000
ECE_BINS = 10


# --------------------------------------------------------------------------- inputs
def signals_for(task_type: str, wanted: list[str] | None, task_name: str) -> list[str]:
    """The signals to measure on a task: all its type gives, or the named ones if it gives them."""
    given = [name for name, (_, types) in SIGNALS.items() if task_type in types]
    if not given:
        raise StillError(
            f"cascade: task {task_name} is a {task_type} task, which has no answer to defer",
            hint="a cascade needs generate or multiple_choice tasks",
        )
    for name in wanted or []:
        if name not in SIGNALS:
            raise StillError(
                f"cascade: unknown signal '{name}'", hint=f"signals: {', '.join(SIGNALS)}"
            )
        if name not in given:
            raise StillError(
                f"cascade: signal '{name}' cannot be given by {task_name}, a {task_type} task",
                hint=f"its signals: {', '.join(given)}",
            )
    return list(wanted) if wanted else given


def read_samples(result_dir: Path, task_name: str) -> tuple[dict, list[dict]]:
    """(summary, samples) of one model on one task, from an eval result dir."""
    summary_path = Path(result_dir) / f"{task_name}.json"
    samples_path = Path(result_dir) / f"{task_name}.samples.jsonl"
    if not summary_path.is_file() or not samples_path.is_file():
        raise StillError(
            f"cascade: no results for task {task_name} in {result_dir}",
            hint="score the model on the task first (still eval)",
        )
    with samples_path.open(encoding="utf-8") as lines:
        samples = [json.loads(line) for line in lines if line.strip()]
    return json.loads(summary_path.read_text(encoding="utf-8")), samples


def paired_questions(
    student: list[dict], teacher: list[dict], metric: str, signals: list[str], who: str
) -> list[dict]:
    """One record per question both models answered: prompt, both scores, student signals."""
    by_id = {_key(s): s for s in teacher}
    student_ids = {_key(s) for s in student}
    if student_ids != set(by_id):
        raise StillError(
            f"cascade: the student and the teacher answered different questions "
            f"({len(student_ids - set(by_id))} only the student's, "
            f"{len(set(by_id) - student_ids)} only the teacher's)",
            hint="score both on the same task with the same limit",
        )
    records = []
    for sample in student:
        if metric not in sample["metrics"]:
            raise StillError(
                f"cascade: metric '{metric}' is not in the samples",
                hint=f"metrics: {', '.join(sample['metrics'])}",
            )
        recorded = sample.get("signals") or {}
        missing = [name for name in signals if name not in recorded]
        if missing:
            raise StillError(
                f"cascade: {who}'s samples carry no '{missing[0]}' signal",
                hint="a GGUF file scored through llama.cpp gives no token log-probs; score the "
                "student with --backend transformers (or re-score: older results predate signals)",
            )
        records.append(
            {
                "id": _key(sample),
                "prompt": sample["prompt"],
                "student": float(sample["metrics"][metric]),
                "teacher": float(by_id[_key(sample)]["metrics"][metric]),
                "signals": {name: float(recorded[name]) for name in signals},
            }
        )
    return records


def _key(sample: dict) -> str:
    return str(sample["id"] if sample.get("id") is not None else sample["idx"])


# --------------------------------------------------------------------------- split
def split_questions(
    records: list[dict], calibration_share: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """A seeded split into (calibration, test). Questions with the same prompt go to the same
    side, so a repeated question can never be calibrated on and then tested."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["prompt"], []).append(record)
    prompts = sorted(groups)
    random.Random(seed).shuffle(prompts)
    n_calibration = round(len(prompts) * calibration_share)
    if n_calibration < 2 or len(prompts) - n_calibration < 2:
        raise StillError(
            f"cascade: {len(prompts)} distinct questions split {calibration_share:g} leaves fewer "
            "than 2 on a side",
            hint="score more questions (limit) or change cascade.calibration",
        )
    calibration = [r for p in prompts[:n_calibration] for r in groups[p]]
    test = [r for p in prompts[n_calibration:] for r in groups[p]]
    check_disjoint(calibration, test)
    return calibration, test


def check_disjoint(calibration: list[dict], test: list[dict]) -> None:
    """Refuse a calibration split that shares a question (id or prompt) with the test split."""
    for field in ("id", "prompt"):
        shared = {r[field] for r in calibration} & {r[field] for r in test}
        if shared:
            example = sorted(shared)[0][:60]
            raise StillError(
                f"cascade: the calibration split overlaps the test split ({len(shared)} "
                f"question {field}s in both, e.g. {example!r})",
                hint="calibrate on questions the test split does not hold",
            )


# --------------------------------------------------------------------------- measures
def confidence(records: list[dict], signal: str) -> np.ndarray:
    """The signal oriented so that higher means more confident."""
    direction = SIGNALS[signal][0]
    return np.array([direction * r["signals"][signal] for r in records], dtype=np.float64)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """P(a positive scores higher than a negative), ties counting half (Mann-Whitney)."""
    positive, negative = scores[positives], scores[~positives]
    if positive.size == 0 or negative.size == 0:
        return math.nan
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (positive.size * negative.size))


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 50) -> tuple[float, float]:
    """(a, b) of P(y=1) = sigmoid(a·z + b) on z = standardised x, by Newton's method with a
    small ridge so a perfectly separated calibration split still gives finite weights."""
    z = (x - x.mean()) / (x.std() or 1.0)
    weights = np.zeros(2)
    design = np.stack([z, np.ones_like(z)], axis=1)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-design @ weights))
        gradient = design.T @ (p - y) + 1e-2 * weights
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-2 * np.eye(2)
        weights -= np.linalg.solve(hessian, gradient)
    scale = x.std() or 1.0
    return float(weights[0] / scale), float(weights[1] - weights[0] * x.mean() / scale)


def predict(coefficients: tuple[float, float], x: np.ndarray) -> np.ndarray:
    a, b = coefficients
    return 1.0 / (1.0 + np.exp(-(a * x + b)))


def reliability(probabilities: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS):
    """(ECE, bins as [low, high, mean predicted, observed accuracy, count])."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for number in range(bins):
        low, high = edges[number], edges[number + 1]
        inside = (probabilities >= low) & (
            (probabilities < high) if number < bins - 1 else (probabilities <= high)
        )
        if not inside.any():
            continue
        predicted, observed = probabilities[inside].mean(), correct[inside].mean()
        ece += inside.mean() * abs(predicted - observed)
        table.append([low, high, float(predicted), float(observed), int(inside.sum())])
    return float(ece), table


def cascade_quality(
    conf: np.ndarray, student: np.ndarray, teacher: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(deferral rate, mean quality) when every question with confidence < threshold goes to
    the teacher."""
    deferred = conf < threshold
    return float(deferred.mean()), float(np.where(deferred, teacher, student).mean())


def deferral_curve(conf: np.ndarray, student: np.ndarray, teacher: np.ndarray) -> list[list]:
    """[deferral rate, quality] deferring the k least confident, k = 0 (the student alone) …
    n (the teacher alone)."""
    order = np.argsort(conf, kind="stable")
    gains = (teacher - student)[order]
    base = student.mean()
    curve = [[0.0, float(base)]]
    curve += [
        [(k + 1) / len(conf), float(base + s / len(conf))] for k, s in enumerate(np.cumsum(gains))
    ]
    return curve


def candidate_thresholds(conf: np.ndarray) -> np.ndarray:
    """Every distinct cut: defer nothing (the lowest value), … , defer everything (+inf)."""
    return np.append(np.unique(conf), np.inf)


def choose_threshold(conf, student, teacher, *, target_quality=None, max_deferral=None) -> dict:
    """The threshold reaching the target on these (calibration) questions: the least deferral
    whose quality is at least target_quality × the teacher's, or the best quality deferring at
    most max_deferral. `reached` says whether the target was met (else: defer everything for a
    quality target, defer nothing for a deferral budget)."""
    teacher_quality = float(teacher.mean())
    options = [(t, *cascade_quality(conf, student, teacher, t)) for t in candidate_thresholds(conf)]
    if target_quality is not None:
        goal = target_quality * teacher_quality
        good = [o for o in options if o[2] >= goal - 1e-12]
        chosen = min(good, key=lambda o: (o[1], -o[2])) if good else options[-1]
        reached = bool(good)
    else:
        allowed = [o for o in options if o[1] <= max_deferral + 1e-12]
        chosen = max(allowed, key=lambda o: (o[2], -o[1]))
        reached = True
    threshold, rate, quality = chosen
    return {
        "threshold": float(threshold),
        "deferral": rate,
        "quality": quality,
        "teacher_quality": teacher_quality,
        "reached": reached,
    }


def outcome_on_test(conf, student, teacher, threshold: float, seed: int) -> dict:
    """What the calibration threshold gives on test, each with a 95% bootstrap CI over the
    test questions (deferral rate, quality, and quality as a share of the teacher's)."""
    deferred = conf < threshold
    cascade = np.where(deferred, teacher, student)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(conf), size=(BOOTSTRAP_SAMPLES, len(conf)))
    teacher_means = teacher[rows].mean(axis=1)
    draws = {
        "deferral": deferred[rows].mean(axis=1),
        "quality": cascade[rows].mean(axis=1),
        "share_of_teacher": cascade[rows].mean(axis=1) / np.where(teacher_means, teacher_means, 1),
    }
    point = {
        "deferral": float(deferred.mean()),
        "quality": float(cascade.mean()),
        "share_of_teacher": float(cascade.mean() / teacher.mean()) if teacher.mean() else math.nan,
    }
    return {
        name: {
            "value": point[name],
            "ci": [float(v) for v in np.quantile(draws[name], [0.025, 0.975])],
        }
        for name in point
    } | {"student_quality": float(student.mean()), "teacher_quality": float(teacher.mean())}


# --------------------------------------------------------------------------- one task
def analyse_task(student_dir: Path, teacher_dir: Path, task_name: str, task_type: str, settings):
    """The cascade report of one task. `settings` is a recipe's `cascade:` section (metric,
    signals, correct_at, calibration, seed, target_quality or max_deferral)."""
    signals = signals_for(task_type, settings.signals, task_name)
    student_summary, student_samples = read_samples(student_dir, task_name)
    teacher_summary, teacher_samples = read_samples(teacher_dir, task_name)
    metric = settings.metric or next(iter(student_summary["metrics"]))
    records = paired_questions(student_samples, teacher_samples, metric, signals, "the student")
    calibration, test = split_questions(records, settings.calibration, settings.seed)
    target = {"target_quality": settings.target_quality, "max_deferral": settings.max_deferral}
    per_signal = {}
    for signal in signals:
        per_signal[signal] = _measure_signal(signal, calibration, test, settings, target)
    # The winner is chosen on calibration alone: least deferral at the quality target, or the
    # best quality within the deferral budget.
    if settings.target_quality is not None:
        winner = min(
            signals,
            key=lambda s: (
                not per_signal[s]["calibration"]["reached"],
                per_signal[s]["calibration"]["deferral"],
            ),
        )
    else:
        winner = max(signals, key=lambda s: per_signal[s]["calibration"]["quality"])
    scores = {
        "student": np.array([r["student"] for r in test]),
        "teacher": np.array([r["teacher"] for r in test]),
    }
    oracle = deferral_curve(
        scores["student"] - scores["teacher"], scores["student"], scores["teacher"]
    )
    return {
        "task": task_name,
        "type": task_type,
        "metric": metric,
        "correct_at": settings.correct_at,
        "n_calibration": len(calibration),
        "n_test": len(test),
        "seed": settings.seed,
        "target": {k: v for k, v in target.items() if v is not None},
        "signals": per_signal,
        "winner": winner,
        "oracle_curve": oracle,
        "cost": cost_saved(
            per_signal[winner]["test"]["deferral"]["value"],
            student_summary,
            teacher_summary,
            student_samples,
            teacher_samples,
        ),
    }


def _measure_signal(signal: str, calibration, test, settings, target: dict) -> dict:
    def arrays(records):
        return (
            confidence(records, signal),
            np.array([r["student"] for r in records]),
            np.array([r["teacher"] for r in records]),
        )

    cal_conf, cal_student, cal_teacher = arrays(calibration)
    test_conf, test_student, test_teacher = arrays(test)
    cal_correct = (cal_student >= settings.correct_at).astype(np.float64)
    test_correct = test_student >= settings.correct_at
    coefficients = fit_logistic(cal_conf, cal_correct)
    ece, bins = reliability(predict(coefficients, test_conf), test_correct.astype(np.float64))
    chosen = choose_threshold(cal_conf, cal_student, cal_teacher, **target)
    return {
        # How well low confidence finds the student's errors on test (0.5: no better than chance).
        "auroc": auroc(-test_conf, ~test_correct),
        "ece": ece,
        "reliability": bins,
        "logistic": list(coefficients),
        "calibration": chosen,
        "test": outcome_on_test(
            test_conf, test_student, test_teacher, chosen["threshold"], settings.seed
        ),
        "curve": deferral_curve(test_conf, test_student, test_teacher),
    }


def cost_saved(deferral: float, student_summary, teacher_summary, student_samples, teacher_samples):
    """What the cascade saves against sending every request to the teacher: the share the
    teacher never sees, generation FLOPs (2 × parameters × answer tokens; prompt tokens not
    counted) and latency per request from each model's measured scoring time (the student
    answers every request, the teacher the deferred ones after it)."""
    cost = {"teacher_never_sees": 1.0 - deferral}

    def tokens(samples):
        counts = [s.get("signals", {}).get("n_tokens") for s in samples]
        return float(np.mean(counts)) if all(c is not None for c in counts) else None

    student_tokens, teacher_tokens = tokens(student_samples), tokens(teacher_samples)
    student_params, teacher_params = (
        student_summary.get("n_params"),
        teacher_summary.get("n_params"),
    )
    if None not in (student_tokens, teacher_tokens, student_params, teacher_params):
        student_flops = 2.0 * student_params * student_tokens
        teacher_flops = 2.0 * teacher_params * teacher_tokens
        cascade_flops = student_flops + deferral * teacher_flops
        cost["flops_per_request"] = {
            "teacher_only": teacher_flops,
            "cascade": cascade_flops,
            "saved": 1.0 - cascade_flops / teacher_flops,
        }
    student_seconds, teacher_seconds = (
        student_summary.get("seconds"),
        teacher_summary.get("seconds"),
    )
    if student_seconds and teacher_seconds:
        per_student = student_seconds / student_summary["n"]
        per_teacher = teacher_seconds / teacher_summary["n"]
        cascade_seconds = per_student + deferral * per_teacher
        cost["seconds_per_request"] = {
            "student": per_student,
            "teacher_only": per_teacher,
            "cascade": cascade_seconds,
            "saved": 1.0 - cascade_seconds / per_teacher,
            "batch_size": student_summary.get("batch_size"),
        }
        if student_tokens and teacher_tokens:
            cost["tokens_per_s"] = {
                "student": student_tokens / per_student,
                "teacher": teacher_tokens / per_teacher,
            }
    return cost
