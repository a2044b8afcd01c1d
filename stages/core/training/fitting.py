"""``fit``: the one way stages train.

Resume from the last verified checkpoint, a checkpoint and a clean exit (130) on SIGINT/SIGTERM,
checkpoints written aside and renamed into place when whole, free disk space checked before each one,
and the guard against non-finite losses and gradients.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from stages.core import compat
from stages.core.errors import LorelayError
from stages.core.training.args import TrainingConfig, is_main_process, say, say_if_not_sharded
from stages.core.training.checkpoints import (AtomicCheckpoints, checkpoint_bytes_needed, last_checkpoint,
                                              save_final_checkpoint, warn_on_changed_settings)
from stages.core.training.outputs import StageOutput, check_free_disk


class Interrupted(LorelayError):
    """SIGINT/SIGTERM stopped training at a step boundary; a checkpoint was saved to resume from."""

    exit_code = 130  # the shell's code for "ended by Ctrl-C"; the CLI exits with it


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


def fit(trainer, output: StageOutput, training: TrainingConfig):
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
    from stages.core.training.trainer_callbacks import CheckpointControl, NonFiniteGuard, NonFiniteLoss

    started = time.time()
    _set_decay_steps(trainer, training)
    say_if_not_sharded()
    compat.keep_trainables_in_compute_dtype(trainer.model)
    if trainer.args.torch_compile:
        # Compiled code is cached per function with guards on the module it ran on; an earlier stage of this
        # process (another adapter on the same base) would fill torch's recompile limit, after which it
        # silently runs uncompiled. Each stage starts from empty caches.
        import torch

        torch.compiler.reset()
    resume_from = None
    if training.resume:
        resume_from = last_checkpoint(output.work_dir)
        if resume_from is None:
            say(f"no complete checkpoint in {output.work_dir / 'checkpoints'}; starting from the first step")
        else:
            say(f"resuming {output.stage} from {resume_from}")
            warn_on_changed_settings(resume_from, training)
    guard = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteGuard)), None)
    if guard is None:
        guard = NonFiniteGuard(training.on_nonfinite)
        trainer.add_callback(guard)
    stop = StopRequest()
    atomic = AtomicCheckpoints(training)
    control = CheckpointControl(guard, stop, before_save=_disk_check(output), atomic=atomic)
    trainer.add_callback(control)
    unwatch = compat.watch_training_step(trainer, guard.observe_loss)
    try:
        with stop.installed():
            result = trainer.train(resume_from_checkpoint=resume_from)
            if stop.signal is not None and guard.failure is None and control.error is None:
                save_final_checkpoint(trainer, output.work_dir, atomic)
    finally:
        unwatch()
        atomic.restore(trainer.args)  # a save that failed midway leaves output_dir pointing aside
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


def _checkpoint_sentence(output: StageOutput, label: str = "Last good checkpoint") -> str:
    checkpoint = last_checkpoint(output.work_dir, quiet=True)
    return f"{label}: {checkpoint}" if checkpoint else "No checkpoint was saved yet"


class StopRequest:
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
        say(f"{self.signal} received: saving a checkpoint at the end of this step, then stopping "
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


def _disk_check(output: StageOutput):
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
