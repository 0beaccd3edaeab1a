"""The sections of a `kind: pipeline` recipe; `still/pipeline.py` plans and runs it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from still.sections import Section
from still.yaml_errors import KeyPath, Origin


class PipelineStage(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The stage's name: others refer to its run dir as ${stages.NAME.run_dir}.",
    )
    recipe: str | None = Field(None, description="A recipe YAML (relative to this file).")
    inline: dict[str, Any] | None = Field(
        None, description="A recipe written here instead (paths relative to this file)."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted keys set on the stage's recipe, e.g. teacher.ref: "
        "${stages.teacher.run_dir}; these references are the stage's inputs.",
    )

    @model_validator(mode="after")
    def _one_recipe(self):
        if (self.recipe is None) == (self.inline is None):
            raise ValueError("give a stage exactly one of 'recipe' (a file) or 'inline'")
        return self


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
