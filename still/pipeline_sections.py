"""The sections of a `kind: pipeline` recipe; `still/pipeline.py` plans and runs it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from still.sections import Section
from still.yaml_errors import KeyPath, Origin


class PublishStage(Section):
    """`still publish RUN --out OUT ...` as a stage: the options are the command's flags."""

    run: str = Field(description="The run dir to publish, e.g. ${stages.student.run_dir}.")
    out: str = Field(description="The published dir (relative to the cwd, like output_dir).")
    gguf: list[str] = Field(
        default_factory=list,
        description="GGUF files to write too: f16, q8_0, q4_0; q4_k_m, q5_k_m, q6_k (llama.cpp).",
    )
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Of the safetensors.")
    tasks: list[str] = Field(
        default_factory=list,
        description="Task YAMLs to score on (relative to this file; default: the run's "
        "eval_tasks).",
    )
    eval: bool = Field(True, description="Re-score the tasks on the published weights.")
    compare: bool = Field(True, description="Score the base / teacher too, for the card.")
    quick: bool = Field(False, description="Score only the first 32 rows of each task.")
    hub: str | None = Field(None, description="Upload to this hub repo (token from $HF_TOKEN).")
    private: bool = Field(False, description="With hub: create the repo private.")


STAGE_KINDS = ("recipe", "inline", "cache", "publish", "cascade")


class PipelineStage(Section):
    """One stage: a recipe to run (`recipe` or `inline`), or one of the verbs `still cache`,
    `still publish` and `still cascade`."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The stage's name: others refer to its run dir as ${stages.NAME.run_dir}.",
    )
    recipe: str | None = Field(None, description="A recipe YAML (relative to this file).")
    inline: dict[str, Any] | None = Field(
        None, description="A recipe written here instead (paths relative to this file)."
    )
    cache: str | None = Field(
        None,
        description="A distill stage's name: build the teacher cache it reads (`still cache`), "
        "at its distill.teacher_cache; that stage then runs after this one.",
    )
    publish: PublishStage | None = Field(
        None, description="Publish a run (`still publish`): {run, out, gguf, dtype, tasks, ...}."
    )
    cascade: str | dict[str, Any] | None = Field(
        None,
        description="An eval recipe with a cascade: section (a YAML relative to this file, or "
        "the recipe written here) to analyse (`still cascade`).",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted keys set on the stage's recipe, e.g. teacher.ref: "
        "${stages.teacher.run_dir}; these references are the stage's inputs.",
    )

    @model_validator(mode="after")
    def _one_kind(self):
        given = [name for name in STAGE_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give a stage exactly one of 'recipe' (a file), 'inline', 'cache', 'publish' "
                f"or 'cascade'{f', not {given[0]} and {given[1]}' if len(given) > 1 else ''}"
            )
        if self.overrides and given[0] in ("cache", "publish"):
            raise ValueError(f"overrides apply to a recipe; a {given[0]} stage has none")
        return self

    @property
    def does(self) -> str:
        """Which of STAGE_KINDS this stage is."""
        return next(name for name in STAGE_KINDS if getattr(self, name) is not None)


class PipelineRecipe(Section):
    """Stages run in order of their references (`still/pipeline.py`)."""

    kind: Literal["pipeline"]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The pipeline's name.")
    stages: list[PipelineStage] = Field(min_length=1, description="The stages, in order.")
    _source: str | None = PrivateAttr(None)
    _origins: dict[KeyPath, Origin] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [stage.name for stage in self.stages]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"stage name '{twice[0]}' is used twice")
        return self

    @property
    def source_path(self) -> str | None:
        return self._source
