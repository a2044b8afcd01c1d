"""The pipeline runner: one base model, a chain of stages, a content-addressed cache, lineage.

A pipeline file (``configs/pipelines/NAME.yaml``) has a shared ``base`` section (model, LoRA
defaults) and an ordered list of stages. The runner

1. loads the base **once** and hands the same object to every stage (each stage puts its adapter
   on it and takes it off again);
2. resolves each stage (``pipelines.plan``): its registered ``Stage`` (``stages.registry``) and its
   config: pipeline base < the stage's config file < inline ``settings`` < command-line
   ``stage.key=value``; output directories are fixed under the run directory;
3. keys each stage by its resolved config, data, parents and base (``pipelines.lineage``). A stage
   whose key matches a finished, checksum-verified output is skipped ("cached"); a changed stage
   re-runs, and so do its descendants, because their parent key changed;
4. evaluates each policy (``pipelines.evaluate``: task accuracy, held-out perplexity, generations for
   win rates), checks the stage's gates (``pipelines.gates``), and records everything in ``run.json``
   after every stage, atomically;
5. writes the report (``report.md`` + plots) and, when configured and every gate passed, pushes.

Stage outputs appear by rename (see ``stages.core.training.StageOutput``), so a run killed mid-stage
never leaves a stage that looks finished; running the same command again continues from the last
finished stage, and from that stage's last checkpoint when it had saved any.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipelines.gates import GateFailed, check_gates
from pipelines.lineage import Lineage, changed_inputs, is_cached, now, stage_metrics
from pipelines.plan import PlannedStage, load_pipeline
from pipelines.validate import RunPlan, check_pipeline, print_plan
from stages import registry
from stages.core.errors import LorelayError
from stages.core.locks import lock_directory
from stages.core.modeling import load_base
from stages.core.storage import disk_faults
from stages.core.training import barrier, is_main_process

__all__ = ["GateFailed", "load_pipeline", "run_pipeline", "run_command", "status_command"]


def run_pipeline(pipeline_path: str | Path, overrides: list[str] = (), *, run_dir: str | None = None,
                 force: list[str] = (), restart: bool = False, console=None, dry_run: bool = False) -> Path:
    """Run (or continue) a pipeline; return the run directory.

    Every stage is checked first (``pipelines.validate``): a mistake in any stage stops the run before
    the base model loads. ``dry_run`` prints the plan (cached, to run and why) and stops there.

    The run directory is locked for the whole run (``stages.core.locks``): a second ``lorelay run`` on it
    stops at once, naming this one. ``restart``: a stage that re-runs discards the checkpoints an
    interrupted earlier run left, instead of resuming from them.
    """
    from rich.console import Console

    console = console or Console()
    plan = check_pipeline(pipeline_path, list(overrides), run_dir=run_dir, force=force, restart=restart)
    if dry_run:
        print_plan(plan, console)
        return plan.run_dir
    run_dir_path = plan.run_dir
    run_dir_path.mkdir(parents=True, exist_ok=True)
    lock = lock_directory(run_dir_path, purpose="run directory") if is_main_process() else None
    try:
        return _run(plan, pipeline_path, force, console)
    finally:
        if lock is not None:
            lock.release()


def _run(plan: RunPlan, pipeline_path, force, console) -> Path:
    from pipelines import evaluate, report

    pipeline, run_dir_path = plan.pipeline, plan.run_dir

    console.rule(f"[bold]lorelay run[/bold] {pipeline.name} -> {run_dir_path}")
    base = load_base(pipeline.base.model)
    console.print(f"base: {base.config.name} ({base.quantization}, {str(base.dtype).replace('torch.', '')}, "
                  f"{base.attn_implementation}, {base.device})")
    lineage = Lineage(pipeline, pipeline_path, base)
    lineage.data["base"]["revision"] = plan.fingerprint  # a Hub base by the commit its revision names today
    if plan.fingerprint != base.fingerprint:
        lineage.data.setdefault("hub_revisions", {})[f"model:{base.path}"] = plan.fingerprint.rpartition("@")[2]
    # Every rank has read the previous run.json before the main process rewrites it (issue 7): all
    # ranks then take the same cache, resume and gate decisions.
    barrier()
    evaluator = evaluate.Evaluator(pipeline.evaluation, base, run_dir_path, console)
    lineage.data["base_evaluation"] = evaluator.policy("base", None, lineage.previous_base_eval)
    lineage.save()

    evaluations: dict[str, dict] = {"base": lineage.data["base_evaluation"]}
    for index, entry in enumerate(pipeline.stages):
        barrier()  # stage boundary: the main process has committed the previous stage and run.json
        planned = plan.stages[index].planned  # resolved once, by check_pipeline
        previous = lineage.previous_stages.get(entry.name)
        adapter = run_dir_path / planned.adapter_from if planned.adapter_from else None
        record = {"name": entry.name, "type": entry.type, "key": planned.key, "parents": planned.parents,
                  "init_from": planned.adapter_from, "output_dir": entry.name, "inputs": planned.inputs}
        lineage.data.setdefault("hub_revisions", {}).update(
            {f"dataset:{name}": sha for name, sha in planned.inputs["hub"].items()})
        if entry.name not in force and is_cached(previous, planned.key, planned.output_dir):
            console.rule(f"[bold]{entry.name}[/bold] ({entry.type}) cached", style="dim")
            record.update(status="cached", seconds=previous.get("seconds"), started=previous.get("started"))
        else:
            console.rule(f"[bold]{entry.name}[/bold] ({entry.type})" + (" resuming" if _resumes(planned) else ""))
            if previous and previous.get("key") != planned.key and entry.name not in force:
                console.print(f"re-runs: {'; '.join(changed_inputs(previous.get('inputs'), planned.inputs))}",
                              style="dim", markup=False)
            lineage.record({**record, "status": "running", "started": now()})
            started = time.time()
            try:
                with disk_faults(planned.output_dir, field=f"stages.{index}"):
                    planned.stage.run(planned.config, base, adapter=adapter)
            except BaseException:
                lineage.record({**record, "status": "failed", "seconds": round(time.time() - started, 1)})
                raise
            record.update(status="done", seconds=round(time.time() - started, 1), started=now())
        record["metrics"] = stage_metrics(planned.output_dir)
        if planned.stage.produces_policy:
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

    reward_stage = pipeline.evaluation.reward_model or next(
        (s.name for s in pipeline.stages if registry.get(s.type).produces_reward_model), None)
    reward_stage = None if reward_stage == "none" else reward_stage
    lineage.data["checks"] = [check.name for check in evaluator.checks]
    barrier()
    if pipeline.evaluation.prompts and is_main_process():  # reads replies only main wrote
        win_rates = evaluator.win_rates(lineage.data, run_dir_path / reward_stage if reward_stage else None)
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


def run_command(pipeline: str, overrides: list[str], *, run_dir: str | None = None, force: list[str] = (),
                restart: bool = False, dry_run: bool = False) -> int:
    run_pipeline(pipeline, overrides, run_dir=run_dir, force=force, restart=restart, dry_run=dry_run)
    return 0


def status_command(run_dir: str) -> int:
    from pipelines.status import status_command as show

    return show(run_dir)
