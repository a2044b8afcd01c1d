"""Checkpoints that are whole or ignored.

Each checkpoint is written into ``checkpoints/.incomplete/checkpoint-N``, sealed with the sha256 of
every file in ``lorelay-checkpoint.json``, fsynced and renamed into place. ``last_checkpoint`` resumes
only from a sealed checkpoint whose files still match their checksums.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from stages.core import compat
from stages.core.config import to_dict
from stages.core.training.args import TrainingConfig, barrier, say
from stages.core.training.outputs import file_checksums, fsync_dir, fsync_tree, inside, sha256_of, write_durably

CHECKPOINT_MANIFEST = "lorelay-checkpoint.json"
PENDING_CHECKPOINTS = ".incomplete"  # under checkpoints/: where a checkpoint is written before its rename


def checkpoint_bytes_needed(folder: Path, model=None) -> int:
    """Room to ask for before writing a checkpoint: twice the last one's size, or an estimate from
    the trainable parameters (fp32 weights plus two Adam moments), and 64 MiB of slack."""
    previous = last_checkpoint(folder.parent, quiet=True)
    if previous is not None:
        size = sum(p.stat().st_size for p in Path(previous).rglob("*") if p.is_file())
    elif model is not None:
        size = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        size = 0
    return 2 * size + (64 << 20)


class AtomicCheckpoints:
    """Checkpoints written into ``checkpoints/.incomplete/checkpoint-N`` and renamed into place once every
    file is written, fsynced and listed with its sha256 in ``lorelay-checkpoint.json``.

    Driven by two public trainer events (``CheckpointControl`` calls them): at a step or epoch end that
    will save, ``begin`` points ``args.output_dir`` at the pending folder, so the trainer's own save writes
    there; ``on_save`` (the trainer's "a checkpoint was saved" event) points it back, seals the checkpoint,
    renames it into place and only then rotates old checkpoints. A crash mid-save leaves only the pending
    folder, which no resume ever picks (``last_checkpoint`` wants ``checkpoints/checkpoint-N`` with a
    verified manifest), and the previous checkpoints untouched.
    """

    def __init__(self, training: TrainingConfig):
        self.training = training
        self.run_dir: Path | None = None  # the real checkpoints folder while args.output_dir points aside

    def begin(self, args, state) -> None:
        run_dir = self.run_dir or Path(args.output_dir)
        pending = run_dir / PENDING_CHECKPOINTS / f"checkpoint-{state.global_step}"
        if args.should_save and pending.exists():
            shutil.rmtree(pending)  # left by a crash: never resumed from, never completed
        barrier()
        self.run_dir = run_dir
        args.output_dir = str(run_dir / PENDING_CHECKPOINTS)

    def finish(self, args, state) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        if self.run_dir is None:
            return
        run_dir = self.restore(args)
        barrier()  # every process has written its part (RNG state, shards)
        if args.should_save:
            name = f"checkpoint-{state.global_step}"
            seal_checkpoint(state, run_dir / PENDING_CHECKPOINTS / name, run_dir / name, self.training)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=False)
        barrier()

    def restore(self, args) -> Path | None:
        """Point ``args.output_dir`` back at the checkpoints folder (also after a failed save)."""
        run_dir, self.run_dir = self.run_dir, None
        if run_dir is not None:
            args.output_dir = str(run_dir)
        return run_dir


def seal_checkpoint(state, pending: Path, final: Path, training: TrainingConfig) -> None:
    """Checksum a written checkpoint (``state``: the trainer's state) and rename it from ``pending`` to ``final``."""
    if state.best_model_checkpoint and Path(state.best_model_checkpoint) == pending:
        state.best_model_checkpoint = str(final)  # transformers recorded the pending path
        state.save_to_json(str(pending / "trainer_state.json"))
    # training_args.bin is a pickle that nothing reads back; keep checkpoints free of it.
    (pending / "training_args.bin").unlink(missing_ok=True)
    manifest = {"step": state.global_step, "max_steps": state.max_steps,
                "training": to_dict(training), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": file_checksums(pending, exclude=CHECKPOINT_MANIFEST)}
    write_durably(pending / CHECKPOINT_MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    fsync_tree(pending)
    replaced = None
    if final.exists():  # the same step saved again (e.g. a stop right after resuming)
        replaced = pending.with_name(pending.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(pending, final)
    fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def save_final_checkpoint(trainer, work_dir: Path, atomic: AtomicCheckpoints) -> None:
    """After a stop request that came too late for a step boundary: make sure the state is saved."""
    newest = last_checkpoint(work_dir, quiet=True)
    if newest is None or not newest.endswith(f"checkpoint-{trainer.state.global_step}"):
        atomic.begin(trainer.args, trainer.state)
        compat.save_checkpoint_now(trainer)
        atomic.finish(trainer.args, trainer.state)


def warn_on_changed_settings(checkpoint: str, training: TrainingConfig) -> None:
    try:
        saved = json.loads((Path(checkpoint) / CHECKPOINT_MANIFEST).read_text()).get("training", {})
    except (OSError, ValueError):
        return
    current = to_dict(training)
    changed = [key for key in current if key not in ("resume", "output_dir")
               and key in saved and saved[key] != current[key]]
    if changed:
        say("the checkpoint was written with different training settings: "
             + ", ".join(f"{key} {saved[key]!r} -> {current[key]!r}" for key in changed)
             + "; the resumed run will not match an uninterrupted one")


def last_checkpoint(work_dir: Path, *, quiet: bool = False) -> str | None:
    """The newest complete checkpoint under ``work_dir/checkpoints`` whose files match their checksums.

    A checkpoint that fails the check (a crash mid-write outside lorelay's rename, a damaged disk) is
    passed over for the next newest one, with a note saying why.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(work_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := pattern.match(p.name))), reverse=True)
    for _step, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if not quiet:
            say(f"passing over {path}: {problem}")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete lorelay checkpoint, or None when it is one."""
    manifest_path = path / CHECKPOINT_MANIFEST
    if not manifest_path.is_file():
        return f"incomplete (no {CHECKPOINT_MANIFEST})"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{CHECKPOINT_MANIFEST} is unreadable"
    if "trainer_state.json" not in files:
        return "no trainer_state.json"
    for name, expected in files.items():
        file = inside(path, name)
        if file is None or not file.is_file():
            return f"{name} is missing"
        if sha256_of(file) != expected:
            return f"{name} does not match its checksum"
    return None

