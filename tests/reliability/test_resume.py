"""Resume: a stage stopped at step k and resumed ends with the adapter an uninterrupted run ends with
(optimizer, scheduler, RNG and data position all restored), and a crash in the middle of writing a
checkpoint never leaves one that a resume would pick."""

from __future__ import annotations

import json
import os
import signal

import pytest
from transformers import Trainer, TrainerCallback

from stages.core.errors import LorelayError
from stages.sft import run
from stages.core.training import CHECKPOINT_MANIFEST, Interrupted, TrainingConfig, last_checkpoint, verify_output
from tests.reliability.helpers import (assert_same_adapter, base, chat_file, checkpoints,  # noqa: F401
                                       sft_config, with_extra_callbacks)


class SignalAt(TrainerCallback):
    """Sends this process a real SIGTERM at the end of step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base):
    """The uninterrupted run every resumed run must match."""
    tmp = tmp_path_factory.mktemp("reference")
    return run(sft_config(tmp / "sft", chat_file(tmp)), base)


def losses(output) -> dict[int, float]:
    history = json.loads((output / "metrics.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_stopped_at_step_k_and_resumed_equals_an_uninterrupted_run(tmp_path, base, reference, monkeypatch):
    data = chat_file(tmp_path)
    with_extra_callbacks(monkeypatch, SignalAt(7))  # step 7: mid second epoch, after checkpoint-6
    with pytest.raises(Interrupted) as info:
        run(sft_config(tmp_path / "sft", data), base)
    message = str(info.value)
    assert "SIGTERM received: stopped at step 7 of 8" in message and "checkpoint-7" in message
    assert "--resume" in message and info.value.exit_code == 130
    assert not (tmp_path / "sft").exists()  # nothing that looks finished
    assert checkpoints(tmp_path / "sft")[-1] == "checkpoint-7"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # fit put the handler back

    monkeypatch.undo()
    output = run(sft_config(tmp_path / "sft", data, "training.resume=true"), base)

    assert_same_adapter(output, reference)
    resumed, uninterrupted = losses(output), losses(reference)
    assert sorted(resumed) == list(range(1, 9))
    for step in (8,):  # steps trained after the resume see the same batches and dropout masks
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    verify_output(output)
    assert not output.with_name("sft.partial").exists()


def test_a_crash_while_saving_a_checkpoint_leaves_the_previous_one_to_resume_from(
        tmp_path, base, reference, monkeypatch, capsys):
    data = chat_file(tmp_path)
    original = Trainer._save_optimizer_and_scheduler

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # the adapter weights of checkpoint-4 are already written
            raise OSError("simulated crash while writing the optimizer state")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_at_step_4)
    with pytest.raises(OSError, match="simulated crash"):  # resume=true with nothing to resume: a fresh start
        run(sft_config(tmp_path / "sft", data, "training.resume=true"), base)
    monkeypatch.undo()
    assert "no complete checkpoint" in capsys.readouterr().err

    work = tmp_path / "sft.partial"
    assert checkpoints(tmp_path / "sft") == ["checkpoint-2"]
    half_written = work / "checkpoints" / ".incomplete" / "checkpoint-4"
    assert (half_written / "adapter_model.safetensors").exists()  # the crash really was mid-save
    assert last_checkpoint(work).endswith("checkpoint-2")
    # transformers' training_args.bin (a pickle nothing reads back) is dropped from checkpoints; the
    # optimizer/scheduler/RNG .pt files stay: transformers reads those with torch.load(weights_only=True).
    assert not (work / "checkpoints" / "checkpoint-2" / "training_args.bin").exists()
    assert not (tmp_path / "sft").exists()

    output = run(sft_config(tmp_path / "sft", data, "training.resume=true"), base)
    assert_same_adapter(output, reference)


def test_a_damaged_or_unsealed_checkpoint_is_passed_over(tmp_path, capsys):
    from stages.core.training import seal_checkpoint

    folder = tmp_path / "work" / "checkpoints"

    class FakeTrainer:  # the trainer state seal_checkpoint reads
        class state:  # noqa: N801
            best_model_checkpoint = None
            global_step = 0
            max_steps = 9

    for step in (2, 4, 6):
        pending = folder / ".incomplete" / f"checkpoint-{step}"
        pending.mkdir(parents=True)
        (pending / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
        (pending / "trainer_state.json").write_text("{}")
        FakeTrainer.state.global_step = step
        seal_checkpoint(FakeTrainer.state, pending, folder / f"checkpoint-{step}", TrainingConfig())
    (folder / "checkpoint-8").mkdir()  # written outside lorelay's rename: no manifest
    (folder / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"bit rot")

    assert last_checkpoint(tmp_path / "work") == str(folder / "checkpoint-4")
    err = capsys.readouterr().err
    assert "checkpoint-8: incomplete" in err and "checkpoint-6: adapter_model.safetensors does not match" in err
    manifest = json.loads((folder / "checkpoint-4" / CHECKPOINT_MANIFEST).read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == {"adapter_model.safetensors", "trainer_state.json"}


def test_a_finished_stage_holds_no_pickle_files(reference):
    pickles = [p.name for p in reference.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not pickles


def test_an_interrupted_run_keeps_its_checkpoints_until_resume_or_restart_and_litter_goes(tmp_path, capsys):
    from stages.core.training import StageOutput

    checkpoints = tmp_path / "sft.partial" / "checkpoints"
    (checkpoints / "checkpoint-2").mkdir(parents=True)
    (checkpoints / ".incomplete" / "checkpoint-4").mkdir(parents=True)  # a save the kill interrupted
    with pytest.raises(LorelayError, match=r"interrupted earlier run left checkpoints.*checkpoint-2.*kept") as err:
        StageOutput(tmp_path / "sft", stage="sft")
    assert "--resume" in err.value.hint and "--restart" in err.value.hint
    assert (checkpoints / "checkpoint-2").is_dir()

    StageOutput(tmp_path / "sft", stage="sft", resume=True)
    assert (checkpoints / "checkpoint-2").is_dir() and not (checkpoints / ".incomplete").exists()

    StageOutput(tmp_path / "sft", stage="sft", restart=True)
    assert "--restart: discarding" in capsys.readouterr().err
    assert not (tmp_path / "sft.partial").exists()


def test_the_cli_refuses_an_interrupted_stage_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    (tmp_path / "sft.partial" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    monkeypatch.setattr("stages.core.modeling.load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    data = chat_file(tmp_path)
    code = main(["sft", f"data.datasets=[{{path: '{data}'}}]", f"training.output_dir={tmp_path / 'sft'}"])
    assert code == 2 and "pass --resume" in capsys.readouterr().err
    assert (tmp_path / "sft.partial" / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(SystemExit):
        main(["sft", "--resume", "--restart"])
    assert "not allowed with argument" in capsys.readouterr().err
