"""``lorelay status RUN_DIR``: what a run holds, whether its files are intact, and what the next run does.

For every stage recorded in ``run.json``: its status and cache key, whether its output directory still
matches the checksums in its manifest (a tampered or missing file is named), and whether running the
pipeline again would re-use it or re-run it, with the inputs that changed (a data file, the config,
lorelay's code, a library version, the base model, an upstream stage). The inputs are recomputed from
the pipeline file without loading the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.core.errors import LorelayError
from stages.core.training import verify_output


def file_check(output_dir: Path) -> str:
    """Return "ok", or what is wrong with a finished stage's files."""
    if not output_dir.exists():
        return "missing"
    try:
        verify_output(output_dir)
    except LorelayError as err:
        return f"damaged: {err.reason}"
    return "ok"


def next_run(run: dict[str, Any], run_dir: Path) -> dict[str, list[str]]:
    """Stage name -> why the next run re-runs it ([] when it would be re-used)."""
    from pipelines.lineage import cache_key, changed_inputs
    from pipelines.plan import load_pipeline, resolve_stage
    from pipelines.revisions import model_key
    from stages.core.default_model import resolve_model_path

    pipeline, _ = load_pipeline(run["pipeline"], [])
    pipeline.run_dir = run_dir
    base = model_key(resolve_model_path(pipeline.base.model.name), pipeline.base.model.revision)
    recorded = {s["name"]: s for s in run.get("stages", [])}
    keys: dict[str, str] = {}
    reasons: dict[str, list[str]] = {}
    for index, entry in enumerate(pipeline.stages):
        planned = resolve_stage(pipeline, index, [], keys, base)
        keys[entry.name] = planned.key
        previous = recorded.get(entry.name) or {}
        if previous.get("key") == planned.key and previous.get("status") in ("done", "cached"):
            reasons[entry.name] = []
        elif previous.get("status") not in ("done", "cached"):
            reasons[entry.name] = [f"it did not finish ({previous.get('status', 'never ran')})"]
        else:
            reasons[entry.name] = changed_inputs(previous.get("inputs"), planned.inputs) or [
                f"its key changed ({cache_key(planned.inputs)[:12]})"]
    return reasons


def status_command(run_dir: str) -> int:
    from rich.console import Console
    from rich.table import Table

    run_dir_path = Path(run_dir)
    path = run_dir_path / "run.json"
    if not path.exists():
        raise LorelayError("not a lorelay run directory (no run.json)", file=run_dir)
    run = json.loads(path.read_text())
    console = Console()
    try:
        plan = next_run(run, run_dir_path)
        plan_note = None
    except LorelayError as err:
        plan, plan_note = {}, f"the next run cannot be predicted: {err}"
    table = Table(title=f"{run.get('name', run_dir)}: {run_dir_path}")
    for column in ("stage", "type", "status", "cache key", "files", "next run"):
        table.add_column(column)
    notes = []
    for stage in run.get("stages", []):
        name = stage["name"]
        files = file_check(run_dir_path / stage.get("output_dir", name))
        reasons = plan.get(name)
        if files != "ok":
            notes.append(f"{name}: files {files}")
            if stage.get("status") in ("done", "cached"):
                reasons = [f"its files are {files.split(':')[0]}", *(reasons or [])]
        if reasons:
            notes.append(f"{name}: re-runs because {'; '.join(reasons)}")
        verdict = "?" if reasons is None else ("re-use" if not reasons else "re-run")
        table.add_row(name, stage.get("type", ""), stage.get("status", ""), (stage.get("key") or "")[:12],
                      files.split(":")[0], verdict)
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=True, markup=False, highlight=False)
    base = run.get("base", {})
    console.print(f"base: {base.get('name')} (key {base.get('revision') or base.get('fingerprint')})",
                  soft_wrap=True, markup=False, highlight=False)
    for name, sha in sorted((run.get("hub_revisions") or {}).items()):
        console.print(f"hub: {name} at commit {sha}", soft_wrap=True, markup=False, highlight=False)
    if plan_note:
        console.print(plan_note, soft_wrap=True, markup=False)
    return 0
