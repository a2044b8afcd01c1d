"""Check a whole pipeline before the base model loads, and say what a run will do.

``lorelay run`` calls ``check_pipeline`` first. It resolves **every** stage and checks, in seconds:

- the pipeline file, each recipe file, inline settings and command-line overrides against the typed
  configs (an override is blamed as an override, a setting on its line of the pipeline file);
- that ``init_from``, ``inputs`` and ``data_from`` name earlier stages that make what is asked of them;
- that every gate parses and names a metric its stage (or, for ``parent.X``, its parent) reports;
- each stage's data: a quick read of the first rows of every dataset, as the stage will read it
  (files that earlier stages write are not there yet and are skipped);
- the base model's files (a local directory with readable safetensors, or a Hub id), the
  evaluation files, and that the run directory can be created and written.

A mistake in the last stage is then found before the first one trains. The result is a ``RunPlan``:
each stage resolved once (the runner executes these, it does not resolve again), whether it will
come from the cache, run or resume, and why. ``lorelay run --dry-run`` prints it and stops.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pipelines.gates import GATE
from pipelines.lineage import changed_inputs, is_cached
from pipelines.plan import PipelineConfig, PlannedStage, load_pipeline, resolve_stage
from pipelines.revisions import model_key
from stages import registry
from stages.core.errors import ConfigError, DataError, LorelayError, did_you_mean
from stages.core.modeling import check_model_files
from stages.core.storage import check_output_dir, check_writable_dir

EVALUATION_METRICS = {"task_accuracy": "tasks", "heldout_perplexity": "perplexity_text"}


@dataclasses.dataclass
class StagePlan:
    planned: PlannedStage
    action: str   # "cached", "run" or "resume"
    reason: str


@dataclasses.dataclass
class RunPlan:
    pipeline: PipelineConfig
    path: Path
    model_path: str
    fingerprint: str
    stages: list[StagePlan]

    @property
    def run_dir(self) -> Path:
        return Path(self.pipeline.run_dir)


def check_pipeline(pipeline_path: str | Path, overrides: list[str] = (), *, run_dir: str | None = None,
                   force: list[str] = (), restart: bool = False) -> RunPlan:
    """Validate every stage of the pipeline without loading a model; the plan of the run.

    ``restart``: stages that re-run discard an interrupted run's checkpoints (``lorelay run --restart``).
    """
    pipeline, stage_overrides = load_pipeline(pipeline_path, list(overrides))
    if run_dir:
        pipeline.run_dir = Path(run_dir)
    names = [s.name for s in pipeline.stages]
    unknown = [name for name in [*stage_overrides, *force] if name not in names]
    if unknown:
        raise ConfigError(f"no stage named '{unknown[0]}'", field="--force" if unknown[0] in force else None,
                          hint=did_you_mean(unknown[0], names) or f"stages: {', '.join(names)}")
    run_path = Path(pipeline.run_dir)
    check_writable_dir(run_path, field="run_dir", what="run directory")
    for name in names:
        check_output_dir(run_path / name, field=f"stages.{names.index(name)}.name")
    model_path, _ = check_model_files(pipeline.base.model)
    base_fingerprint = model_key(model_path, pipeline.base.model.revision)
    lines = pipeline.lines
    previous = _previous_stages(run_path)

    keys: dict[str, str] = {}
    plans: list[StagePlan] = []
    for index, entry in enumerate(pipeline.stages):
        planned = resolve_stage(pipeline, index, stage_overrides.get(entry.name, []), keys, base_fingerprint,
                                restart=restart)
        keys[entry.name] = planned.key
        _check_links(pipeline, index, planned, lines)
        _check_gates(pipeline, index, planned, lines)
        action, reason = _decide(planned, previous.get(entry.name), force, plans)
        if action != "cached":  # a cached stage reads no data: an unchanged run opens no data file
            will_run = {p.planned.entry.name for p in plans if p.action != "cached"} | {entry.name}
            _sample_inputs(planned, _written_by(run_path, will_run))
        plans.append(StagePlan(planned, action, reason))
    _check_evaluation(pipeline, lines)
    return RunPlan(pipeline, Path(pipeline_path), model_path, base_fingerprint, plans)


# ----------------------------------------------------------------------------------------------
# what each stage takes from the others
# ----------------------------------------------------------------------------------------------

def _check_links(pipeline: PipelineConfig, index: int, planned: PlannedStage, lines) -> None:
    entry = planned.entry
    by_name = {s.name: registry.get(s.type) for s in pipeline.stages[:index]}
    prefix = f"stages.{index}"
    if planned.adapter_from is not None:
        source = by_name[planned.adapter_from]
        if not (source.produces_policy or source.produces_reward_model):
            raise ConfigError(f"stage '{entry.name}' starts from '{planned.adapter_from}', a {source.name} stage "
                              "that trains no adapter", file=lines.source, line=lines.line(f"{prefix}.init_from"),
                              field=f"{prefix}.init_from", hint="name a policy stage, or none for the bare base")
    for key, name in entry.inputs.items():
        if key == "reward_model" and not by_name[name].produces_reward_model:
            raise ConfigError(f"stage '{entry.name}' takes its reward model from '{name}', a {by_name[name].name} "
                              "stage, not a reward model", file=lines.source, line=lines.line(f"{prefix}.inputs"),
                              field=f"{prefix}.inputs.{key}",
                              hint=_names_of(by_name, lambda s: s.produces_reward_model, "reward stage"))
    for name in entry.data_from:
        if by_name[name].produces_policy or by_name[name].produces_reward_model:
            raise ConfigError(f"stage '{entry.name}' reads data from '{name}', a {by_name[name].name} stage that "
                              "writes no dataset.jsonl", file=lines.source, line=lines.line(f"{prefix}.data_from"),
                              field=f"{prefix}.data_from", hint="data_from names a generate stage")


def _names_of(stages: dict, wanted: Callable, what: str) -> str:
    names = [name for name, stage in stages.items() if wanted(stage)]
    return f"earlier {what}s: {', '.join(names)}" if names else f"no earlier stage is a {what}"


# ----------------------------------------------------------------------------------------------
# gates
# ----------------------------------------------------------------------------------------------

def reported_metrics(stage_type: str | None, pipeline: PipelineConfig) -> tuple[list[str], list[str]]:
    """(metric name patterns a stage's gates can use, evaluation metrics the pipeline measures for it).

    ``None`` is the bare base, which has only evaluation metrics.
    """
    stage = registry.get(stage_type) if stage_type else None
    own = list(stage.metrics) if stage else []
    evaluated = stage is None or stage.produces_policy
    evaluation = pipeline.evaluation
    measured = [name for name, key in EVALUATION_METRICS.items() if evaluated and getattr(evaluation, key) is not None]
    if evaluated and evaluation.prompts is not None:
        measured += [f"{check.name}_rate" for check in evaluation.checks]  # each check's pass rate on the replies
    return own, measured


def _check_gates(pipeline: PipelineConfig, index: int, planned: PlannedStage, lines) -> None:
    entry = planned.entry
    types = {s.name: s.type for s in pipeline.stages}
    parent = planned.adapter_from
    for number, gate in enumerate(entry.gates):
        key = f"stages.{index}.gates.{number}"
        here = {"file": lines.source, "line": lines.line(key), "field": key}
        match = GATE.match(gate)
        if not match:
            raise ConfigError(f"gate '{gate}' is not of the form 'metric OP number' or 'metric OP parent.metric'",
                              hint="OP is one of >= <= > < ==, e.g. 'task_accuracy >= parent.task_accuracy'",
                              **here)
        name, _, target = match.groups()
        _check_metric(name, entry.type, pipeline, f"stage '{entry.name}'", gate, here)
        if target.startswith("parent."):
            _check_metric(target.removeprefix("parent."), types.get(parent) if parent else None, pipeline,
                          f"its parent '{parent or 'base'}'", gate, here)


def _check_metric(name: str, stage_type: str | None, pipeline: PipelineConfig, who: str, gate: str,
                  here: dict) -> None:
    own, measured = reported_metrics(stage_type, pipeline)
    if name in measured or any(fnmatchcase(name, pattern) for pattern in own):
        return
    if stage_type is not None and not own:
        return  # a stage that declares no metrics: its gate is checked against what it reports
    if name in EVALUATION_METRICS and (stage_type is None or registry.get(stage_type).produces_policy):
        raise ConfigError(f"gate '{gate}' needs '{name}', which is measured only when "
                          f"evaluation.{EVALUATION_METRICS[name]} is set", **here)
    choices = [p for p in own if "*" not in p] + measured
    raise ConfigError(f"gate '{gate}' names metric '{name}', which {who} does not report", **here,
                      hint=did_you_mean(name, choices) or f"it reports: {', '.join(own + measured) or 'no metrics'}")


# ----------------------------------------------------------------------------------------------
# data and evaluation files
# ----------------------------------------------------------------------------------------------

def _written_by(run_dir: Path, stages: set[str]) -> Callable[[str], bool]:
    """Whether a path is (under) the output of a stage that this run writes: not readable yet."""
    outputs = [(run_dir / name).resolve() for name in stages]

    def pending(path: str) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved == out or resolved.is_relative_to(out) for out in outputs)

    return pending


def _sample_inputs(planned: PlannedStage, pending: Callable[[str], bool]) -> None:
    preflight = planned.stage.preflight
    if preflight is None:
        return
    try:
        preflight(planned.config, skip=pending)
    except LorelayError as err:
        kind = next(cls for cls in (ConfigError, DataError, LorelayError) if isinstance(err, cls))
        raise kind(f"stage '{planned.entry.name}': {err.reason}", file=err.file, line=err.line, field=err.field,
                   hint=err.hint) from None


def _check_evaluation(pipeline: PipelineConfig, lines) -> None:
    evaluation = pipeline.evaluation
    for key in ("tasks", "prompts", "perplexity_text"):
        path = getattr(evaluation, key)
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError("file not found" if not Path(path).exists() else "not a file", file=lines.source,
                              line=lines.line(f"evaluation.{key}"), field=f"evaluation.{key}",
                              hint=f"{path} does not exist" if not Path(path).exists() else None)
        try:
            with open(path, encoding="utf-8") as handle:
                first = handle.readline()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read it as UTF-8 text ({err})", file=path) from None
        if key != "perplexity_text" and first.strip():
            try:
                row = json.loads(first)
            except json.JSONDecodeError as err:
                raise DataError(f"not JSON Lines: {err.msg}", file=path, line=1) from None
            needed = ("prompt", "answer") if key == "tasks" else ("prompt",)
            missing = [name for name in needed if not isinstance(row, dict) or name not in row]
            if missing:
                raise DataError(f"rows need {' and '.join(needed)}; the first has no '{missing[0]}'", file=path, line=1)
    stage_types = {s.name: registry.get(s.type) for s in pipeline.stages}
    judge_stage = evaluation.reward_model
    if judge_stage not in (None, "none") and not getattr(stage_types.get(judge_stage), "produces_reward_model", False):
        raise ConfigError(f"evaluation.reward_model '{judge_stage}' is not a reward stage of this pipeline",
                          file=lines.source, line=lines.line("evaluation.reward_model"), field="evaluation.reward_model",
                          hint=_names_of(stage_types, lambda s: s.produces_reward_model, "reward stage"))


# ----------------------------------------------------------------------------------------------
# what will run, and why
# ----------------------------------------------------------------------------------------------

def _previous_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / "run.json"
    if not path.is_file():
        return {}
    try:
        return {s["name"]: s for s in json.loads(path.read_text()).get("stages", []) if "name" in s}
    except (OSError, ValueError, TypeError, KeyError):
        return {}  # an unreadable run.json caches nothing; the runner rewrites it


def _decide(planned: PlannedStage, previous: dict[str, Any] | None, force, earlier: list[StagePlan]) -> tuple[str, str]:
    name = planned.entry.name
    training = getattr(planned.config, "training", None)
    resume = "resume" if training is not None and training.resume else "run"
    rerun_parents = [p.planned.entry.name for p in earlier
                     if p.action != "cached" and p.planned.entry.name in planned.parents]
    if name in force:
        return "run", "--force"
    if previous is None:
        return resume, "not run before"
    if previous.get("status") not in ("done", "cached"):
        return resume, f"the last attempt {previous.get('status') or 'did not finish'}"
    if previous.get("key") != planned.key:
        if rerun_parents:
            return resume, f"{', '.join(rerun_parents)} runs again"
        return resume, "; ".join(changed_inputs(previous.get("inputs"), planned.inputs))
    if not is_cached(previous, planned.key, planned.output_dir):
        return resume, "its output is missing or changed since it finished"
    return "cached", "finished with the same config, data and parents"


def print_plan(plan: RunPlan, console) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{plan.pipeline.name}: {plan.path} -> {plan.run_dir}")
    for column in ("stage", "type", "starts from", "action", "why", "key"):
        table.add_column(column, overflow="fold")
    for item in plan.stages:
        planned = item.planned
        table.add_row(Text(planned.entry.name), Text(planned.entry.type), Text(planned.adapter_from or "base"),
                      Text(item.action, style="dim" if item.action == "cached" else "bold"), Text(item.reason),
                      Text(planned.key[:12]))
    console.print(table)
    console.print(Text(f"base: {plan.pipeline.base.model.name} ({plan.model_path}); "
                       f"every stage checked, nothing loaded or trained."))
