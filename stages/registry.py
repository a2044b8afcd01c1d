"""Every stage lorelay knows, in pipeline order: the one table of stage types.

A recipe module declares ``STAGE = stages.core.stage.Stage(...)``; this table maps its name to the
module. Modules are imported when first asked for (recipes import torch lazily, so listing them for
``lorelay --help`` stays fast). The runner, ``lorelay NAME``, the report and the model card read it.

Adding a stage is one line here, e.g. ``"grpo": "stages.grpo",`` (see docs/architecture.md).
"""

from __future__ import annotations

import importlib

from stages.core.errors import ConfigError, LorelayError, did_you_mean
from stages.core.stage import Stage

RECIPES: dict[str, str] = {
    "cpt": "stages.cpt",
    "sft": "stages.sft",
    "rm": "stages.reward",
    "generate": "stages.generate",
    "dpo": "stages.dpo",
    "grpo": "stages.grpo",
}


def names() -> tuple[str, ...]:
    return tuple(RECIPES)


def get(name: str) -> Stage:
    """The stage registered as ``name``; a ConfigError with a suggestion when there is none."""
    if name not in RECIPES:
        raise ConfigError(f"unknown stage type '{name}'", field="type",
                          hint=did_you_mean(name, RECIPES) or f"one of {', '.join(RECIPES)}")
    module = importlib.import_module(RECIPES[name])
    stage = getattr(module, "STAGE", None)
    if not isinstance(stage, Stage) or stage.name != name:
        raise LorelayError(f"module {RECIPES[name]} is registered as stage '{name}' but declares "
                           f"{'STAGE ' + repr(stage.name) if isinstance(stage, Stage) else 'no STAGE'}")
    return stage


def find(name: str | None) -> Stage | None:
    """The stage registered as ``name``, or None (a run.json or manifest may name a stage no longer registered)."""
    return get(name) if name in RECIPES else None


def stages() -> list[Stage]:
    return [get(name) for name in RECIPES]
