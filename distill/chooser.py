"""The student size chooser in `still check` for a distill recipe: the recipe's student next to
the other ways to reach its size, with the preflight's own estimates for each.

Candidates, at the share of the teacher's parameters the recipe's student has: depth (the most
layers, spread evenly, that fit), width (distill/width.py at that size), both (depth to the
square root of the share, then width), and the recipe's `student.ref` when it names a model.
Each is built on the meta device from its config (no weights, no calibration), and
`still.preflight.estimate` gives its memory per device and tokens/s for this recipe's batches,
as the check line for the recipe's own model does.
"""

from __future__ import annotations

import math
import tempfile
import time

import torch

from distill.student import _student_config, _uniform_layers, count_parameters
from distill.width import plan_width, pruned_config
from still.distill_sections import StudentInit
from still.errors import StillError
from still.preflight import estimate, meta_model
from still.rundir import open_run_dir
from still.sections import TrackSection

GIB = 2**30


def _meta_model(model_class, config):
    with torch.device("meta"):
        return model_class._from_config(config)


def _depth(teacher, target: int):
    """(label, meta model) of the most evenly spread layers whose student fits `target`."""
    layers = teacher.config.num_hidden_layers
    best = None
    for count in range(1, layers + 1):
        config = _student_config(teacher.config, _uniform_layers(layers, count))
        model = _meta_model(type(teacher), config)
        if best is None or count_parameters(model) <= target:
            best = (f"depth ({count}/{layers} layers)", model)
    return best


def _width(teacher, target: int):
    try:
        shape = plan_width(teacher, target, ("mlp", "heads", "hidden"))
    except StillError:
        return None  # narrower than width pruning can go
    model = _meta_model(type(teacher), pruned_config(teacher.config, shape))
    label = f"width (hidden {shape.hidden}, MLP {shape.intermediate}, heads {shape.heads})"
    return label, model


def _both(teacher, share: float, full: int):
    label, carved = _depth(teacher, int(math.sqrt(share) * full))
    try:
        shape = plan_width(carved, int(share * full), ("mlp", "heads", "hidden"))
    except StillError:
        return None
    model = _meta_model(type(teacher), pruned_config(carved.config, shape))
    layers = carved.config.num_hidden_layers
    return f"both ({layers} layers, hidden {shape.hidden}, MLP {shape.intermediate})", model


def _named_student(recipe):
    return f"{recipe.student.ref} (student.ref)", meta_model(recipe.student)


def candidates(recipe, teacher, student) -> tuple[float, list[tuple[str, object]]]:
    """The recipe's share of the teacher's parameters, and (label, meta model) per candidate."""
    full = count_parameters(teacher)
    share = count_parameters(student) / full
    target = int(share * full)
    found = [_depth(teacher, target), _width(teacher, target), _both(teacher, share, full)]
    if recipe.student.ref is not None:
        found.append(_named_student(recipe))
    return share, [entry for entry in found if entry is not None]


def report_lines(recipe, teacher, student, train, total_steps: int) -> list[str]:
    share, found = candidates(recipe, teacher, student)
    full = count_parameters(teacher)
    lines = [
        f"  student candidates at {share:.1%} of the teacher's {full / 1e6:.1f}M parameters "
        "(estimated like the model line above: memory per device, tokens/s):"
    ]
    for label, model in found:
        est = estimate(recipe, model, train, total_steps, teacher=teacher)
        memory = sum(est["memory"].values()) / GIB
        lines.append(
            f"    {label:<52} {est['params'] / 1e6:7.1f}M {est['params'] / full:6.1%}  "
            f"{memory:5.1f} GiB  ~{est['tokens_per_s']:,.0f} tokens/s"
        )
    return lines


def print_candidates(recipe, teacher, student, train, total_steps: int) -> None:
    if recipe.student.init is None and recipe.student.ref is None:
        return
    print("\n".join(report_lines(recipe, teacher, student, train, total_steps)))


# --------------------------------------------------------------------------- probe runs
def _probe_inits(recipe, teacher, student) -> list[tuple[str, object]]:
    """(label, student.init or None for student.ref) per candidate, as recipe settings."""
    share, found = candidates(recipe, teacher, student)
    layers = teacher.config.num_hidden_layers
    own = recipe.student.init
    strategy = own.strategy if own is not None else "importance"
    samples = own.calibration_samples if own is not None else 32
    inits = []
    for label, model in found:
        kept = model.config.num_hidden_layers / layers
        if label.startswith("depth"):
            settings = {"prune": "depth", "keep_ratio": kept, "strategy": strategy}
        elif label.startswith("width"):
            settings = {"prune": "width", "size": share}
        elif label.startswith("both"):
            settings = {"prune": "both", "keep_ratio": kept, "size": share, "strategy": strategy}
        else:
            inits.append((label, None))
            continue
        inits.append((label, StudentInit(calibration_samples=samples, **settings)))
    return inits


def probe(recipe, teacher, student, steps: int, distill_run) -> list[str]:
    """Each candidate trained `steps` steps with the recipe's own loss, data and optimizer (a
    real run of `distill_run`, kd.run, into a temporary dir, nothing tracked or kept): its eval
    loss after. kd passes its runner in: the chooser sits below it."""
    lines = [f"  probe: each candidate trained {steps} steps as this recipe trains, then scored:"]
    for label, init in _probe_inits(recipe, teacher, student):
        variant = recipe.model_copy(deep=True)
        variant.student.init = init  # None: the named student.ref itself
        if init is not None and recipe.student.init is None:  # carve from the teacher instead
            variant.student.ref = None
        variant.train.max_steps, variant.train.save_steps = steps, steps
        variant.train.eval_steps = None
        variant.eval_tasks, variant.track = [], TrackSection()
        with tempfile.TemporaryDirectory(prefix="still-probe-") as scratch:
            variant.output_dir, variant.name = scratch, "probe"
            start = time.monotonic()
            try:
                with open_run_dir(variant) as run:
                    summary = distill_run(variant, run)["summary"]
            except StillError as exc:
                lines.append(f"    {label:<52} refused: {exc}")
                continue
        loss = summary.get("eval_loss", summary["train_loss"])
        which = "eval" if "eval_loss" in summary else "train"
        lines.append(
            f"    {label:<52} {which} loss {loss:.3f} after {steps} steps "
            f"({time.monotonic() - start:.0f} s)"
        )
    lines.append("  (lower is better; the loss is the recipe's: KD, CE or their mix)")
    return lines
