"""The pipeline runner: one base model, a chain of stages, a content-addressed cache, lineage.

A pipeline file (``configs/pipelines/NAME.yaml``) has a shared ``base`` section (model, LoRA
defaults) and an ordered list of stages. The runner

1. loads the base **once** and hands the same object to every stage (each stage puts its adapter
   on it and takes it off again);
2. resolves each stage's config: pipeline base < the stage's config file < inline ``settings`` <
   command-line ``stage.key=value``; output directories are fixed under the run directory;
3. keys each stage by a hash of its resolved config, the hashes of the data it reads, its parents'
   keys, the base fingerprint and the lorelay version. A stage whose key matches a finished,
   checksum-verified output is skipped ("cached"); a changed stage re-runs, and so do its
   descendants, because their parent key changed;
4. evaluates each policy (task accuracy, held-out perplexity, generations for win rates), checks
   the stage's gates, and records everything in ``run.json`` after every stage, atomically;
5. writes the report (``report.md`` + plots) and, when configured and every gate passed, pushes.

Stage outputs appear by rename (see ``stages.core.training.StageOutput``), so a run killed mid-stage
never leaves a stage that looks finished; running the same command again continues from the last
finished stage, and from that stage's last checkpoint when it had saved any.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from stages import __version__
from stages.core.config import (apply_overrides, deep_merge, field, from_dict, load_config, read_yaml,
                           to_dict)
from stages.core.data import data_hash
from stages.core.errors import ConfigError, LorelayError, did_you_mean
from stages.core.modeling import LoraSettings, ModelConfig, load_base
from stages.core.training import barrier, git_commit, is_main_process, package_versions, verify_output

StageType = Literal["cpt", "sft", "rm", "generate", "dpo"]
POLICY_TYPES = ("cpt", "sft", "dpo")
STAGE_MODULES = {
    "cpt": ("stages.cpt", "CPTConfig"),
    "sft": ("stages.sft", "SFTConfig"),
    "rm": ("stages.reward", "RewardConfig"),
    "generate": ("stages.generate", "GenerateConfig"),
    "dpo": ("stages.dpo", "DPOConfig"),
}


# ----------------------------------------------------------------------------------------------
# the pipeline file
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BaseSection:
    model: ModelConfig = field(default_factory=ModelConfig, help="The one base model every stage shares.")
    lora: LoraSettings = field(default_factory=LoraSettings, help="LoRA defaults; a stage's own lora keys win.")


@dataclasses.dataclass
class StageEntry:
    name: str = field(help="Unique name; also the stage's directory under the run directory.")
    type: StageType | None = field(None, help="cpt, sft, rm, generate or dpo; defaults to the name.")
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
        if self.type not in STAGE_MODULES:
            raise ConfigError(f"unknown stage type '{self.type}'", field="type",
                              hint=did_you_mean(self.type, STAGE_MODULES) or f"one of {', '.join(STAGE_MODULES)}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ConfigError("stage names may use letters, digits, - and _ only", field="name")


@dataclasses.dataclass
class EvaluationConfig:
    tasks: Path | None = field(None, help="JSONL of {prompt, answer}: exact-match task accuracy of each policy.")
    prompts: Path | None = field(None, help="JSONL of {prompt}: replies judged by the reward model for win rates.")
    perplexity_text: Path | None = field(None, help="Held-out text file: perplexity of each policy.")
    judge: str | None = field(None, help="Name of the reward stage that judges win rates (default: the rm stage).")
    max_new_tokens: int = field(48, help="Reply length for prompts.")
    task_max_new_tokens: int = field(16, help="Reply length for task answers.")
    max_items: int | None = field(None, help="Use only the first N tasks and prompts.")


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
    config = from_dict(PipelineConfig, apply_overrides(data, pipeline_overrides), source=linemap)
    return config, stage_overrides


# ----------------------------------------------------------------------------------------------
# resolving one stage
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PlannedStage:
    entry: StageEntry
    config: Any
    module: Any
    key: str
    parents: list[str]
    adapter_from: str | None
    output_dir: Path


def stage_module(stage_type: str):
    import importlib

    module_name, class_name = STAGE_MODULES[stage_type]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def previous_policy(stages: list[StageEntry], index: int) -> str | None:
    for earlier in reversed(stages[:index]):
        if earlier.type in POLICY_TYPES:
            return earlier.name
    return None


def resolve_stage(pipeline: PipelineConfig, index: int, overrides: list[str], keys: dict[str, str],
                  fingerprint: str) -> PlannedStage:
    entry = pipeline.stages[index]
    run_dir = Path(pipeline.run_dir)
    module, config_class = stage_module(entry.type)
    data: dict[str, Any] = {"model": to_dict(pipeline.base.model), "lora": to_dict(pipeline.base.lora)}
    linemap = None
    if entry.config is not None:
        file_data, linemap = read_yaml(entry.config)
        data = deep_merge(data, file_data)
    data = deep_merge(data, entry.settings)
    data = apply_overrides(data, overrides)
    data["model"] = to_dict(pipeline.base.model)  # one shared base: a recipe's own model section is ignored

    output_dir = run_dir / entry.name
    has_training = "training" in {f.name for f in dataclasses.fields(config_class)}
    if has_training:
        data.setdefault("training", {})["output_dir"] = str(output_dir)
        partial = output_dir.with_name(output_dir.name + ".partial") / "checkpoints"
        data["training"]["resume"] = partial.is_dir() and any(partial.glob("checkpoint-*"))
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
    try:
        config = from_dict(config_class, data, source=linemap)
    except ConfigError as err:
        raise ConfigError(f"stage '{entry.name}': {err.reason}", file=err.file or entry.config, line=err.line,
                          field=err.field, hint=err.hint) from None
    key = cache_key(entry, config, [keys[p] for p in parents], fingerprint, run_dir)
    return PlannedStage(entry, config, module, key, parents, adapter_from, output_dir)


VOLATILE_KEYS = {"output_dir", "resume", "report_to", "logging_steps"}


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def _data_files(value: Any, run_dir: Path) -> dict[str, str]:
    """Content hashes of every existing file or directory a config names (outside the run)."""
    found: dict[str, str] = {}
    if isinstance(value, dict):
        for item in value.values():
            found.update(_data_files(item, run_dir))
    elif isinstance(value, list):
        for item in value:
            found.update(_data_files(item, run_dir))
    elif isinstance(value, str) and value and len(value) < 4096:
        path = Path(value)
        if path.exists() and not path.resolve().is_relative_to(run_dir.resolve()) and path.resolve() != Path.cwd():
            found[value] = data_hash(value)
    return found


def cache_key(entry: StageEntry, config: Any, parent_keys: list[str], fingerprint: str, run_dir: Path) -> str:
    resolved = _without_volatile(to_dict(config))
    # The model section is covered by the base fingerprint; hashing a local model directory again would be slow.
    data_files = _data_files({k: v for k, v in resolved.items() if k != "model"}, run_dir)
    payload = {"type": entry.type, "config": resolved, "data": data_files,
               "parents": parent_keys, "base": fingerprint, "lorelay": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# gates
# ----------------------------------------------------------------------------------------------

GATE = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*(>=|<=|>|<|==)\s*(parent\.[\w./]+|[-+0-9.eE]+)\s*$")
OPERATORS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
             "<": lambda a, b: a < b, "==": lambda a, b: a == b}


class GateFailed(LorelayError):
    """A stage's gate did not hold: the pipeline stops before the next stage."""


def check_gates(stage: str, gates: list[str], metrics: dict[str, Any], parent_metrics: dict[str, Any] | None) -> list[str]:
    """The gates that hold, as readable lines; raises GateFailed on the first that does not."""
    passed = []
    for gate in gates:
        match = GATE.match(gate)
        if not match:
            raise ConfigError(f"gate '{gate}' is not of the form 'metric OP number|parent.metric'",
                              field=f"{stage}.gates")
        name, op, target = match.groups()
        if name not in metrics:
            raise GateFailed(f"stage '{stage}': gate '{gate}' names metric '{name}', which the stage did not report",
                             hint=did_you_mean(name, metrics) or f"available: {', '.join(sorted(metrics))}")
        if target.startswith("parent."):
            parent_name = target.removeprefix("parent.")
            if not parent_metrics or parent_name not in parent_metrics:
                raise GateFailed(f"stage '{stage}': gate '{gate}' needs the parent's '{parent_name}', which is missing")
            bound = parent_metrics[parent_name]
        else:
            bound = float(target)
        value = metrics[name]
        if not OPERATORS[op](value, bound):
            raise GateFailed(f"stage '{stage}' failed its gate '{gate}': {name} = {value:.4g}, needed {op} {bound:.4g}",
                             hint="the pipeline stopped here; later stages did not run")
        passed.append(f"{name} {value:.4g} {op} {bound:.4g}")
    return passed


# ----------------------------------------------------------------------------------------------
# run.json
# ----------------------------------------------------------------------------------------------

class Lineage:
    """``run.json``: rewritten atomically after every change."""

    def __init__(self, pipeline: PipelineConfig, pipeline_path: str | Path, base):
        self.path = Path(pipeline.run_dir) / "run.json"
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.previous_stages = {s["name"]: s for s in previous.get("stages", [])}
        self.previous_base_eval = previous.get("base_evaluation")
        self.data = {
            "name": pipeline.name, "pipeline": str(pipeline_path), "created": previous.get("created") or _now(),
            "updated": _now(), "lorelay_version": __version__, "git_commit": git_commit(),
            "versions": package_versions(),
            "base": {"name": base.config.name, "fingerprint": base.fingerprint, "quantization": base.quantization,
                     "dtype": str(base.dtype).replace("torch.", ""), "device": base.device},
            "policy": None, "stages": [], "base_evaluation": None,
        }

    def record(self, entry: dict[str, Any]) -> None:
        stages = [s for s in self.data["stages"] if s["name"] != entry["name"]]
        self.data["stages"] = stages + [entry]
        self.save()

    def save(self) -> None:
        if not is_main_process():
            return
        self.data["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(temporary, self.path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def is_cached(previous: dict[str, Any] | None, key: str, output_dir: Path) -> bool:
    if not previous or previous.get("key") != key or previous.get("status") not in ("done", "cached"):
        return False
    try:
        verify_output(output_dir)
    except LorelayError:
        return False
    return True


def stage_metrics(output_dir: Path) -> dict[str, Any]:
    path = output_dir / "metrics.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def run_pipeline(pipeline_path: str | Path, overrides: list[str] = (), *, run_dir: str | None = None,
                 force: list[str] = (), console=None) -> Path:
    """Run (or continue) a pipeline; return the run directory."""
    from rich.console import Console

    from pipelines import evaluate, report

    console = console or Console()
    pipeline, stage_overrides = load_pipeline(pipeline_path, list(overrides))
    if run_dir:
        pipeline.run_dir = Path(run_dir)
    unknown = [name for name in [*stage_overrides, *force] if name not in {s.name for s in pipeline.stages}]
    if unknown:
        raise ConfigError(f"no stage named '{unknown[0]}'", field="--force",
                          hint=did_you_mean(unknown[0], [s.name for s in pipeline.stages]))
    run_dir_path = Path(pipeline.run_dir)
    run_dir_path.mkdir(parents=True, exist_ok=True)

    console.rule(f"[bold]lorelay run[/bold] {pipeline.name} -> {run_dir_path}")
    base = load_base(pipeline.base.model)
    console.print(f"base: {base.config.name} ({base.quantization}, {str(base.dtype).replace('torch.', '')}, "
                  f"{base.attn_implementation}, {base.device})")
    lineage = Lineage(pipeline, pipeline_path, base)
    # Every rank has read the previous run.json before the main process rewrites it (issue 7): all
    # ranks then take the same cache, resume and gate decisions.
    barrier()
    evaluator = evaluate.Evaluator(pipeline.evaluation, base, run_dir_path, console)
    lineage.data["base_evaluation"] = evaluator.policy("base", None, lineage.previous_base_eval)
    lineage.save()

    keys: dict[str, str] = {}
    evaluations: dict[str, dict] = {"base": lineage.data["base_evaluation"]}
    for index, entry in enumerate(pipeline.stages):
        barrier()  # stage boundary: the main process has committed the previous stage and run.json
        planned = resolve_stage(pipeline, index, stage_overrides.get(entry.name, []), keys, base.fingerprint)
        keys[entry.name] = planned.key
        previous = lineage.previous_stages.get(entry.name)
        adapter = run_dir_path / planned.adapter_from if planned.adapter_from else None
        record = {"name": entry.name, "type": entry.type, "key": planned.key, "parents": planned.parents,
                  "init_from": planned.adapter_from, "output_dir": entry.name}
        if entry.name not in force and is_cached(previous, planned.key, planned.output_dir):
            console.rule(f"[bold]{entry.name}[/bold] ({entry.type}) cached", style="dim")
            record.update(status="cached", seconds=previous.get("seconds"), started=previous.get("started"))
        else:
            console.rule(f"[bold]{entry.name}[/bold] ({entry.type})" + (" resuming" if _resumes(planned) else ""))
            lineage.record({**record, "status": "running", "started": _now()})
            started = time.time()
            try:
                planned.module.run(planned.config, base, adapter=adapter)
            except BaseException:
                lineage.record({**record, "status": "failed", "seconds": round(time.time() - started, 1)})
                raise
            record.update(status="done", seconds=round(time.time() - started, 1), started=_now())
        record["metrics"] = stage_metrics(planned.output_dir)
        if entry.type in POLICY_TYPES:
            cached_eval = (previous or {}).get("evaluation") if (previous or {}).get("key") == planned.key else None
            record["evaluation"] = evaluator.policy(entry.name, planned.output_dir, cached_eval)
            evaluations[entry.name] = record["evaluation"]
            lineage.data["policy"] = entry.name
        lineage.record(record)
        if entry.gates:
            parent = planned.adapter_from or "base"
            parent_metrics = {**_flat(lineage, parent), **(evaluations.get(parent) or {}).get("metrics", {})}
            metrics = {**record["metrics"], **(record.get("evaluation") or {}).get("metrics", {})}
            try:
                record["gates"] = check_gates(entry.name, entry.gates, metrics, parent_metrics)
            except GateFailed:
                record["gates"] = "failed"
                lineage.record(record)
                report.write_report(run_dir_path, lineage.data, console)
                raise
            lineage.record(record)

    judge = pipeline.evaluation.judge or next((s.name for s in pipeline.stages if s.type == "rm"), None)
    barrier()
    if judge and pipeline.evaluation.prompts and is_main_process():  # reads replies only main wrote
        win_rates = evaluator.win_rates(run_dir_path / judge, lineage.data)
        for stage in lineage.data["stages"]:
            if stage["name"] in win_rates:
                stage.setdefault("evaluation", {}).setdefault("metrics", {}).update(win_rates[stage["name"]])
        lineage.save()
    report.write_report(run_dir_path, lineage.data, console)
    if pipeline.push is not None and is_main_process():
        from pipelines.hub import push_stage

        url = push_stage(run_dir_path / lineage.data["policy"], repo=pipeline.push.repo,
                         private=pipeline.push.private, revision=pipeline.push.revision,
                         merged=pipeline.push.merged, run_info=lineage.data)
        console.print(f"pushed: {url}")
    barrier()  # nobody exits while the main process still writes the report or pushes
    return run_dir_path


def _resumes(planned: PlannedStage) -> bool:
    training = getattr(planned.config, "training", None)
    return bool(training and training.resume)


def _flat(lineage: Lineage, name: str) -> dict[str, Any]:
    for stage in lineage.data["stages"]:
        if stage["name"] == name:
            return stage.get("metrics", {})
    return {}


def run_command(pipeline: str, overrides: list[str], *, run_dir: str | None = None, force: list[str] = ()) -> int:
    run_pipeline(pipeline, overrides, run_dir=run_dir, force=force)
    return 0


def status_command(run_dir: str) -> int:
    from rich.console import Console

    from pipelines.report import summary_table

    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise LorelayError("not a lorelay run directory (no run.json)", file=run_dir)
    Console().print(summary_table(json.loads(path.read_text())))
    return 0
