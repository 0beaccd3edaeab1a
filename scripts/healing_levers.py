"""Healing levers for a freshly carved student, each measured alone (docs/distillation.md).

Every lever is one `still run` of the quickstart student (recipes/quickstart/student.yaml)
with a few dotted overrides, ending with the run's own retention table on the bundled tasks.
Then one comparison puts every lever next to the baseline with paired 95% CIs and the share
of the teacher's score each keeps (`<out>/compare.md`), and `<out>/levers.json` records the
overrides, wall time and training tokens of each run.

    .venv/bin/python scripts/healing_levers.py                       # every lever
    .venv/bin/python scripts/healing_levers.py --levers baseline,lr3e-4
    .venv/bin/python scripts/healing_levers.py --recipe recipes/debpkgs/student.yaml \
        --tasks recipes/tasks/debpkgs-qa.yaml,recipes/tasks/debpkgs-choice.yaml

Needs the recipe's teacher run (e.g. `still run recipes/quickstart/teacher.yaml`). On the
2-core CPU each lever takes about 4 minutes (training plus scoring). `--steps` scales every
lever's budget (a retention-vs-tokens curve is several --steps values into one --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.compare import compare  # noqa: E402

OUT = ROOT / "runs" / "healing-levers"
WRITTEN = OUT / "teacher-written.jsonl"
CACHE = OUT / "teacher-cache"

# name: (what it changes, overrides). Each lever changes one thing against the baseline.
LEVERS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the recipe as written", []),
    "lr1e-4": ("peak lr 1e-4", ["train.lr=1.0e-4"]),
    "lr3e-4": ("peak lr 3e-4", ["train.lr=3.0e-4"]),
    "lr1e-3": ("peak lr 1e-3", ["train.lr=1.0e-3"]),
    "warmup0.2-linear": (
        "20% warmup, linear decay",
        ["train.warmup_ratio=0.2", "train.scheduler=linear"],
    ),
    "ce0.5": ("KD plus 0.5 × hard-label CE", ["distill.ce_weight=0.5"]),
    "T2": ("temperature 2", ["distill.temperature=2.0"]),
    "rkl": ("reverse KL", ["distill.loss=reverse_kl"]),
    "all-tokens": ("KD on every token, the prompt's too", ["data.train_on=all"]),
    # the same first 480 rows that the seqkd and cache levers use (they see no other rows)
    "rows480": ("only the first 480 training rows", ["data.train.limit=480"]),
    # sequence-level data: the teacher's greedy answers to 480 training prompts (BEFORE below)
    "seqkd": (
        "train on the teacher's answers to 480 prompts instead of the dataset's",
        [
            f"data.train={{path: {WRITTEN}, format: chat}}",
            "data.eval={path: " + str(ROOT / "data/pydocs/validation.jsonl") + ", limit: 96, "
            "format: instruction, prompt: question, response: answer}",
        ],
    ),
    "seqkd-mix": (
        "480 dataset rows plus the teacher's answers to the same 480 prompts",
        ["data.train.limit=480", f"data.mix=[{{path: {WRITTEN}, format: chat}}]"],
    ),
    # the teacher cache: the same 60 steps without a teacher forward (the cache is built once)
    "cache": (
        "teacher top-64 from an offline cache of 480 examples",
        ["data.train.limit=480", f"distill.teacher_cache={CACHE}", "distill.cache_top_k=64"],
    ),
}

# What a lever needs first: (what it writes, the still command), run once and kept.
BEFORE: dict[str, tuple[Path, list[str]]] = {
    "seqkd": (WRITTEN, ["generate", "{recipe}", "data.train.limit=480", f"generate.out={WRITTEN}",
              "generate.temperature=0", "generate.max_new_tokens=96", "generate.batch_size=16"]),
    "cache": (CACHE, ["cache", "{recipe}", "data.train.limit=480",
              f"distill.teacher_cache={CACHE}", "distill.cache_top_k=64"]),
}  # fmt: skip
BEFORE["seqkd-mix"] = BEFORE["seqkd"]


def _run(cmd: list[str], log: Path) -> float:
    start = time.monotonic()
    with log.open("w") as handle:
        done = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.monotonic() - start


def _last(run_dir: Path, key: str):
    seen = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        seen = json.loads(line).get(key, seen)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart/student.yaml")
    parser.add_argument(
        "--tasks", default="recipes/tasks/pydocs-qa.yaml,recipes/tasks/pydocs-choice.yaml"
    )
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps for every lever")
    parser.add_argument("--out", default="runs/healing-levers")
    parser.add_argument("--extra", default="", help="overrides added to every lever, ;-separated")
    args = parser.parse_args()

    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tasks = [str((ROOT / t).resolve()) for t in args.tasks.split(",")]
    record_path = out / "levers.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    still = str(ROOT / ".venv" / "bin" / "still")
    for lever in args.levers.split(","):
        what, overrides = LEVERS[lever]
        name = lever if args.steps is None else f"{lever}-{args.steps}steps"
        overrides = overrides + [o for o in args.extra.split(";") if o]
        if args.steps is not None:
            overrides.append(f"train.max_steps={args.steps}")
        cmd = [still, "run", args.recipe, f"name={name}", f"output_dir={out}",
               f"eval_tasks=[{', '.join(tasks)}]", *overrides,
               "--force"]  # fmt: skip
        if lever in BEFORE and not BEFORE[lever][0].exists():
            before = [part.format(recipe=args.recipe) for part in BEFORE[lever][1]]
            print(f"== before {name}: still {' '.join(before)}", flush=True)
            _run([still, *before], out / f"{name}.before.log")
        print(f"== {name}: {what} {' '.join(overrides)}", flush=True)
        wall = _run(cmd, out / f"{name}.log")
        record[name] = {
            "what": what,
            "overrides": overrides,
            "wall_s": round(wall, 1),
            "train_runtime_s": _last(out / name, "train_runtime"),
            "tokens": _last(out / name, "num_input_tokens_seen"),
        }
        record_path.write_text(json.dumps(record, indent=1))
        print(f"   {wall:.0f} s, {record[name]['tokens']} tokens", flush=True)
    runs = [name for name in record if (out / name / "eval").is_dir()]
    teacher = next(out / n / "retention" / "teacher" for n in runs)
    reference = "baseline" if "baseline" in runs else runs[0]
    compare(
        [out / n / "eval" for n in runs] + [teacher],
        reference=reference,
        teacher="teacher",
        out_dir=out,
    )


if __name__ == "__main__":
    main()
