"""The numerical guard: a NaN/inf loss or gradient never reaches the weights. ``skip`` drops that step
(no update, no weight decay) and counts it; ``stop`` ends the run with a clear error and keeps the
last checkpoint written before the bad step as the last one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from stages.core.training.trainer_callbacks import NonFiniteGuard, NonFiniteLoss
from stages.sft import run
from tests.reliability.helpers import (adapter_tensors, base, chat_file, checkpoints,  # noqa: F401
                                       sft_config, with_extra_callbacks)


class NaNAt:
    """A forward hook that turns the final norm's output into NaN on the ``step``-th training forward
    (one forward per optimizer step here: no gradient accumulation)."""

    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def __call__(self, module, inputs, output):
        if module.training:
            self.calls += 1
            if self.calls == self.step:
                return output * float("nan")
        return None


@pytest.fixture
def nan_at(base):
    handles = []

    def install(step: int) -> None:
        handles.append(base.model.model.norm.register_forward_hook(NaNAt(step)))

    yield install
    for handle in handles:
        handle.remove()


class WeightWatch(TrainerCallback):
    """Records, per step, whether that step changed any trainable weight."""

    def __init__(self):
        self.changed: dict[int, bool] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.changed[state.global_step] = any(not torch.equal(p.detach(), self.before[n])
                                              for n, p in model.named_parameters() if p.requires_grad)


def test_skip_drops_the_bad_step_whole_and_counts_it(tmp_path, base, nan_at, monkeypatch):
    watch = WeightWatch()
    with_extra_callbacks(monkeypatch, watch)
    nan_at(3)
    output = run(sft_config(tmp_path / "sft", chat_file(tmp_path), "training.on_nonfinite=skip",
                            "training.weight_decay=0.1", "training.max_steps=5", "training.save_steps=null",
                            "training.warmup_ratio=0.0"),
                 base)

    assert watch.changed == {1: True, 2: True, 3: False, 4: True, 5: True}  # not even weight decay at 3
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["steps"] == 5
    assert {"step": 3, "skipped_nonfinite": "loss and gradients"} in metrics["log_history"]
    assert all(torch.isfinite(t).all() for t in adapter_tensors(output).values())


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, base, nan_at):
    nan_at(5)
    with pytest.raises(NonFiniteLoss) as info:
        run(sft_config(tmp_path / "sft", chat_file(tmp_path), "training.max_steps=6"), base)

    message = str(info.value)
    assert "non-finite loss and gradients at step 5" in message
    assert "Last good checkpoint:" in message and "checkpoint-4" in message
    assert "on_nonfinite: skip" in message and "--resume" in message
    assert checkpoints(tmp_path / "sft") == ["checkpoint-2", "checkpoint-4"]  # nothing after the bad step
    last = tmp_path / "sft.partial" / "checkpoints" / "checkpoint-4"
    assert all(torch.isfinite(t).all() for t in adapter_tensors(last).values())
    assert not (tmp_path / "sft").exists()


def test_skip_gives_up_after_too_many_bad_steps_in_a_row():
    guard = NonFiniteGuard("skip", max_consecutive_skips=2)
    layer = torch.nn.Linear(2, 2)
    state = SimpleNamespace(global_step=0, log_history=[])
    control = SimpleNamespace(should_training_stop=False)
    args = SimpleNamespace(device="cpu")
    for step in range(3):
        layer.weight.grad = torch.full_like(layer.weight, float("inf"))
        guard.on_pre_optimizer_step(args, state, control, model=layer)
        assert layer.weight.grad is None  # the optimizer step that follows changes nothing
        state.global_step += 1
    assert guard.failure == (3, "gradients (3 steps in a row)") and control.should_training_stop
    assert len(state.log_history) == 2


def test_a_good_step_resets_the_count():
    guard = NonFiniteGuard("skip", max_consecutive_skips=1)
    layer = torch.nn.Linear(2, 2)
    state = SimpleNamespace(global_step=0, log_history=[])
    control = SimpleNamespace(should_training_stop=False)
    for value in (float("nan"), 1.0, float("nan")):
        layer.weight.grad = torch.full_like(layer.weight, value)
        guard.on_pre_optimizer_step(SimpleNamespace(device="cpu"), state, control, model=layer)
    assert guard.failure is None and not control.should_training_stop
