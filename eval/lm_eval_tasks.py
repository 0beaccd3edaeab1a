"""lm-evaluation-harness tasks next to our own: `lm_eval:arc_easy`, or a path to an lm-eval task
YAML, wherever a task YAML is accepted (`still eval --task`, an eval recipe's `tasks`, a
training recipe's `eval_tasks` and `regression_tasks`).

lm-eval does the work: its `TaskManager` finds and builds the task (prompts, few-shot, filters),
`simple_evaluate` runs it with its own metrics and aggregations, and the model answers through
the `still` backend (`eval/lm_eval_backend.py`). What this module adds is the bridge into the
kit: the task is checked (it exists, its data loads) before any model loads; its per-document
results are written as `<task>.json` + `<task>.samples.jsonl` in the shape `evaluate` writes,
so `still compare` pairs the same documents across models; and the results are cached by the
model's content hash and a hash of the task's config and documents.

A task YAML's relative `dataset_kwargs.data_files` are taken relative to the YAML, as ours are.
Data on the hub needs the network: offline, that is a one-line error naming the dataset.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from eval import metrics
from still.errors import StillError

PREFIX = "lm_eval:"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr bootstrap for non-mean aggregations; ours too

log = logging.getLogger(__name__)


@dataclass
class LmEvalTask:
    """One `lm_eval:` reference, checked: the spec lm-eval loads, and its leaf tasks' names."""

    ref: str  # as written
    spec: str | dict  # a registered name, or the YAML's config (data paths made absolute)
    leaves: list[str] = field(default_factory=list)
    # groups with an aggregate (mmlu, mmlu_stem): their leaf tasks, each written as a result
    groups: dict[str, list[str]] = field(default_factory=dict)
    digest: str = ""  # over every leaf's config and documents
    source: str = ""

    @property
    def name(self) -> str:
        return self.spec if isinstance(self.spec, str) else str(self.spec.get("task"))

    @property
    def outputs(self) -> list[str]:
        """The results it writes: one per leaf task, then one per aggregating group."""
        return self.leaves + sorted(self.groups)


def is_lm_eval_task(ref: str | Path) -> bool:
    """`lm_eval:NAME`, or a YAML file that is an lm-eval task config (it names its `task:`;
    ours name it with `name:`)."""
    text = str(ref)
    if text.startswith(PREFIX):
        return True
    path = Path(text)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False  # our task loader says what is wrong with it
    return bool(re.search(r"^task\s*:", content, re.M)) and not re.search(
        r"^name\s*:", content, re.M
    )


def task_manager(include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def check_lm_eval_task(ref: str | Path, manager=None) -> LmEvalTask:
    """Resolve and build one lm-eval task (its data loads here, before any model)."""
    ref = str(ref)
    target = ref.removeprefix(PREFIX)
    path = Path(target).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise StillError(f"{ref}: lm-eval task file not found: {path.resolve()}")
        spec: str | dict = _config_from_yaml(path)
        manager = manager or task_manager(include_defaults="include" in spec)
    else:
        manager = manager or task_manager()
        if target not in manager.all_tasks:
            close = difflib.get_close_matches(target, manager.all_tasks, n=1)
            suggestion = f" (did you mean 'lm_eval:{close[0]}'?)" if close else ""
            raise StillError(
                f"{ref}: lm-eval has no task or group named {target!r}{suggestion}",
                hint="`lm-eval ls tasks` lists them; a local task is a path to its YAML",
            )
        spec = target
    loaded = _load(manager, spec, ref)
    task = LmEvalTask(ref=ref, spec=spec, leaves=sorted(loaded["tasks"]), source=ref)
    task.groups = {
        name: sorted(t.task_name for t in group.get_all_tasks())
        for name, group in (loaded.get("groups") or {}).items()
        if group.aggregate_metric_list
    }
    task.digest = _digest(loaded["tasks"])
    return task


def _config_from_yaml(path: Path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path)
    except Exception as exc:  # noqa: BLE001 - yaml, include and !function errors alike
        raise StillError(f"{path}: not a readable lm-eval task config: {exc}") from None
    if "task" not in config:
        raise StillError(f"{path}: an lm-eval task config needs `task:` (its name)")
    config = copy.deepcopy(config)
    # a group (`task:` is a list) reads no data itself; the tasks written inline in it do
    members = config["task"] if isinstance(config["task"], list) else [config]
    for one in (member for member in members if isinstance(member, dict)):
        if one.get("dataset_path") in LOCAL_BUILDERS:
            kwargs = one.setdefault("dataset_kwargs", {}) or {}
            one["dataset_kwargs"] = kwargs
            kwargs["data_files"] = _absolute(kwargs.get("data_files"), path.resolve().parent, path)
    return config


def _absolute(files, base: Path, source: Path):
    """data_files (a path, a list, or split -> path(s)) relative to the task YAML."""
    if isinstance(files, dict):
        return {split: _absolute(value, base, source) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, base, source) for value in files]
    if files is None:
        raise StillError(f"{source}: dataset_kwargs.data_files: a local dataset needs its files")
    resolved = (base / str(files)).resolve()
    if not resolved.is_file():
        raise StillError(f"{source}: dataset_kwargs.data_files: file not found: {resolved}")
    return str(resolved)


def _load(manager, spec, ref: str) -> dict:
    """lm-eval builds the task, which loads its dataset: a hub dataset offline is one line."""
    try:
        return manager.load([buildable(manager, spec)])
    except StillError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/hub raise many types when offline
        named = re.search(r"'([\w.-]+/[\w.-]+)'", str(exc))  # datasets quotes the hub id
        dataset = _dataset_named(manager, spec) or (named.group(1) if named else None)
        if dataset and _is_offline_error(exc):
            raise StillError(
                f"{ref}: its dataset {dataset} is on the Hugging Face hub and could not be "
                f"loaded: no network ({type(exc).__name__})",
                hint="run once with the network to fill the datasets cache, or point a task "
                "YAML at local files (dataset_path: json, dataset_kwargs.data_files)",
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StillError(
            f"{ref}: lm-eval could not build the task: {type(exc).__name__}: {first_line}"
        ) from None


def buildable(manager, spec):
    """What lm-eval's TaskManager is given for `spec`. A group read from its YAML (`task:` a
    list) is built here as lm-eval's own Group of its members: lm-eval 0.4.13 applies a group
    *dict*'s own keys (group, aggregate_metric_list) to each member task and fails, while the
    YAML's path would read relative data_files from the working dir instead of the YAML's."""
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), list):
        return spec
    from lm_eval.api.group import Group

    group = Group.from_config(spec)
    for member in spec["task"]:
        loaded = manager.load([member])
        top = loaded["groups"].get(member) if isinstance(member, str) else None
        for item in [top] if top is not None else loaded["tasks"].values():
            group.add(item)
    return group


def _dataset_named(manager, spec) -> str | None:
    config = spec if isinstance(spec, dict) else _index_config(manager, spec)
    if not config or not config.get("dataset_path"):
        return None
    name = config.get("dataset_name")
    return config["dataset_path"] + (f" ({name})" if name else "")


def _index_config(manager, name: str) -> dict | None:
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_path = getattr(manager.task_index.get(name), "yaml_path", None)
    if yaml_path is None:
        return None
    try:
        return load_yaml(yaml_path, resolve_func=False)
    except Exception:  # noqa: BLE001 - only used to word the error
        return None


def _is_offline_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(
        word in text
        for word in ("offline", "connection", "resolve", "network", "couldn't reach", "not found")
    )


def _digest(tasks: dict) -> str:
    """sha256 over each leaf's config (functions by name) and its evaluation documents."""
    digest = hashlib.sha256()
    for name in sorted(tasks):
        task = tasks[name]
        digest.update(name.encode())
        config = task.dump_config() if hasattr(task, "dump_config") else vars(task.config)
        digest.update(json.dumps(config, sort_keys=True, default=_stable).encode())
        for doc in task.eval_docs:
            digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _stable(value) -> str:
    return getattr(value, "__qualname__", None) or type(value).__name__


# --------------------------------------------------------------------------- scoring
def run_lm_eval_task(model, tokenizer, task: LmEvalTask, *, batch_size: int, limit: int | None):
    """lm-eval's own evaluation of the task with our model: {leaf: (summary, samples)}."""
    from lm_eval import simple_evaluate

    from eval.lm_eval_backend import StillLM

    manager = task_manager(
        include_defaults=not isinstance(task.spec, dict) or "include" in task.spec
    )
    lm = StillLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=lm,
        tasks=[buildable(manager, task.spec)],
        task_manager=manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    found = {
        leaf: (_summary(output["results"][leaf]), [_sample(s) for s in _sorted(output, leaf)])
        for leaf in task.leaves
    }
    aggregates = output.get("groups") or {}
    for group, leaves in task.groups.items():
        if group in aggregates:
            found[group] = (_summary(aggregates[group]), _group_samples(found, leaves))
    return found


def _group_samples(found: dict, leaves: list[str]) -> list[dict]:
    """A group's documents: its leaves' in order, numbered anew, each id naming its leaf, so
    `still compare` pairs the same documents of the group across models. The paired mean is
    over documents, as lm-eval's size-weighted aggregate (mmlu) is."""
    samples, numbers = [], {}
    for leaf in leaves:
        for sample in found[leaf][1]:  # a document logged once per filter keeps one number
            number = numbers.setdefault((leaf, sample["idx"]), len(numbers))
            own = sample["id"] if sample.get("id") is not None else sample["idx"]
            samples.append({**sample, "idx": number, "id": f"{leaf}/{own}", "task": leaf})
    return samples


def _sorted(output: dict, leaf: str) -> list[dict]:
    return sorted(output["samples"][leaf], key=lambda s: (int(s["doc_id"]), s.get("filter", "")))


def _summary(results: dict) -> dict:
    """lm-eval's aggregated metrics (`acc,none` → `acc`; a filter other than none stays in the
    name, `exact_match,strict-match`) with its stderr (0 where lm-eval reports N/A)."""
    found = {}
    for key, value in results.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        stderr = results.get(f"{metric}_stderr,{filter_name}")
        name = metric if filter_name == "none" else f"{metric},{filter_name}"
        found[name] = {
            "mean": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else 0.0,
        }
    return found


def _sample(raw: dict) -> dict:
    """One document's lm-eval result in the shape `evaluate` writes (idx, id, prompt, target,
    what the model answered, per-document metrics)."""
    doc = raw.get("doc") if isinstance(raw.get("doc"), dict) else {}
    arguments = raw.get("arguments") or [()]
    sample = {
        "idx": int(raw["doc_id"]),
        "id": doc.get("id"),
        "prompt": str(arguments[0][0]) if arguments[0] else "",
        "target": str(raw.get("target")),
        "filter": raw.get("filter", "none"),
    }
    responses = raw.get("resps") or []
    if responses and isinstance(responses[0][0], (list, tuple)):  # loglikelihood: (ll, greedy)
        sample["choices"] = [str(argument[1]) for argument in arguments]
        sample["logliks"] = [float(response[0][0]) for response in responses]
        gold = raw.get("target")
        if isinstance(gold, int) and 0 <= gold < len(sample["choices"]):
            sample["label"], sample["target"] = gold, sample["choices"][gold].strip()
    elif responses and isinstance(responses[0][0], (int, float)):  # loglikelihood_rolling
        sample["loglik"] = float(responses[0][0])
    elif raw.get("filtered_resps"):
        sample["prediction"] = str(raw["filtered_resps"][0])
    suffix = "" if sample["filter"] == "none" else f",{sample['filter']}"
    scores, weights = {}, {}
    for metric in raw.get("metrics", []):
        value = raw.get(metric)
        if isinstance(value, (list, tuple)) and len(value) == 2:  # (loglik, words or bytes)
            weights[metric] = float(value[1])
            if metric == "bits_per_byte":  # the one of them with a per-document meaning
                scores[metric + suffix] = -float(value[0]) / (float(value[1]) * math.log(2))
        elif isinstance(value, (bool, int, float)):
            scores[metric + suffix] = float(value)
    if weights:
        sample["weights"] = weights
    sample["metrics"] = scores
    return sample


def merged_samples(samples: list[dict]) -> list[dict]:
    """One row per document: a task with several filters (gsm8k's strict and flexible) logs
    one entry per filter; their metrics are merged under their filter-qualified names."""
    merged: dict[int, dict] = {}
    for sample in samples:
        row = merged.setdefault(sample["idx"], {**sample, "metrics": {}})
        row["metrics"].update(sample["metrics"])
    for row in merged.values():
        row.pop("filter", None)
    return [merged[idx] for idx in sorted(merged)]


def summary_for(leaf: str, metrics_found: dict, samples: list[dict], **fields) -> dict:
    """The `<task>.json` summary of one leaf. Where lm-eval reports no stderr (N/A for its
    perplexities), a bootstrap over documents gives one: weighted by words or bytes for the
    (loglik, weight) metrics, exactly as lm-eval weights the aggregate."""
    for name, score in metrics_found.items():
        if score["stderr"] != 0.0 or len(samples) < 2:
            continue
        if all(name in s.get("weights", {}) and "loglik" in s for s in samples):
            weights = [s["weights"][name] for s in samples]
            per_unit = [-s["loglik"] / w for s, w in zip(samples, weights)]  # nats per unit
            stderr = metrics.bootstrap_stderr(per_unit, BOOTSTRAP_ITERS, 0, weights=weights)[1]
            # perplexity = exp(nats per unit): delta method; bits_per_byte = nats / ln 2
            scale = score["mean"] if name.endswith("perplexity") else 1 / math.log(2)
            score["stderr"] = scale * stderr
        elif all(name in s["metrics"] for s in samples):
            values = [s["metrics"][name] for s in samples]
            score["stderr"] = metrics.bootstrap_stderr(values, BOOTSTRAP_ITERS, 0)[1]
    return {
        "task": leaf,
        "n": len(samples),
        "metrics": metrics_found,
        "harness": "lm-eval",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
