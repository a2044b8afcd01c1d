"""Cache keys and ``run.json``: what makes a stage's output reusable, and the record of a run.

A stage is keyed by a hash of its inputs (``cache_inputs``): its resolved config, the hashes of the
data it reads (memoised by path, size and times), the commits of the Hub datasets it reads, its
parents' keys, the base fingerprint (weights hash, or Hub commit), lorelay's code and the library
versions (``pipelines.revisions``). A stage whose key matches a finished,
checksum-verified output is skipped ("cached"); a changed stage re-runs, and so do its descendants,
because their parent key changed. ``run.json`` is rewritten atomically after every change.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import __version__
from pipelines.revisions import code_fingerprint, hub_datasets, library_versions, resolve_revision
from stages.core.config import to_dict
from stages.core.data import data_hash
from stages.core.errors import LorelayError
from stages.core.training import git_commit, is_main_process, package_versions, verify_output

if TYPE_CHECKING:
    from pipelines.plan import PipelineConfig

VOLATILE_KEYS = {"output_dir", "resume", "restart", "report_to", "logging_steps"}


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


def cache_inputs(stage_type: str, config: Any, parent_keys: list[str], fingerprint: str, run_dir: Path) -> dict:
    """Everything a stage's result depends on, each part hashed: the key is the hash of all of them, and
    ``lorelay status`` names the parts that changed when a stage will re-run."""
    from stages import registry

    resolved = _without_volatile(to_dict(config))
    # The model section is covered by the base fingerprint; hashing a local model directory again would be slow.
    data_files = _data_files({k: v for k, v in resolved.items() if k != "model"}, run_dir)
    hub = {f"{name}@{revision or 'main'}": resolve_revision(name, revision, "dataset")
           for name, revision in hub_datasets(resolved)}
    config_hash = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()
    return {"type": stage_type, "config": config_hash, "data": data_files, "hub": hub, "parents": parent_keys,
            "base": fingerprint, "code": code_fingerprint(registry.get(stage_type)), "libraries": library_versions()}


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def changed_inputs(previous: dict | None, current: dict) -> list[str]:
    """Readable reasons a stage's key changed: which input differs from the recorded one."""
    if not previous:  # a run.json written before inputs were recorded
        return ["its config, data or base model changed"]
    reasons = []
    for part in ("type", "config", "base", "code", "parents"):
        if previous.get(part) != current.get(part):
            reasons.append({"parents": "an upstream stage changed", "code": "lorelay's code changed",
                            "base": "the base model changed", "config": "its config changed",
                            "type": "its type changed"}[part])
    for part, label in (("data", "data file"), ("hub", "Hub dataset"), ("libraries", "library")):
        before, now_ = previous.get(part) or {}, current.get(part) or {}
        for name in sorted(set(before) | set(now_)):
            if before.get(name) != now_.get(name):
                detail = f" {before.get(name)} -> {now_.get(name)}" if part == "libraries" else " changed"
                reasons.append(f"{label} {name}{detail}")
    return reasons


class Lineage:
    """``run.json``: rewritten atomically after every change."""

    def __init__(self, pipeline: PipelineConfig, pipeline_path: str | Path, base):
        self.path = Path(pipeline.run_dir) / "run.json"
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.previous_stages = {s["name"]: s for s in previous.get("stages", [])}
        self.previous_base_eval = previous.get("base_evaluation")
        self.data = {
            "name": pipeline.name, "pipeline": str(pipeline_path), "created": previous.get("created") or now(),
            "updated": now(), "lorelay_version": __version__, "git_commit": git_commit(),
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
        self.data["updated"] = now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(temporary, self.path)


def now() -> str:
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

