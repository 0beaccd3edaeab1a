"""How much of the teacher a freshly pruned student keeps before any healing: depth (layers by
importance) against width pruning on its axes, side by side at about the same size.

    python benchmarks/pruned_students.py [--recipe recipes/quickstart/student.yaml]
        [--teacher builtin:smollm2-135m-instruct] [--size 0.579] [--keep-ratio 0.46]

For each student it prints the carve line (shape, parameters) and the cross entropy of the
recipe's eval split, next to the teacher's. One run, no training: a lower loss is a better
starting point for healing, not a final score.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.kd import calibration_batches
from distill.teacher import load_teacher
from distill.width import pruned_student
from still import data as data_module
from still import recipe as recipe_module
from still.losses import IGNORE_INDEX


def eval_cross_entropy(model, dataset, pad_id: int, batch_size: int = 8) -> float:
    collator = data_module.PaddedCollator(pad_id)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            tokens += int((labels != IGNORE_INDEX).sum())
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart/student.yaml")
    parser.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--size", type=float, default=0.579)
    parser.add_argument("--keep-ratio", type=float, default=0.46)
    parser.add_argument("--calibration-samples", type=int, default=32)
    args = parser.parse_args()
    samples = f"calibration_samples: {args.calibration_samples}"
    width = f"prune: width, size: {args.size}, {samples}"
    inits = {
        "depth (importance)": f"{{keep_ratio: {args.keep_ratio}, strategy: importance, {samples}}}",
        "width mlp+heads+hidden": f"{{{width}}}",
        "width mlp+hidden": f"{{{width}, width_axes: [mlp, hidden]}}",
        "width mlp+heads": f"{{{width}, width_axes: [mlp, heads]}}",
    }
    teacher = tokenizer = train = evaluation = None
    for name, init in inits.items():
        recipe = recipe_module.load(
            args.recipe, [f"student.init={init}", f"teacher.ref={args.teacher}"]
        )
        if teacher is None:
            teacher, tokenizer = load_teacher(recipe)
            train = data_module.prepare(recipe.data, tokenizer, split="train")
            evaluation = data_module.prepare(recipe.data, tokenizer, split="eval")
            loss = eval_cross_entropy(teacher, evaluation.dataset, tokenizer.pad_token_id)
            print(f"teacher {args.teacher}: eval CE {loss:.3f}", flush=True)
        started = time.perf_counter()
        student, report = pruned_student(
            teacher, recipe.student.init, calibration_batches(recipe, train)
        )
        loss = eval_cross_entropy(student, evaluation.dataset, tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
        print(f"{name}: {report.summary()} | eval CE {loss:.3f} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
