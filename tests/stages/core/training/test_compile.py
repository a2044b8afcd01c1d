"""training.compile: the model is compiled through transformers' torch_compile arguments, trains to the same
losses as uncompiled, and is refused, naming the key, where it cannot compile."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

from stages.core.config import load_config
from stages.core.errors import ConfigError
from stages.core.training import TrainingConfig, trainer_args
from stages.core.training import args as training_args
from stages.sft import SFTConfig, run
from tests.conftest import pairs, write_jsonl

CPU = types.SimpleNamespace(device="cpu", dtype=torch.float32, activation_checkpointing=False)


def sft_args(tmp_path, **settings):
    from trl import SFTConfig as TRLSFTConfig

    return trainer_args(TRLSFTConfig, TrainingConfig(**settings), CPU, tmp_path, has_eval=False)


def test_compile_settings_reach_transformers_and_auto_is_off_on_cpu(tmp_path, capsys, monkeypatch):
    training_args.say_once.cache_clear()  # said once per process: another test may have said it already
    monkeypatch.delenv("ACCELERATE_DYNAMO_USE_DYNAMIC", raising=False)
    args = sft_args(tmp_path, compile=True, compile_mode="max-autotune")
    # padding-free batches change length every step: compiled for dynamic shapes from the first
    assert os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] == "true"
    assert (args.torch_compile, args.torch_compile_backend, args.torch_compile_mode) == (True, "inductor", "max-autotune")
    assert sft_args(tmp_path, compile=True, compile_backend="aot_eager").torch_compile_backend == "aot_eager"
    auto = sft_args(tmp_path)
    assert auto.torch_compile is False and auto.torch_compile_backend is None
    assert "training.compile is auto: off on CPU" in capsys.readouterr().err


@pytest.mark.parametrize("settings, which, message", [
    (dict(compile=True, compile_mode="reduce-overhead"), None, "reduce-overhead is CUDA graphs"),
    (dict(compile=True), "no compiler", "no C\\+\\+ compiler"),
])
def test_compile_is_refused_where_it_cannot_run(tmp_path, monkeypatch, settings, which, message):
    if which == "no compiler":
        monkeypatch.setattr(training_args.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=message) as caught:
        sft_args(tmp_path, **settings)
    assert caught.value.field == "training.compile"


def test_compile_options_without_compile_and_trl_args_torch_compile_are_refused():
    with pytest.raises(ConfigError, match="training.compile is false"):
        load_config(SFTConfig, None, ["training.compile=false", "training.compile_backend=eager"])
    with pytest.raises(ConfigError, match="lorelay sets torch_compile itself .*set training.compile"):
        load_config(SFTConfig, None, ["training.trl_args={torch_compile: true}"])


# Every sample has the same length, so every padding-free batch has one shape: one compilation, no recompiles.
CHATS = [{"messages": [{"role": "user", "content": f"Route ticket {i}: my invoice is wrong"},
                       {"role": "assistant", "content": "Queue: billing"}]} for i in range(8)]


@pytest.fixture(autouse=True)
def empty_compile_caches_after():
    """A compiled run leaves fake tensors in torch.compile's caches; later tests count live tensors."""
    yield
    import gc

    torch.compiler.reset()
    gc.collect()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_compiled_sft_trains_to_the_uncompiled_losses(tmp_path, tiny_model_dir, monkeypatch):
    """aot_eager: dynamo and AOTAutograd trace the PEFT model's forward and backward (the reply-only LM head
    included), without inductor's C++ code generation, which takes minutes on this machine."""
    import torch._dynamo.utils

    from stages.core.modeling import ModelConfig, load_base

    # Every batch here has one shape, so static shapes (an accelerate launch config's choice, which lorelay keeps)
    # compile fastest; lorelay's own default, dynamic, is checked above.
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_DYNAMIC", "false")
    base = load_base(ModelConfig(name=str(tiny_model_dir)))
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)

    def train(name, *overrides):
        config = load_config(SFTConfig, None, [
            f"data.datasets=[{{path: {data}}}]", "data.eval_ratio=0", "data.sample_prompts=0",
            f"training.output_dir={tmp_path / name}", "training.max_steps=3", "training.batch_size=4",
            "training.learning_rate=3e-2", "training.logging_steps=1", "training.warmup_ratio=0.0",
            "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", *overrides])
        metrics = json.loads((run(config, base) / "metrics.json").read_text())
        return [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]

    compiled_models = []
    real_compile = torch.compile

    def spy(model, **options):
        compiled = real_compile(model, **options)
        compiled_models.append((type(model).__name__, options.get("backend"), options.get("dynamic"), compiled))
        return compiled

    monkeypatch.setattr(torch, "compile", spy)
    resets = []
    real_reset = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: (resets.append(1), real_reset()))
    plain = train("plain")
    assert compiled_models == []
    torch._dynamo.utils.counters.clear()
    compiled = train("compiled", "training.compile=true", "training.compile_backend=aot_eager")

    assert resets == [1]  # the compiled stage started from empty caches; the plain one left them alone
    assert [entry[:3] for entry in compiled_models] == [("PeftModelForCausalLM", "aot_eager", False)]
    assert isinstance(compiled_models[0][3], torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # frames really were compiled
    assert all(torch.isfinite(torch.tensor(compiled))) and compiled[-1] < compiled[0], compiled
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(plain), rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_packed_preference_batches_refuse_compile_naming_the_way_out(tmp_path, tiny_model_dir):
    """DPO's packed rows call the decoder and LM head themselves: compiling the model would not reach them."""
    from stages import dpo
    from stages.core.modeling import ModelConfig, load_base

    base = load_base(ModelConfig(name=str(tiny_model_dir)))
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    config = load_config(dpo.DPOConfig, None, [
        f"data.datasets=[{{path: {data}}}]", "data.eval_ratio=0", f"training.output_dir={tmp_path / 'dpo'}",
        "training.max_steps=1", "training.batch_size=4", "sample_prompts=1", "max_new_tokens=1",
        "training.compile=true", "training.compile_backend=aot_eager"])
    with pytest.raises(ConfigError, match="dpo on packed rows .* outside the compiled model") as caught:
        dpo.run(config, base)
    assert caught.value.field == "training.compile" and "data.padding_free: false" in caught.value.hint
    assert not (tmp_path / "dpo").exists()
