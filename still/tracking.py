"""Tracking: `metrics.jsonl` in every run dir, W&B runs for training, eval and comparison, and
TensorBoard or any other Trainer tracker, all from the recipe's `track:` section.

One W&B run per run dir. Its config is the resolved recipe (secrets redacted), the run dir
path and lineage.json; its group is the recipe family (the recipe's directory, so every step
of recipes/quickstart/ lands in one group) and its job_type the kind. Training metrics come
from Trainer's own WandbCallback. The final adapter or model becomes a `model` artifact whose
metadata (and a lineage.json inside it) says what it was made from. With no API key, or no
route to W&B, runs are offline and a line says how to `wandb sync` them. A tracking failure
prints one warning and the run goes on without W&B.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, WandbLogModel

from still.errors import StillError
from still.launch import is_main_process
from still.rundir import LINEAGE, RESOLVED_RECIPE, RunDir
from still.secrets import redact as redact_key_shapes
from still.sections import TrackSection, WandbSection

SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Recipe keys whose values are never sent to a tracker, whatever section they are in.
SECRET_KEY = re.compile(r"token|secret|passw|api_?key|credential", re.IGNORECASE)
REDACTED = "<redacted>"
# Parents in lineage.json that can be W&B model artifacts of earlier still runs.
LINEAGE_PARENT_KEYS = ("base", "teacher", "student", "source_run")


# --------------------------------------------------------------------------- metrics.jsonl
class MetricsJsonl(TrainerCallback):
    """Appends every Trainer log (loss, lr, grad norm, eval loss) with throughput to a file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        if self._last_time is not None and tokens > self._last_tokens and "loss" in logs:
            row["tokens_per_s"] = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
            self._last_time, self._last_tokens = now, tokens
        row["num_input_tokens_seen"] = tokens
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- helpers
def warn(what: str, exc: BaseException) -> None:
    """The one line a tracking failure costs: the run itself goes on."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print(
        f"still: warning: W&B {what} failed, continuing without it "
        f"({type(exc).__name__}: {message})",
        file=sys.stderr,
    )


def redact(value, secrets: tuple[str, ...] | None = None):
    """A copy of a config value with secret-named keys, known secret values and key-shaped
    tokens (still/secrets.py) replaced."""
    if secrets is None:
        secrets = tuple(v for v in (os.environ.get(name) for name in SECRET_ENV_VARS) if v)
    if isinstance(value, dict):
        return {
            key: REDACTED if SECRET_KEY.search(str(key)) and item else redact(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        value = redact_key_shapes(value)
    return value


def stable_run_id(run: RunDir) -> str | None:
    """The run dir's tracker id, made once by the main process and reused on --resume."""
    path = run.tracker_run_id_file
    if not path.exists() and is_main_process():
        path.write_text(uuid.uuid4().hex[:12])
    return run.tracker_run_id()


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    return netrc.is_file() and bool(host) and host in netrc.read_text(errors="ignore")


def _reachable(timeout: float = 3.0) -> bool:
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_mode(configured: str) -> str:
    """online / offline / disabled. WANDB_MODE wins; auto is online only with a key and a route."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if configured != "auto":
        return configured
    if not _has_api_key():
        return "offline"
    if not _reachable():
        print("still: W&B is not reachable from here; logging offline instead")
        return "offline"
    return "online"


# --------------------------------------------------------------------------- W&B runs
def start_wandb(
    recipe,
    run_dir: Path,
    *,
    job_type: str,
    name: str | None = None,
    run_id: str | None = None,
    config: dict | None = None,
):
    """Open the W&B run of a recipe's run dir (main process only); None when off or failed.

    The config is the resolved recipe plus `config`; `run_id` resumes that run (--resume).
    """
    settings = recipe.track.wandb
    if settings is None:
        return None
    dumped = recipe.model_dump(mode="json", exclude_none=True, by_alias=True)
    return open_wandb(
        settings,
        run_dir,
        job_type=job_type,
        name=name or recipe.name,
        group=settings.group or run_group(recipe.source_path, recipe.name),
        run_id=run_id,
        config={"recipe": dumped, **(config or {})},
    )


def run_group(source_path: str | None, fallback: str) -> str:
    """Runs of one pipeline (e.g. recipes/quickstart/*) share a tracking group: the recipe's
    directory."""
    return Path(source_path).parent.name if source_path else fallback


def open_wandb(
    settings: WandbSection,
    run_dir: Path,
    *,
    job_type: str,
    name: str,
    group: str | None,
    run_id: str | None = None,
    config: dict | None = None,
):
    """`wandb.init` with still's conventions: files under `run_dir/wandb`, tags, notes, redacted
    config, offline when W&B can't be reached. Never raises: a failure is one warning."""
    if not is_main_process():
        return None
    mode = wandb_mode(settings.mode)
    if mode == "disabled":
        return None
    run_dir = Path(run_dir).resolve()
    try:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        if wandb.run is not None:  # one left open by an earlier run in this process
            wandb.run.finish()
        run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            group=group,
            job_type=job_type,
            tags=redact([job_type, *settings.tags]),
            dir=str(run_dir),
            notes=f"still run dir: {run_dir}",
            mode=mode,
            config=redact({**(config or {}), "run_dir": str(run_dir)}),
        )
    except Exception as exc:  # noqa: BLE001 — no tracking problem may stop a run
        warn("init", exc)
        return None
    if mode == "offline":
        print(f"still: W&B is offline; sync later with `wandb sync {Path(run.dir).parent}`")
    _save_files(run, run_dir)
    return run


def _save_files(run, run_dir: Path) -> None:
    """Redacted copies of the resolved recipe and lineage.json as files of the run."""
    import yaml

    for name, load, dump in (
        (
            RESOLVED_RECIPE,
            yaml.safe_load,
            lambda data: yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
        ),
        (LINEAGE, json.loads, lambda data: json.dumps(data, indent=2)),
    ):
        if not (run_dir / name).is_file():
            continue
        try:
            # a copy inside the run's files dir: what the run had, not what the dir holds later
            text = (run_dir / name).read_text()
            header = "".join(
                f"{line}\n" for line in text.splitlines() if line.startswith("# Resolved from")
            )
            copy = Path(run.dir) / name
            copy.write_text(redact(header) + dump(redact(load(text))))
            run.save(str(copy), base_path=run.dir, policy="now")
        except Exception as exc:  # noqa: BLE001
            warn(f"saving {name}", exc)


def finish_wandb(summary: dict | None = None, *, exit_code: int | None = None) -> None:
    """Close the active W&B run (if any) after adding `summary` to its summary."""
    import wandb

    if wandb.run is None:
        return
    try:
        if summary:
            wandb.run.summary.update(
                {k: v for k, v in summary.items() if isinstance(v, (int, float))}
            )
        wandb.run.finish(exit_code=exit_code)
    except Exception as exc:  # noqa: BLE001
        warn("finish", exc)


class ResilientWandbCallback(WandbCallback):
    """Trainer's W&B callback (metrics, TrainingArguments and model config into the run that
    `start_wandb` opened); a W&B error warns once and turns W&B off instead of ending training."""

    def __init__(self, log_model: str = "false"):
        super().__init__()
        # "end" is logged by `finish_training_run` with lineage; Trainer only does checkpoints.
        self._log_model = (
            WandbLogModel.CHECKPOINT if log_model == "checkpoint" else WandbLogModel.FALSE
        )

    def _guard(self, event: str, *args, **kwargs):
        if self._wandb is None:
            return
        try:
            getattr(super(), event)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            warn(f"logging ({event})", exc)
            self._wandb, self._initialized = None, False

    def on_train_begin(self, *args, **kwargs):
        self._guard("on_train_begin", *args, **kwargs)

    def on_log(self, *args, **kwargs):
        self._guard("on_log", *args, **kwargs)

    def on_save(self, *args, **kwargs):
        self._guard("on_save", *args, **kwargs)

    def on_train_end(self, *args, **kwargs):
        self._guard("on_train_end", *args, **kwargs)

    def on_predict(self, *args, **kwargs):
        self._guard("on_predict", *args, **kwargs)


@dataclass
class Tracking:
    """What a training runner hands to Trainer: `report_to` and `callbacks`."""

    report_to: list[str] = field(default_factory=list)
    callbacks: list[TrainerCallback] = field(default_factory=list)


def start_tracking(recipe, run: RunDir, *, job_type: str, lineage: dict | None = None) -> Tracking:
    """metrics.jsonl always; W&B, TensorBoard and other Trainer trackers as the recipe says."""
    track: TrackSection = recipe.track
    unknown = [name for name in track.report_to if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise StillError(
            f"track.report_to: unknown tracker {unknown[0]!r}",
            hint=f"Trainer supports: {', '.join(sorted(INTEGRATION_TO_CALLBACK))}",
        )
    tracking = Tracking(report_to=list(track.report_to), callbacks=[MetricsJsonl(run.metrics_file)])
    if track.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise StillError(
                "track.tensorboard needs the tensorboard package", hint="pip install tensorboard"
            ) from None
        board = TensorBoardCallback()
        board.logging_dir = str(run.path / "tensorboard")
        tracking.callbacks.append(board)
    if track.wandb is not None:
        wandb_run = start_wandb(
            recipe,
            run.path,
            job_type=job_type,
            run_id=stable_run_id(run),
            config={"lineage": lineage} if lineage else None,
        )
        if wandb_run is not None:
            tracking.callbacks.append(ResilientWandbCallback(track.wandb.log_model))
    return tracking


# --------------------------------------------------------------------------- model artifacts
def artifact_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def still_run_artifact(ref) -> str | None:
    """`<name>:latest` when `ref` is a still run dir (whose final model is artifact <name>)."""
    if isinstance(ref, str) and RunDir(ref).lineage_file.is_file():
        return f"{artifact_name(Path(ref).resolve().name)}:latest"
    return None


def lineage_parents(lineage: dict) -> list[str]:
    """The model artifacts of the parents (base, teacher, student, source_run) that are
    still runs."""
    parents = [still_run_artifact(lineage.get(key)) for key in LINEAGE_PARENT_KEYS]
    return list(dict.fromkeys(parent for parent in parents if parent))


def use_artifacts(run, names: list[str]) -> None:
    """Online only: mark artifacts as inputs of `run` (W&B draws lineage from these edges)."""
    if run is None or run.offline:
        return
    for name in names:
        try:
            run.use_artifact(name)
        except Exception as exc:  # noqa: BLE001 — e.g. a parent that was never tracked in W&B
            warn(f"use_artifact {name}", exc)


def log_model_artifact(
    path: Path,
    *,
    name: str,
    lineage: dict,
    aliases: tuple[str, ...] = (),
    metadata: dict | None = None,
    run=None,
    parents: dict | None = None,
):
    """Log a model dir as a W&B `model` artifact carrying its lineage; None if not logged.

    Online, parents that are artifacts of earlier still runs are also marked as used, which
    draws the base → teacher → student → published graph; they are found from `parents` (the
    LINEAGE_PARENT_KEYS as local paths) when given, else from the lineage itself. Offline runs
    cannot do that; the lineage rides along in the metadata and `python -m still.tracking link`
    adds it after sync.
    """
    import wandb

    run = run or wandb.run
    if run is None:
        return None
    try:
        artifact = wandb.Artifact(
            artifact_name(name),
            type="model",
            metadata=redact({"lineage": lineage, **(metadata or {})}),
        )
        artifact.add_dir(str(path))
        with artifact.new_file("lineage.json", mode="w", encoding="utf-8") as handle:
            json.dump(redact(lineage), handle, indent=2)
        use_artifacts(run, lineage_parents(parents or lineage))
        return run.log_artifact(artifact, aliases=list(aliases))
    except Exception as exc:  # noqa: BLE001
        warn("model artifact", exc)
        return None


def finish_training_run(run: RunDir, summary: dict) -> None:
    """After the final save: the model artifact (unless `log_model: false`), the summary, finish."""
    import wandb

    if wandb.run is None:
        return
    saved = run.saved_model()
    lineage = run.read_lineage()
    settings = recorded_wandb_settings(run)
    if saved is not None and settings.get("log_model", "end") != "false":
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        log_model_artifact(
            saved,
            name=run.name,
            lineage=lineage,
            aliases=("final",),
            metadata={"kind": lineage.get("kind"), "format": saved.name, "summary": numbers},
        )
    # Trainer already logged the final eval as eval/*; add what it did not (e.g. steps).
    finish_wandb({k: v for k, v in summary.items() if not k.startswith("eval_")})


def log_published_model(
    out_dir: Path, lineage: dict, *, source_run_dir: Path, parents: dict | None = None
) -> None:
    """For `still publish`: if the source run was tracked in W&B, a `publish` run in its project
    and group that logs the published dir as a `model` artifact (alias `published`). A
    published lineage names its parents without absolute paths; `parents` gives their local
    paths for the artifact links."""
    source = RunDir(source_run_dir)
    settings = recorded_wandb_settings(source)
    if not settings:
        return
    wandb_settings = WandbSection(
        **{k: v for k, v in settings.items() if k in WandbSection.model_fields}
    )
    group = wandb_settings.group or run_group(source.recipe_source(), source.name)
    # W&B's files go next to the source run's, never into the published dir itself
    run = open_wandb(
        wandb_settings,
        source.path,
        job_type="publish",
        name=f"publish-{Path(out_dir).name}",
        group=group,
        config={"lineage": lineage, "published_dir": str(Path(out_dir).resolve())},
    )
    if run is not None:
        log_model_artifact(
            out_dir,
            name=Path(out_dir).name,
            lineage=lineage,
            aliases=("published",),
            metadata={"kind": "published"},
            run=run,
            parents=parents,
        )
        finish_wandb()


def recorded_wandb_settings(run: RunDir) -> dict:
    return (run.recipe_data().get("track") or {}).get("wandb") or {}
