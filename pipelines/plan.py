"""The pipeline file and the plan it becomes: sections, stage entries, and each stage resolved to a config.

A pipeline file (``configs/pipelines/NAME.yaml``) has a shared ``base`` section (model, LoRA defaults),
an ordered list of stages, what the report evaluates, and where to push. ``resolve_stage`` turns one
entry into a ``PlannedStage``: its registered ``Stage`` (``stages.registry``), its config resolved as
pipeline base < the stage's config file < inline ``settings`` < command-line ``stage.key=value`` with
output directories fixed under the run directory, the adapter it starts from, and its cache key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from pipelines.lineage import cache_inputs, cache_key
from stages import registry
from stages.core.config import Origins, apply_overrides, deep_merge, field, from_dict, read_yaml, to_dict
from stages.core.errors import ConfigError, did_you_mean
from stages.core.judges import JudgeConfig
from stages.core.modeling import LoraSettings, ModelConfig
from stages.core.rewards import RewardSpec
from stages.core.stage import Stage

@dataclasses.dataclass
class BaseSection:
    model: ModelConfig = field(default_factory=ModelConfig, help="The one base model every stage shares.")
    lora: LoraSettings = field(default_factory=LoraSettings, help="LoRA defaults; a stage's own lora keys win.")


@dataclasses.dataclass
class StageEntry:
    name: str = field(help="Unique name; also the stage's directory under the run directory.")
    type: str | None = field(None, help="A registered stage (stages/registry.py: cpt, sft, rm, generate, dpo, ...); "
                                        "defaults to the name.")
    config: Path | None = field(None, help="The stage's YAML recipe (e.g. configs/sft.yaml).")
    settings: dict[str, Any] = field(default_factory=dict, help="Config keys on top of the recipe file.")
    init_from: str | None = field("auto", help="Stage whose adapter this one starts from; auto: the previous "
                                               "policy stage; none: the bare base.")
    inputs: dict[str, str] = field(default_factory=dict, help="Config key -> stage name: the key gets that "
                                                              "stage's output directory (e.g. reward_model: rm).")
    data_from: list[str] = field(default_factory=list, help="Stages whose dataset.jsonl is added to data.datasets.")
    gates: list[str] = field(default_factory=list, help="Conditions on metrics, e.g. 'task_accuracy >= parent.task_accuracy'.")

    def __post_init__(self):
        self.type = self.type or self.name
        registry.get(self.type)  # an unknown type is a ConfigError naming the closest registered one
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ConfigError("stage names may use letters, digits, - and _ only", field="name")


@dataclasses.dataclass
class EvaluationConfig:
    tasks: Path | None = field(None, help="JSONL of {prompt, answer}: exact-match task accuracy of each policy.")
    prompts: Path | None = field(None, help="JSONL of {prompt, ...columns}: replies checked and judged for win rates.")
    perplexity_text: Path | None = field(None, help="Held-out text file: perplexity of each policy.")
    checks: list[RewardSpec] = field(
        default_factory=list, help="Program checks of each policy's replies to `prompts` (fn/args as GRPO's rewards; "
                                   "columns come from the prompt rows): NAME_rate per check, usable in gates, and "
                                   "the check win rate against the parent.")
    judge: JudgeConfig | None = field(
        None, help="An independent pairwise judge: a local model or an OpenAI-compatible endpoint, asked in both "
                   "orders with a fixed rubric (judge_win_rate_vs_parent).")
    reward_model: str | None = field(
        None, help="Reward stage whose opinion is reported too (rm_win_rate_vs_parent; default: the rm stage; "
                   "'none': skip). A stage may have trained against it, so it is labelled as its opinion.")
    max_new_tokens: int = field(48, help="Reply length for prompts.")
    task_max_new_tokens: int = field(16, help="Reply length for task answers.")
    max_items: int | None = field(None, help="Use only the first N tasks and prompts.")
    batch_size: int = field(32, help="Prompts answered together (greedy, left-padded). On a CPU a decoding step "
                                     "costs nearly the same for 8 rows as for 32, so larger batches take fewer steps.")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("must be at least 1", field="batch_size")


@dataclasses.dataclass
class PushConfig:
    repo: str = field(help="OWNER/NAME on the Hub.")
    private: bool = field(True, help="Create the repository private.")
    revision: str | None = field(None, help="Branch to push to.")
    merged: bool = field(False, help="Upload a merged full model instead of the adapter.")


@dataclasses.dataclass
class PipelineConfig:
    name: str = field("run", help="Run name.")
    run_dir: Path | None = field(None, help="Where the run lives; default runs/<name>.")
    base: BaseSection = field(default_factory=BaseSection, help="Shared base model and LoRA defaults.")
    stages: list[StageEntry] = field(default_factory=list, help="Ordered stages.")
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, help="What the report measures.")
    push: PushConfig | None = field(None, help="Push the final policy after every gate passed.")

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("a pipeline needs at least one stage", field="stages")
        names = [s.name for s in self.stages]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"stage name '{duplicate}' is used twice", field="stages")
        for index, stage in enumerate(self.stages):
            earlier = names[:index]
            refs = [stage.init_from] if stage.init_from not in (None, "auto", "none") else []
            refs += list(stage.inputs.values()) + stage.data_from
            for ref in refs:
                if ref not in earlier:
                    raise ConfigError(f"stage '{stage.name}' refers to '{ref}', which is not an earlier stage",
                                      field=f"stages.{index}", hint=did_you_mean(ref, earlier))
        self.run_dir = self.run_dir or Path("runs") / self.name
        self.lines = None  # the pipeline file's line of each key (set by load_pipeline), for stage errors


def load_pipeline(path: str | Path, overrides: list[str]) -> tuple[PipelineConfig, dict[str, list[str]]]:
    """The pipeline config and the per-stage overrides (``sft.training.learning_rate=1e-4``)."""
    data, linemap = read_yaml(path)
    names = [s.get("name") for s in data.get("stages", []) if isinstance(s, dict)]
    pipeline_overrides, stage_overrides = [], {}
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in names and rest:
            stage_overrides.setdefault(head, []).append(rest)
        else:
            pipeline_overrides.append(item)
    config = from_dict(PipelineConfig, apply_overrides(data, pipeline_overrides),
                       source=Origins(path).add_file(linemap).add_overrides(pipeline_overrides))
    config.lines = linemap
    return config, stage_overrides


# ----------------------------------------------------------------------------------------------
# resolving one stage
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PlannedStage:
    entry: StageEntry
    config: Any
    stage: Stage
    key: str
    parents: list[str]
    adapter_from: str | None
    output_dir: Path
    inputs: dict  # what the key hashes (pipelines.lineage.cache_inputs)


def previous_policy(stages: list[StageEntry], index: int) -> str | None:
    for earlier in reversed(stages[:index]):
        if registry.get(earlier.type).produces_policy:
            return earlier.name
    return None


def resolve_stage(pipeline: PipelineConfig, index: int, overrides: list[str], keys: dict[str, str],
                  fingerprint: str, *, restart: bool = False) -> PlannedStage:
    entry = pipeline.stages[index]
    run_dir = Path(pipeline.run_dir)
    stage = registry.get(entry.type)
    data: dict[str, Any] = {"model": to_dict(pipeline.base.model), "lora": to_dict(pipeline.base.lora)}
    linemap = None
    if entry.config is not None:
        file_data, linemap = read_yaml(entry.config)
        data = deep_merge(data, file_data)
    data = deep_merge(data, entry.settings)
    data = apply_overrides(data, overrides)
    data["model"] = to_dict(pipeline.base.model)  # one shared base: a recipe's own model section is ignored

    output_dir = run_dir / entry.name
    if stage.has_training:
        data.setdefault("training", {})["output_dir"] = str(output_dir)
        partial = output_dir.with_name(output_dir.name + ".partial") / "checkpoints"
        # Re-running a pipeline continues an interrupted stage; --restart discards its checkpoints instead.
        interrupted = partial.is_dir() and any(partial.glob("checkpoint-*"))
        data["training"]["resume"] = interrupted and not restart
        data["training"]["restart"] = interrupted and restart
    else:
        data["output_dir"] = str(output_dir)
    for key, source in entry.inputs.items():
        apply_overrides(data, [f"{key}={run_dir / source}"])
    for source in entry.data_from:
        data.setdefault("data", {}).setdefault("datasets", []).append(
            {"path": str(run_dir / source / "dataset.jsonl"), "format": "preference"})

    adapter_from = entry.init_from
    if adapter_from == "auto":
        adapter_from = previous_policy(pipeline.stages, index)
    elif adapter_from == "none":
        adapter_from = None
    parents = sorted({p for p in [adapter_from, *entry.inputs.values(), *entry.data_from] if p})
    # An error names where its key was set: the pipeline's base section, the recipe file, the stage's
    # settings or inputs in the pipeline file, or the command line (as the user typed it)
    origins = Origins(entry.config).add_file(pipeline.lines, "base").add_file(linemap)
    origins.add_file(pipeline.lines, f"stages.{index}.settings").add_file(pipeline.lines, f"stages.{index}.inputs")
    origins.add_overrides(overrides, [f"{entry.name}.{item}" for item in overrides])
    try:
        config = from_dict(stage.config_class, data, source=origins)
    except ConfigError as err:
        raise ConfigError(f"stage '{entry.name}': {err.reason}", file=err.file, line=err.line,
                          field=err.field, hint=err.hint) from None
    inputs = cache_inputs(entry.type, config, [keys[p] for p in parents], fingerprint, run_dir)
    return PlannedStage(entry, config, stage, cache_key(inputs), parents, adapter_from, output_dir, inputs)
