"""Trainer callbacks: a rich progress line, and a guard against non-finite losses."""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback

from stages.errors import LorelayError


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class RichProgress(TrainerCallback):
    """One rich progress bar per stage with the latest loss, learning rate and eval loss."""

    def __init__(self, title: str):
        self.title = title
        self.progress = None
        self.task = None
        self.fields = {"loss": "-", "lr": "-", "eval": "-"}

    def on_train_begin(self, args, state, control, **kwargs):
        if not _is_main() or os.environ.get("LORELAY_QUIET"):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{self.title}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  eval {task.fields[eval]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.title, total=state.max_steps, completed=state.global_step,
                                           **self.fields)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, **self.fields)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.fields["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self.fields["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            self.fields["eval"] = f"{logs['eval_loss']:.4f}"
        self.progress.update(self.task, **self.fields)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, **self.fields)
            self.progress.stop()
            self.progress = None


class NonFiniteLoss(LorelayError):
    """Training produced NaN or inf; the last good checkpoint is kept."""


class NonFiniteGuard(TrainerCallback):
    """Watches logged losses and gradient norms for NaN/inf.

    ``stop``: end training with a clear error (checkpoints already on disk stay the last good ones).
    ``skip``: transformers' own ``logging_nan_inf_filter`` keeps the step out of the logged mean;
    here we count them and stop only when every step in a logging window was bad.
    """

    def __init__(self, policy: str):
        self.policy = policy
        self.bad_steps = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        bad = [k for k in ("loss", "grad_norm") if k in logs and not math.isfinite(float(logs[k]))]
        if not bad:
            return
        self.bad_steps += 1
        if self.policy == "stop" or self.bad_steps > 3:
            raise NonFiniteLoss(
                f"non-finite {' and '.join(bad)} at step {state.global_step}",
                hint="lower training.learning_rate, check the data, or set training.on_nonfinite: skip; "
                     "the last good checkpoint was kept")
