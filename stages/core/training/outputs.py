"""A stage's output directory, which appears complete or not at all, and what it records.

Work happens in ``<output_dir>.partial/``; the finished directory appears by one rename, so an
interrupted run never leaves a stage that looks finished. ``manifest.json`` records the resolved
config, versions, hashes and file checksums; ``verify_output`` checks them when a stage is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stages import __version__
from stages.core.config import to_dict
from stages.core.errors import LorelayError
from stages.core.locks import lock_directory
from stages.core.training.args import effective_batch, is_main_process, say


def package_versions() -> dict[str, str]:
    versions = {"lorelay": __version__}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the lorelay checkout that ran this, when it is one."""
    root = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(directory: Path, *, exclude: str = "manifest.json") -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_of(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != exclude}


def inside(directory: Path, name: str) -> Path | None:
    """``directory / name`` when that stays inside ``directory`` (a manifest cannot point elsewhere)."""
    path = directory / name
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return None
    return path


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under ``directory``, so a rename after it publishes whole files."""
    for path in sorted(directory.rglob("*")) + [directory]:
        if path.is_dir():
            fsync_dir(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def fsync_dir(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(descriptor)


def verify_output(directory: str | Path) -> dict[str, Any]:
    """Load a finished stage's manifest and check every file against its recorded checksum."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise LorelayError("not a finished lorelay stage (no manifest.json)", file=directory)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LorelayError(f"manifest.json is not valid JSON ({err.msg})", file=manifest_path, line=err.lineno) from None
    except (OSError, UnicodeDecodeError) as err:
        raise LorelayError(f"cannot read manifest.json ({err})", file=manifest_path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise LorelayError("manifest.json has no file checksums: not a finished lorelay stage", file=manifest_path)
    for name, expected in manifest["files"].items():
        file = inside(directory, name)
        if file is None:
            raise LorelayError(f"manifest.json lists a file outside the stage directory: {name}", file=manifest_path)
        if not file.is_file():
            raise LorelayError(f"file listed in manifest.json is missing: {name}", file=directory)
        if sha256_of(file) != expected:
            raise LorelayError(f"checksum mismatch for {name}: the file changed after the stage finished",
                               file=file)
    return manifest


class StageOutput:
    """An output directory that appears complete or not at all.

    ``work_dir`` (``<output_dir>.partial``) holds checkpoints while training; ``staging`` is where
    the result is assembled (created on first use, so a stage that fails on its input leaves nothing
    behind). ``commit`` writes the manifest, fsyncs, then renames ``staging`` onto ``output_dir``
    (moving any earlier result aside first, and deleting it only afterwards). An existing
    ``output_dir`` that is not a lorelay stage is never replaced.
    """

    def __init__(self, output_dir: str | Path | None, *, stage: str, resume: bool = False, restart: bool = False):
        self.output_dir = stage_output_dir(output_dir, stage)
        self.stage = stage
        self.work_dir = self.output_dir.with_name(self.output_dir.name + ".partial")
        self._staging = self.work_dir / "result"
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self._check_replaceable()
        # Only the main process writes (issue 7), so only it locks; the lock comes before any deletion.
        self._lock = lock_directory(self.output_dir, purpose=f"{stage} output directory") if is_main_process() else None
        try:
            self._prepare(resume=resume, restart=restart)
        except BaseException:
            self.release()
            raise

    def _prepare(self, *, resume: bool, restart: bool) -> None:
        if is_main_process():
            self._recover_previous()
        interrupted = check_interrupted(self.output_dir, resume=resume, restart=restart)
        if is_main_process():
            if interrupted and restart:
                say(f"--restart: discarding the checkpoints of an interrupted earlier run ({interrupted})")
            if self.work_dir.exists() and not resume:
                shutil.rmtree(self.work_dir)  # nothing to resume from in it: leftovers of a crash
            # Litter of interrupted saves is never resumed from: a checkpoint or result half written.
            from stages.core.training.checkpoints import PENDING_CHECKPOINTS

            for litter in (self._staging, self.work_dir / "checkpoints" / PENDING_CHECKPOINTS):
                shutil.rmtree(litter, ignore_errors=True)
        check_free_disk(self.work_dir)

    def release(self) -> None:
        """Let other runs write this output directory again (``commit`` does it when the stage is done)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_replaceable(self) -> None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise LorelayError("the output directory exists and is not a directory; refusing to replace it",
                               file=out, field="training.output_dir")
        if out.is_dir() and not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise LorelayError("the output directory holds files but no lorelay manifest.json; refusing to "
                               "replace what is not a lorelay stage", file=out, field="training.output_dir",
                               hint="choose another training.output_dir, or empty that directory")

    def _recover_previous(self) -> None:
        """Undo the one window a crash can leave in ``commit``: the earlier result moved aside to
        ``<output_dir>.previous`` but the new one not yet in place. The earlier result is whole."""
        previous = self.output_dir.with_name(self.output_dir.name + ".previous")
        if previous.is_dir() and not self.output_dir.exists():
            os.replace(previous, self.output_dir)
        elif previous.exists():
            shutil.rmtree(previous, ignore_errors=True)

    @property
    def staging(self) -> Path:
        self._staging.mkdir(parents=True, exist_ok=True)
        return self._staging

    def mark(self, phase: str, since: float) -> None:
        self.timings[phase] = round(time.time() - since, 3)

    def write_json(self, name: str, data: Any) -> Path:
        path = self.staging / name
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return path

    def commit(self, *, config: Any, base, data_hashes: dict[str, str] | None = None,
               metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
        self.timings["total"] = round(time.time() - self.started, 3)
        manifest = {
            "stage": self.stage,
            "lorelay_version": __version__,
            "config": to_dict(config),
            "base_model": {"name": base.config.name, "path": base.path, "fingerprint": base.fingerprint,
                           "quantization": base.quantization, "dtype": str(base.dtype).replace("torch.", ""),
                           "attn_implementation": base.attn_implementation,
                           "chat_template": base.template_source},
            "data": data_hashes or {},
            "metrics": metrics or {},
            "versions": package_versions(),
            "git_commit": git_commit(),
            "timings": self.timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"effective": effective_batch(config.training)} if hasattr(config, "training") else {}),
            **(extra or {}),
        }
        staging = self.staging
        manifest["files"] = file_checksums(staging)
        write_durably(staging / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
        fsync_tree(staging)
        self._recover_previous()
        self._check_replaceable()
        previous = self.output_dir.with_name(self.output_dir.name + ".previous")
        if self.output_dir.exists():
            os.replace(self.output_dir, previous)
        os.replace(staging, self.output_dir)
        fsync_dir(self.output_dir.parent)
        shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.release()
        return self.output_dir


def stage_output_dir(configured: str | Path | None, stage: str) -> Path:
    """The output directory a stage writes: as configured, else ``outputs/<stage>``."""
    return Path(configured) if configured else Path("outputs") / stage


def check_interrupted(output_dir: str | Path, *, resume: bool, restart: bool) -> str | None:
    """The newest checkpoint an interrupted earlier run left beside ``output_dir`` (None without one).

    Without ``resume`` or ``restart`` such checkpoints are kept and the run is refused: hours of
    training are not discarded by re-running the same command.
    """
    checkpoints = Path(output_dir).with_name(Path(output_dir).name + ".partial") / "checkpoints"
    steps = sorted(int(p.name.rpartition("-")[2]) for p in checkpoints.glob("checkpoint-*")
                   if p.is_dir() and p.name.rpartition("-")[2].isdigit()) if checkpoints.is_dir() else []
    if not steps:
        return None
    newest = f"{checkpoints / f'checkpoint-{steps[-1]}'}"
    if not resume and not restart:
        raise LorelayError(f"an interrupted earlier run left checkpoints here (newest: {newest}); "
                           "they are kept", file=checkpoints.parent,
                           hint="pass --resume to continue from them, or --restart to discard them and start over")
    return newest


def check_free_disk(path: Path, needed_bytes: int = 512 << 20, *, purpose: str = "checkpoints") -> None:
    """Refuse to start writing onto a nearly full disk."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise LorelayError(f"only {free >> 20} MiB free, {needed_bytes >> 20} MiB needed for {purpose}",
                           file=probe)


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return float(math.exp(min(loss, 50.0)))


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
