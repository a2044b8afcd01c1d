"""Trainer callbacks: a rich progress line, the guard against non-finite losses and gradients, and
the control that turns a stop request into a checkpoint (both used by ``fit``)."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from stages.core.errors import LorelayError
from stages.core.training.args import is_main_process


class RichProgress(TrainerCallback):
    """One rich progress bar per stage with the latest loss, learning rate and eval loss."""

    def __init__(self, title: str):
        self.title = title
        self.progress = None
        self.task = None
        self.fields = {"loss": "-", "lr": "-", "eval": "-"}

    def on_train_begin(self, args, state, control, **kwargs):
        if not is_main_process() or os.environ.get("LORELAY_QUIET"):
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


def any_rank(flag: bool, device) -> bool:
    """``flag`` OR-ed over every process, so all ranks take the same decision (no-op when alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import torch

    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _grads_finite(model) -> bool:
    """Whether every gradient is finite: one max-abs per tensor, one device sync in all."""
    import torch

    peaks = [p.grad.detach().abs().amax().float() for p in model.parameters()
             if p.requires_grad and p.grad is not None and p.grad.numel()]
    if not peaks:
        return True
    device = peaks[0].device
    return bool(torch.isfinite(torch.stack([peak.to(device) for peak in peaks])).all())


class NonFiniteGuard(TrainerCallback):
    """Catches a NaN/inf loss or gradient before the optimizer applies it.

    ``fit`` shows it every micro-batch's loss (``observe_loss``); just before each optimizer step it
    also checks the gradients. On a bad step the gradients are dropped (set to None), so the optimizer
    step that follows changes nothing: no update, no momentum or weight-decay change (torch's
    optimizers skip parameters without a gradient). Zeroing them would not do: AdamW would still
    apply its momentum and weight decay. The learning-rate schedule still advances, so the run keeps
    its planned length. With fp16 mixed precision only the loss is checked: inf gradients there are
    the grad scaler's normal overflow signal, and the scaler already skips those steps.

    ``stop``: stop training after that step, and save no checkpoint for it; the last checkpoint stays
    the last good one, and ``fit`` raises ``NonFiniteLoss``.
    ``skip``: go on with the next batch; each skipped step is logged in the log history
    (``{"step": N, "skipped_nonfinite": "loss"}``) and counted in the metrics. More than
    ``max_consecutive_skips`` bad steps in a row stop the run as ``stop`` would.
    """

    def __init__(self, policy: str, max_consecutive_skips: int = 5):
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive = 0
        self.failure: tuple[int, str] | None = None  # (step, what was non-finite) when stopping
        self._loss_finite = None  # a bool tensor over this step's micro-batches (no sync until checked)

    def observe_loss(self, loss) -> None:
        import torch

        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_step_begin(self, args, state, control, **kwargs):
        self._loss_finite = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad_loss = self._loss_finite is not None and not bool(self._loss_finite)
        self._loss_finite = None
        # Under fp16 the grad scaler owns overflowing gradients: it skips that step and lowers its scale.
        bad_grads = not getattr(args, "fp16", False) and model is not None and not _grads_finite(model)
        what = " and ".join(name for name, bad in (("loss", bad_loss), ("gradients", bad_grads)) if bad)
        if not any_rank(bool(what), args.device):
            self.consecutive = 0
            return control
        what = what or "loss or gradients on another process"
        for param in model.parameters():
            param.grad = None
        step = state.global_step + 1
        self.consecutive += 1
        if self.policy == "skip" and self.consecutive <= self.max_consecutive_skips:
            state.log_history.append({"step": step, "skipped_nonfinite": what})
            if is_main_process():
                print(f"lorelay: non-finite {what} at step {step}: step skipped", flush=True)
            return control
        if self.policy == "skip":
            what += f" ({self.consecutive} steps in a row)"
        self.failure = (step, what)
        control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.failure is not None:
            control.should_save = False
            control.should_evaluate = False
        return control


class CheckpointControl(TrainerCallback):
    """Runs last at each step and epoch end: turns a stop request (``stop.signal``, set by ``fit``'s signal
    handlers) into a checkpoint and the end of training, and calls ``before_save(state, model)`` before
    any checkpoint is written; an error it returns cancels the save and stops training (kept in ``error``
    for ``fit`` to raise). A save that goes ahead is written aside and sealed by ``atomic``
    (``AtomicCheckpoints``): ``begin`` here, ``finish`` at the trainer's ``on_save``."""

    def __init__(self, guard: NonFiniteGuard, stop, before_save, atomic):
        self.guard, self.stop, self.before_save, self.atomic = guard, stop, before_save, atomic
        self.error: LorelayError | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.guard.failure is not None:
            return control  # no checkpoint after a bad step: the last one stays the last good one
        if any_rank(self.stop.signal is not None, args.device):
            self.stop.signal = self.stop.signal or "a stop request on another process"
            control.should_save = True
            control.should_training_stop = True
        return self._prepare_save(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.guard.failure is not None:
            control.should_save = False
            return control
        return self._prepare_save(args, state, control, model)

    def on_save(self, args, state, control, **kwargs):
        self.atomic.finish(args, state)
        return control

    def _prepare_save(self, args, state, control, model):
        if control.should_save and self.error is None:
            self.error = self.before_save(state, model)
        if any_rank(self.error is not None, args.device):
            self.error = self.error or LorelayError("another process could not save a checkpoint")
            control.should_save = False
            control.should_training_stop = True
        if control.should_save:
            self.atomic.begin(args, state)
        return control
