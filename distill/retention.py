"""The end of a distill run with `eval_tasks`: the student scored, then its teacher on the same
tasks, and the retention table between them.

The teacher's results go to `<run>/retention/teacher/` (cached by the teacher's content hash,
so every student of one teacher scores it once); `<run>/retention/compare.md` (and .json,
.png) holds, per task and metric, the student's score, its paired difference from the teacher
with the 95% CI, and the share of the teacher's score it keeps. The table is also printed.
"""

from __future__ import annotations

from eval.compare import compare
from eval.run import evaluate_model, evaluate_run
from still.rundir import RunDir

TEACHER_NAME = "teacher"


def evaluate_with_retention(teacher_ref: str):
    """finish_run's `evaluate` for a distill run: the student, then the teacher and the table."""

    def evaluate(run: RunDir, task_paths: list[str]) -> None:
        if not task_paths:
            return
        evaluate_run(run, task_paths)
        out = run.retention_dir
        evaluate_model(teacher_ref, task_paths, out_dir=out / TEACHER_NAME, name=TEACHER_NAME)
        print(f"still: retention of {run.name} against its teacher ({out / 'compare.md'}):")
        compare(
            [run.eval_dir, out / TEACHER_NAME],
            reference=TEACHER_NAME,
            teacher=TEACHER_NAME,
            out_dir=out,
        )

    return evaluate
