"""What every stage shares around its TRL trainer.

- ``TrainingConfig``: the optimisation settings common to all stages.
- ``trainer_args``: builds a TRL config from it with defaults that are right on both CPU and GPU
  (TRL defaults to bf16 and activation checkpointing, which fail or crawl on CPU).
- ``StageOutput``: the atomic output directory. Work happens in ``<output_dir>.partial/``; the
  finished directory appears by one rename, so an interrupted run never leaves a stage that looks
  finished. ``manifest.json`` records the resolved config, versions, hashes and file checksums.
- Callbacks: rich progress, and the guard against non-finite losses and gradients.
- ``fit``: the one way stages train. Resume from the last verified checkpoint, a checkpoint and a
  clean exit (130) on SIGINT/SIGTERM, checkpoints written aside and renamed into place when whole,
  free disk space checked before each one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from stages import __version__
from stages.core.config import field, to_dict
from stages.core.errors import ConfigError, LorelayError

Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr",
                    "warmup_stable_decay"]


@dataclasses.dataclass
class TrainingConfig:
    output_dir: Path = field(Path("outputs/stage"), help="Where the finished stage is written (atomically).")
    seed: int = field(42, help="Seed for data order, dropout and LoRA initialisation.")
    epochs: float = field(1.0, help="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = field(-1, help="Optimizer steps to run; -1 means use epochs.")
    batch_size: int = field(8, help="Samples per device per micro-batch.")
    gradient_accumulation_steps: int = field(
        1, help="Micro-batches per optimizer step. Global batch = batch_size x accumulation x processes.")
    learning_rate: float = field(2e-4, help="Peak learning rate (LoRA takes ~10x a full fine-tune's).")
    lr_scheduler: Scheduler = field("cosine", help="Learning-rate schedule after warmup.")
    warmup_ratio: float = field(0.05, help="Fraction of steps spent warming up linearly from 0.")
    min_lr_ratio: float = field(0.1, help="Floor of cosine_with_min_lr / warmup_stable_decay, as a fraction of the peak.")
    decay_ratio: float = field(0.1, help="warmup_stable_decay: share of the steps spent in the final decay.")
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    max_grad_norm: float = field(1.0, help="Gradient clipping norm.")
    optimizer: str = field("auto", help="transformers optimizer name; auto: adamw_torch_fused on CUDA, adamw_torch on CPU.")
    logging_steps: int = field(5, help="Log loss and learning rate every N steps.")
    eval_steps: int | None = field(None, help="Evaluate every N steps; None evaluates once at the end.")
    save_steps: int | None = field(None, help="Checkpoint every N steps (for --resume); None saves only the result.")
    save_total_limit: int = field(2, help="Checkpoints kept on disk.")
    early_stopping_patience: int | None = field(None, help="Stop after N evaluations without eval-loss improvement.")
    report_to: list[str] = field(default_factory=list, help="Trackers: tensorboard, wandb (used when installed).")
    resume: bool = field(False, help="Continue from the last checkpoint in <output_dir>.partial.")
    on_nonfinite: Literal["stop", "skip"] = field(
        "stop", help="A NaN/inf loss or gradient: stop, keeping the last good checkpoint, or skip that step "
                     "(counted in metrics.json; 6 bad steps in a row still stop).")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("must be at least 1", field="batch_size")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("must be at least 1", field="gradient_accumulation_steps")
        if self.learning_rate <= 0:
            raise ConfigError("must be positive", field="learning_rate")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="warmup_ratio")
        if not 0.0 <= self.decay_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="decay_ratio")
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ConfigError("early stopping needs periodic evaluation", field="early_stopping_patience",
                              hint="set training.eval_steps")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (issue 7). A no-op in a single process; under ``accelerate launch`` it
    joins (and if needed starts) accelerate's process group, the same one the trainers use."""
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def effective_batch(training) -> dict[str, Any]:
    """What one optimizer step really sees across all processes (recorded in every manifest)."""
    processes = world_size()
    per_device = int(training.batch_size)
    accumulation = int(training.gradient_accumulation_steps)
    return {"world_size": processes, "per_device_batch_size": per_device,
            "gradient_accumulation_steps": accumulation,
            "global_batch_size": per_device * accumulation * processes,
            "learning_rate": training.learning_rate}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): call it before attaching a fresh adapter, so the
    LoRA initialisation, like data order and dropout (seeded by the trainer), follows training.seed."""
    from transformers import set_seed

    set_seed(seed)


def trainer_args(config_class, training: TrainingConfig, base, work_dir: Path, *, has_eval: bool,
                 **stage_args):
    """A TRL config (SFTConfig, DPOConfig, ...) from lorelay's settings for this base and device."""
    import torch

    on_cuda = base.device.startswith("cuda")
    bf16 = base.dtype == torch.bfloat16
    fp16 = base.dtype == torch.float16
    optimizer = training.optimizer
    if optimizer == "auto":
        optimizer = "adamw_torch_fused" if on_cuda else "adamw_torch"
    scheduler_kwargs = {}
    if training.lr_scheduler == "cosine_with_min_lr":
        scheduler_kwargs = {"min_lr_rate": training.min_lr_ratio}
    elif training.lr_scheduler == "warmup_stable_decay":
        scheduler_kwargs = {"num_decay_steps": 0, "min_lr_ratio": training.min_lr_ratio}  # fit() sets the steps
    eval_strategy = "no" if not has_eval else ("steps" if training.eval_steps else "no")
    save_strategy = "steps" if training.save_steps else "no"
    early_stop = training.early_stopping_patience is not None and has_eval
    args = dict(
        output_dir=str(work_dir / "checkpoints"),
        seed=training.seed,
        data_seed=training.seed,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=training.warmup_ratio,  # a float < 1 is read as a ratio of total steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=optimizer,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=training.eval_steps,
        save_strategy="steps" if early_stop else save_strategy,
        save_steps=training.save_steps or training.eval_steps,
        save_total_limit=training.save_total_limit,
        save_only_model=False,
        load_best_model_at_end=early_stop,
        metric_for_best_model="eval_loss" if early_stop else None,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not on_cuda,
        activation_checkpointing=base.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if base.activation_checkpointing else None,
        report_to=available_trackers(training.report_to),
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
    )
    args.update(stage_args)
    return config_class(**args)


def available_trackers(requested: list[str]) -> list[str]:
    """The requested trackers that are installed; a missing one is reported, not fatal."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
    usable = []
    for name in requested:
        if name not in modules:
            raise ConfigError(f"unknown tracker '{name}'", field="training.report_to",
                              hint=f"choose from {', '.join(modules)}")
        if importlib.util.find_spec(modules[name]) is not None:
            usable.append(name)
        else:
            print(f"lorelay: report_to '{name}' is not installed; skipping it (pip install {name})")
    return usable


def callbacks(training: TrainingConfig, *, has_eval: bool, title: str) -> list:
    from transformers import EarlyStoppingCallback

    from stages.core.progress import NonFiniteGuard, RichProgress

    result = [RichProgress(title), NonFiniteGuard(training.on_nonfinite)]
    if training.early_stopping_patience is not None and has_eval:
        result.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    return result


def quiet_trainer(trainer):
    """Drop transformers' print-every-log callback: the rich progress line shows the same numbers."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


# ----------------------------------------------------------------------------------------------
# fit: resume, interruption, numerical guard, atomic checkpoints
# ----------------------------------------------------------------------------------------------

class Interrupted(LorelayError):
    """SIGINT/SIGTERM stopped training at a step boundary; a checkpoint was saved to resume from."""

    exit_code = 130  # the shell's code for "ended by Ctrl-C"; the CLI exits with it


CHECKPOINT_MANIFEST = "lorelay-checkpoint.json"
PENDING_CHECKPOINTS = ".incomplete"  # under checkpoints/: where a checkpoint is written before its rename


def decay_steps(training: TrainingConfig, steps: int) -> int:
    """warmup_stable_decay's decay length in steps: the last ``decay_ratio`` of them, after the warmup."""
    warmup = math.ceil(steps * training.warmup_ratio)
    return min(max(1, round(steps * training.decay_ratio)) if training.decay_ratio > 0 else 0, max(0, steps - warmup))


def _set_decay_steps(trainer, training: TrainingConfig) -> None:
    """Give warmup_stable_decay its decay length, which transformers needs in steps, not as a share."""
    if training.lr_scheduler != "warmup_stable_decay":
        return
    args = trainer.args
    if args.max_steps > 0:
        total = args.max_steps
    else:
        batches = len(trainer.get_train_dataloader())
        total = math.ceil(args.num_train_epochs * max(1, batches // args.gradient_accumulation_steps))
    args.lr_scheduler_kwargs = {**(args.lr_scheduler_kwargs or {}), "num_decay_steps": decay_steps(training, total)}


def fit(trainer, output: "StageOutput", training: TrainingConfig):
    """Run ``trainer.train`` for a stage. Every stage trains through here, so all of them:

    - resume (``training.resume``) from the newest checkpoint in ``<output_dir>.partial/checkpoints``
      whose checksums verify: transformers restores weights, optimizer, scheduler, RNG and the data
      position from it;
    - stop cleanly on SIGINT/SIGTERM: a checkpoint at the end of the current step, then
      ``Interrupted`` (exit 130) saying how to resume; a second signal aborts at once;
    - write each checkpoint into ``checkpoints/.incomplete/`` and rename it into place only when it
      is complete and sealed with checksums, after checking that the disk has room for it;
    - guard against NaN/inf loss or gradients (``training.on_nonfinite``, see ``NonFiniteGuard``).
    """
    from stages.core.progress import CheckpointControl, NonFiniteGuard, NonFiniteLoss

    started = time.time()
    _set_decay_steps(trainer, training)
    resume_from = None
    if training.resume:
        resume_from = last_checkpoint(output.work_dir)
        if resume_from is None:
            _say(f"no complete checkpoint in {output.work_dir / 'checkpoints'}; starting from the first step")
        else:
            _say(f"resuming {output.stage} from {resume_from}")
            _warn_on_changed_settings(resume_from, training)
    guard = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuard)), None)
    if guard is None:
        guard = NonFiniteGuard(training.on_nonfinite)
        trainer.add_callback(guard)
    stop = _StopRequest()
    control = CheckpointControl(guard, stop, before_save=_disk_check(output))
    trainer.add_callback(control)
    patched = _patch(trainer, _save_checkpoint=_atomic_save(trainer, training),
                     training_step=_watched_step(trainer, guard))
    try:
        with stop.installed():
            result = trainer.train(resume_from_checkpoint=resume_from)
            if stop.signal is not None and guard.failure is None and control.error is None:
                _save_final_checkpoint(trainer, output)
    finally:
        _unpatch(trainer, patched)
        trainer.remove_callback(control)
    if guard.failure is not None:
        step, what = guard.failure
        raise NonFiniteLoss(
            f"non-finite {what} at step {step}; training stopped before that step changed the weights. "
            f"{_checkpoint_sentence(output)}",
            hint="lower training.learning_rate, check the data of that step, or set "
                 f"training.on_nonfinite: skip; then {resume_command(output.stage)}")
    if control.error is not None:
        raise control.error
    if stop.signal is not None:
        state = trainer.state
        raise Interrupted(f"{stop.signal} received: stopped at step {state.global_step} of {state.max_steps}. "
                          f"{_checkpoint_sentence(output, 'Checkpoint saved')}", hint=resume_command(output.stage))
    skipped = sum(1 for entry in trainer.state.log_history if "skipped_nonfinite" in entry)
    result.metrics["skipped_nonfinite_steps"] = skipped
    output.mark("train", started)
    return result


def _say(message: str) -> None:
    if is_main_process():
        print(f"lorelay: {message}", file=sys.stderr, flush=True)


def resume_command(stage: str) -> str:
    """How the user continues this stage: the command that ran it plus --resume, when it was the CLI."""
    args = sys.argv[1:]
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("lorelay", "cli.py", "__main__.py") and args:
        if args[0] == "run":
            return f"run the same command again to continue: lorelay {shlex.join(args)}"
        if args[0] == stage:
            return f"resume with: lorelay {shlex.join(args)}{'' if '--resume' in args else ' --resume'}"
    return f"resume with: lorelay {stage} --config CONFIG --resume (or training.resume: true)"


def _checkpoint_sentence(output: "StageOutput", label: str = "Last good checkpoint") -> str:
    checkpoint = last_checkpoint(output.work_dir, quiet=True)
    return f"{label}: {checkpoint}" if checkpoint else "No checkpoint was saved yet"


class _StopRequest:
    """SIGINT/SIGTERM handlers for the duration of training (main thread only; restored afterwards).

    The first signal only sets ``signal``: training stops at the end of the current step, after a
    checkpoint. A second one raises KeyboardInterrupt at once (the CLI exits 130).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: str | None = None

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        _say(f"{self.signal} received: saving a checkpoint at the end of this step, then stopping "
             "(press Ctrl-C again to abort at once, without a checkpoint)")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def _disk_check(output: "StageOutput"):
    """The check ``CheckpointControl`` runs before each checkpoint: None, or the error to stop with."""

    def check(state, model) -> LorelayError | None:
        if not is_main_process():
            return None
        folder = output.work_dir / "checkpoints"
        try:
            check_free_disk(folder, checkpoint_bytes_needed(folder, model),
                            purpose=f"the checkpoint at step {state.global_step}")
        except LorelayError as err:
            return LorelayError(f"{err.reason}; training stopped. {_checkpoint_sentence(output)}",
                                file=err.file, hint=f"free some space, then {resume_command(output.stage)}")
        return None

    return check


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


def _patch(trainer, **methods) -> dict[str, Any]:
    """Set instance attributes that shadow the trainer's methods; returns what to restore."""
    saved = {name: trainer.__dict__.get(name) for name in methods}
    for name, function in methods.items():
        setattr(trainer, name, function)
    return saved


def _unpatch(trainer, saved: dict[str, Any]) -> None:
    for name, previous in saved.items():
        if previous is None:
            trainer.__dict__.pop(name, None)
        else:
            setattr(trainer, name, previous)


def _watched_step(trainer, guard):
    """``training_step`` that shows each micro-batch's loss to the guard (no device sync here)."""
    original = trainer.training_step

    def training_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        guard.observe_loss(loss)
        return loss

    return training_step


def _atomic_save(trainer, training: TrainingConfig):
    """``_save_checkpoint`` that writes into ``checkpoints/.incomplete/checkpoint-N`` and renames the
    folder into place once every file is written, fsynced and listed with its sha256 in
    ``lorelay-checkpoint.json``. A crash mid-save leaves only the pending folder, which no resume
    ever picks (``last_checkpoint`` wants ``checkpoints/checkpoint-N`` with a verified manifest)."""
    from transformers.trainer_utils import rotate_checkpoints

    original = trainer._save_checkpoint

    def save_checkpoint(model, trial):
        run_dir = Path(trainer._get_output_dir(trial))
        name = f"checkpoint-{trainer.state.global_step}"
        pending_root = run_dir / PENDING_CHECKPOINTS
        pending, final = pending_root / name, run_dir / name
        if trainer.args.should_save and pending.exists():
            shutil.rmtree(pending)  # left by a crash: never resumed from, never completed
        trainer.accelerator.wait_for_everyone()
        trainer.args.output_dir = str(pending_root)
        try:
            original(model, trial)
        finally:
            trainer.args.output_dir = str(run_dir)
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            _seal_checkpoint(trainer, pending, final, training)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=trainer.args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)
        trainer.accelerator.wait_for_everyone()

    return save_checkpoint


def _seal_checkpoint(trainer, pending: Path, final: Path, training: TrainingConfig) -> None:
    state = trainer.state
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


def _save_final_checkpoint(trainer, output: "StageOutput") -> None:
    """After a stop request that came too late for a step boundary: make sure the state is saved."""
    newest = last_checkpoint(output.work_dir, quiet=True)
    if newest is None or not newest.endswith(f"checkpoint-{trainer.state.global_step}"):
        trainer._save_checkpoint(trainer.model, trial=None)


def _warn_on_changed_settings(checkpoint: str, training: TrainingConfig) -> None:
    try:
        saved = json.loads((Path(checkpoint) / CHECKPOINT_MANIFEST).read_text()).get("training", {})
    except (OSError, ValueError):
        return
    current = to_dict(training)
    changed = [key for key in current if key not in ("resume", "output_dir")
               and key in saved and saved[key] != current[key]]
    if changed:
        _say("the checkpoint was written with different training settings: "
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
            _say(f"passing over {path}: {problem}")
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
        file = _inside(path, name)
        if file is None or not file.is_file():
            return f"{name} is missing"
        if sha256_of(file) != expected:
            return f"{name} does not match its checksum"
    return None


# ----------------------------------------------------------------------------------------------
# the output directory
# ----------------------------------------------------------------------------------------------

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
    root = Path(__file__).resolve().parent.parent
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


def _inside(directory: Path, name: str) -> Path | None:
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
        file = _inside(directory, name)
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

    def __init__(self, output_dir: str | Path, *, stage: str, resume: bool = False):
        self.output_dir = Path(output_dir)
        self.stage = stage
        self.work_dir = self.output_dir.with_name(self.output_dir.name + ".partial")
        self._staging = self.work_dir / "result"
        self.started = time.time()
        self.timings: dict[str, float] = {}
        if is_main_process():
            self._recover_previous()
        self._check_replaceable()
        if self.work_dir.exists() and not resume:
            if (self.work_dir / "checkpoints").is_dir():
                print(f"lorelay: discarding the checkpoints of an unfinished earlier run in {self.work_dir} "
                      "(pass --resume to continue it instead)", file=sys.stderr)
            if is_main_process():  # under several processes only the main one deletes (issue 7)
                shutil.rmtree(self.work_dir)
        if self._staging.exists():
            if is_main_process():
                shutil.rmtree(self._staging)  # a half-assembled result from a crash is never reused
        check_free_disk(self.work_dir)

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
        return self.output_dir


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
