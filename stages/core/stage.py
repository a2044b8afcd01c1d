"""The stage protocol: what a recipe declares so that the pipeline, the CLI, the report and the model card can use it.

Each recipe module (``stages/sft.py``, ...) ends with ``STAGE = Stage(...)``; ``stages.registry`` lists
those modules. Nothing else keeps a table of stage types: ``lorelay --help`` lists the registered
stages, ``lorelay NAME`` runs one, a pipeline's ``type: NAME`` resolves through the registry, and the
report and the model card take their headline columns and tags from the record.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


# What every stage that trains through ``stages.core.training.fit`` reports (fit, plus the recipe's parameter count).
FIT_METRICS = ("train_loss", "train_runtime_s", "steps", "skipped_nonfinite_steps", "trainable_parameters",
               "total_parameters")


@dataclasses.dataclass(frozen=True)
class Metric:
    """A headline metric: a key of the stage's ``metrics.json``, titled and formatted for tables."""

    key: str
    title: str
    format: str = "{:.3f}"  # "{:.1%}" for rates, "{:d}" for counts

    def render(self, value: Any) -> str:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return ""
        return self.format.format(int(value) if self.format == "{:d}" else value)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One recipe: its name, config, entry point and how it is shown."""

    name: str                      # the pipeline's `type:` and the CLI subcommand (`lorelay sft`)
    config_class: type             # typed dataclass config (stages.core.config)
    run: Callable[..., Path]       # run(config, base, adapter=None) -> the finished output directory
    description: str               # one line, shown by `lorelay --help` (at most 54 characters: one
                                   # line of an 80-column terminal)
    produces_policy: bool          # its adapter is a causal-LM policy: evaluated by the pipeline, the
                                   # start of the next stage's init_from: auto, publishable merged
    produces_reward_model: bool = False  # its output scores replies (the pipeline's default judge)
    headline: tuple[Metric, ...] = ()    # metrics.json keys shown in report.md and on the model card
    card_tags: tuple[str, ...] = ()      # Hub tags of a model this stage trained (its name is always one)
    # every numeric metrics.json key it may report (glob patterns for families such as "eval_*"):
    # the names its gates may use, checked before a pipeline runs
    metrics: tuple[str, ...] = ()
    # preflight(config, skip=path -> bool): read the first rows of every input as run() will, raising
    # DataError/ConfigError; paths for which skip() is true are written by earlier stages, not there yet
    preflight: Callable[..., None] | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", self.name):
            raise ValueError(f"stage name {self.name!r}: lower-case letters, digits, - and _ only")
        if not self.description or "\n" in self.description or len(self.description) > 54:
            raise ValueError(f"stage {self.name!r}: the description is one line of at most 54 characters "
                             "(it shares a line of `lorelay --help` with the subcommand)")
        if not dataclasses.is_dataclass(self.config_class):
            raise TypeError(f"stage {self.name!r}: config_class must be a dataclass")

    @property
    def has_training(self) -> bool:
        """Whether the config has a ``training`` section (output_dir and resume live there, not at the top)."""
        return "training" in {f.name for f in dataclasses.fields(self.config_class)}
