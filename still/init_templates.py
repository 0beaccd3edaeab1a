"""The commented recipes and task YAMLs `still init` writes (`still/init.py` decides the values).

Each file says why each setting has its value, so a user can read every decision and edit it.
The training settings are the quickstart's (recipes/quickstart/), which are sized for a CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass
class Plan:
    name: str
    base: str
    data: str  # relative to recipes/<name>/
    test: str | None  # relative to recipes/<name>/
    format: str
    fields: dict[str, str]
    reason: str
    rows: int
    held_out: float | int
    group_by: str | None
    max_len: int
    p50: int
    p99: int
    longest: int
    choices: bool
    chat_pairs: bool  # chat rows all end in a user turn then an assistant turn
    answer_tokens: int  # p99 of the final answers' token lengths, rounded up


def _flow(mapping: dict) -> str:
    """A one-line YAML mapping with JSON-quoted strings (always valid YAML)."""
    return "{" + ", ".join(f"{key}: {json.dumps(value)}" for key, value in mapping.items()) + "}"


def _held_out(plan: Plan, side: str | None = None) -> dict:
    """The split every recipe and task names: eval rows, and test rows unless --test gave a
    file; a task reads `side`."""
    spec = {"split": plan.held_out, **({} if plan.test else {"test": plan.held_out}), "seed": 0}
    spec = {**spec, "group_by": plan.group_by} if plan.group_by else spec
    return {**spec, "side": side} if side else spec


def _data_section(plan: Plan) -> str:
    share = (
        f"{plan.held_out:.0%} of the rows"
        if isinstance(plan.held_out, float)
        else (f"{plan.held_out} rows")
    )
    grouped = f"; whole '{plan.group_by}' groups, none on two sides" if plan.group_by else ""
    tests = (
        "the tasks in tasks/ score the --test file"
        if plan.test
        else f"test: {share} more for the tasks in tasks/ to score; training reads neither"
    )
    train = _flow({"path": plan.data, "format": plan.format, **plan.fields})
    return f"""\
data:
  # format {plan.format}: {plan.reason} in every one of the {plan.rows} rows
  train: {train}
  # {share} held out for the eval loss (seeded: the same rows on every run{grouped});
  # {tests}
  eval: {_flow(_held_out(plan))}
  # the rows' token lengths under {plan.base}: p50 {plan.p50}, p99 {plan.p99}, longest
  # {plan.longest}; max_len is the p99 rounded up to a multiple of 32, so about 1% of the rows
  # are truncated (data.truncation: drop skips them instead)
  max_len: {plan.max_len}
  packing: true
"""


def teacher(plan: Plan) -> str:
    return f"""\
# Run: still run recipes/{plan.name}/teacher.yaml
# Written by `still init`. The teacher: LoRA on {plan.base}, taught the rows of
# {plan.data}.
# The settings are the quickstart teacher's (about 5 minutes on a 2-core CPU for a 135M base);
# on a GPU raise train.max_steps and batch_size.
kind: finetune
name: {plan.name}-teacher
model: {{ref: {json.dumps(plan.base)}}}
method: lora
lora: {{r: 16, alpha: 32, dropout: 0.05, target: all-linear}}   # higher r: more capacity, memory
{_data_section(plan)}\
train: {{lr: 3.0e-4, batch_size: 8, grad_accum: 1, max_steps: 50, warmup_ratio: 0.05, seed: 0}}
"""


def student(plan: Plan) -> str:
    return f"""\
# Run: still run recipes/{plan.name}/student.yaml   (after teacher.yaml)
# Written by `still init`. Distil the teacher into a student carved out of it: the 46% of its
# layers that change their input most on a calibration sample, trained fully on forward KL to
# the teacher's token distributions (the quickstart student's settings).
kind: distill
name: {plan.name}-student
teacher: {{ref: runs/{plan.name}-teacher}}
student:
  init: {{from: teacher, keep_ratio: 0.46, strategy: importance, calibration_samples: 32}}
method: full
distill: {{loss: forward_kl, temperature: 1.0, kd_weight: 1.0, ce_weight: 0.0}}
{_data_section(plan)}\
# lr 3e-4: a freshly carved student heals fastest at a higher rate than fine-tuning uses
train: {{lr: 3.0e-4, batch_size: 8, max_steps: 60, warmup_ratio: 0.05, seed: 0}}
"""


def student_sft(plan: Plan) -> str:
    return f"""\
# Run: still run recipes/{plan.name}/student-sft.yaml   (after teacher.yaml)
# Written by `still init`. The baseline that shows what KD buys: the same carved student, data
# and steps, trained on the hard labels only.
extends: student.yaml
name: {plan.name}-student-sft
distill: {{kd_weight: 0.0, ce_weight: 1.0}}
"""


def task_names(plan: Plan) -> list[str]:
    names = ["qa"] if plan.format != "completion" and plan.chat_pairs else []
    names.append("perplexity")
    return names + (["choice"] if plan.choices and plan.format != "completion" else [])


def evaluation(plan: Plan) -> str:
    tasks = ", ".join(f"tasks/{task}.yaml" for task in task_names(plan))
    skipped = ""
    if "qa" not in task_names(plan):
        why = (
            "completion rows have no question to answer"
            if plan.format == "completion"
            else "not every conversation ends in a user turn and an assistant answer"
        )
        skipped = f"# No generate task: {why}.\n"
    return f"""\
# Run: still run recipes/{plan.name}/eval.yaml   (after the teacher and both students)
# Written by `still init`. Score the base, the teacher and both students on the held-out rows,
# then compare them against the base with paired 95% CIs and the teacher's retention.
{skipped}kind: eval
name: {plan.name}-compare
models:
  - {json.dumps(plan.base)}
  - runs/{plan.name}-teacher
  - runs/{plan.name}-student
  - runs/{plan.name}-student-sft
tasks: [{tasks}]
reference: {json.dumps(plan.base)}
teacher: runs/{plan.name}-teacher
limit: 100          # rows per task: about a minute per model on a CPU; drop it for all of them
batch_size: 8
"""


def _task_data(plan: Plan) -> tuple[str, str]:
    """(data line, comment) of every task: the --test file, or the recipes' held-out rows."""
    if plan.test:
        return _flow({"path": os.path.join("..", plan.test)}), "the --test file"
    spec = {"path": os.path.join("..", plan.data), "holdout": "HOLDOUT"}
    line = _flow(spec).replace('"HOLDOUT"', _flow(_held_out(plan, side="test")))
    return line, "the test rows the recipes hold out (data.eval's test), drawn the same way"


def _prompt_target(plan: Plan) -> tuple[str, str]:
    if plan.format == "completion":
        return "", "{{ " + plan.fields["text"] + " }}"
    if plan.format == "chat":
        field = plan.fields["messages"]
        return f"{{{{ {field}[-2].content }}}}", f"{{{{ {field}[-1].content }}}}"
    prompt = "{{ " + plan.fields["prompt"] + " }}"
    if "input" in plan.fields:
        prompt += "{% if input %}\n\n{{ input }}{% endif %}"
    return prompt, "{{ " + plan.fields["response"] + " }}"


def task(plan: Plan, kind: str) -> str:
    data, rows = _task_data(plan)
    prompt, target = _prompt_target(plan)
    chat = "false" if plan.format == "completion" else "true"
    head = f"# Run: still eval --model {plan.base} --task recipes/{plan.name}/tasks/{kind}.yaml\n"
    head += f"# Written by `still init`. Rows: {rows}.\n"
    body = {
        "qa": f"""\
# The prompt (in chat rows, the last user turn) answered in free text, scored against the
# reference answer.
name: {plan.name}-qa
type: generate
data: {data}
prompt: {json.dumps(prompt)}
target: {json.dumps(target)}
chat_template: true           # the chat format the recipes train on
# the p99 of the reference answers' token lengths, rounded up to 16; eos also stops
generation: {{max_new_tokens: {plan.answer_tokens}}}
metrics: [rouge_l, token_f1, exact_match]
""",
        "perplexity": f"""\
# How likely the model finds the reference (loss on the target tokens only): the most
# sensitive signal that training moved the model toward the data. Compare models that share a
# tokenizer.
name: {plan.name}-perplexity
type: perplexity
data: {data}
prompt: {json.dumps(prompt)}
target: {json.dumps(target)}
chat_template: {chat}
metrics: [loss, perplexity]
""",
        "choice": f"""\
# The rows carry `choices` and `label`: each choice scored by log-likelihood (acc, acc_norm).
name: {plan.name}-choice
type: multiple_choice
data: {data}
prompt: {json.dumps(prompt)}
choices: choices
label: label
chat_template: true
metrics: [acc, acc_norm]
""",
    }[kind]
    return head + body


def pipeline(plan: Plan) -> str:
    return f"""\
# Run: still run recipes/{plan.name}/pipeline.yaml
# Written by `still init`. Every stage below is a plain recipe in this dir: teacher -> student
# and student-sft -> eval. The references ${{stages.NAME.run_dir}} pass run dirs along and are
# what a stage depends on. Run it again and complete, unchanged stages are skipped; edit a
# recipe (or its data) and that stage and everything downstream of it run again.
# `--from STAGE` or `--only STAGE` re-run part of it.
kind: pipeline
name: {plan.name}
stages:
  - {{name: teacher, recipe: teacher.yaml}}
  - name: student
    recipe: student.yaml
    overrides: {{teacher.ref: "${{stages.teacher.run_dir}}"}}
  - name: student-sft
    recipe: student-sft.yaml
    overrides: {{teacher.ref: "${{stages.teacher.run_dir}}"}}
  - name: eval
    recipe: eval.yaml
    overrides:
      models:
        - {json.dumps(plan.base)}
        - ${{stages.teacher.run_dir}}
        - ${{stages.student.run_dir}}
        - ${{stages.student-sft.run_dir}}
      teacher: ${{stages.teacher.run_dir}}
"""


def files(plan: Plan) -> dict[str, str]:
    """{path relative to recipes/<name>/: text} for everything `still init` writes."""
    written = {
        "teacher.yaml": teacher(plan),
        "student.yaml": student(plan),
        "student-sft.yaml": student_sft(plan),
        "eval.yaml": evaluation(plan),
        "pipeline.yaml": pipeline(plan),
    }
    for kind in task_names(plan):
        written[f"tasks/{kind}.yaml"] = task(plan, kind)
    return written
