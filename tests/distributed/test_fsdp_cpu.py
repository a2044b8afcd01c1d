"""configs/accelerate/fsdp_qlora.yaml's FSDP launch on two CPU processes.

accelerate 1.15 honours FSDP on accelerators only: on CPU it turns the launch into plain data parallel
(`MULTI_CPU`) without a word (accelerate/state.py: `DistributedType.FSDP` is set only for the GPU-like
distributed types). lorelay records the type that really ran in the manifest and says so once, so a user
is never told "FSDP" for an unsharded run; docs/multi-gpu.md records this, and `make gpu-check` runs the
FSDP config on a GPU.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.distributed.launch import (ACCELERATE, ROOT, assert_one_output, assert_same_training, env, free_port,
                                      sft_config)

pytestmark = [pytest.mark.slow, pytest.mark.spawn]


def test_the_fsdp_config_on_cpu_trains_the_same_adapter_and_says_it_ran_unsharded(tmp_path, tiny_model_dir,
                                                                                   one_process_sft):
    launch_config = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_qlora.yaml").read_text())
    launch_config.update(num_processes=2, mixed_precision="no")  # fp32 on CPU, as lorelay's CPU default
    launch_config["fsdp_config"].update(fsdp_version=2, fsdp_cpu_ram_efficient_loading=False)
    launch_path = tmp_path / "fsdp_cpu.yaml"
    launch_path.write_text(yaml.safe_dump(launch_config))
    config = sft_config(tmp_path, tiny_model_dir, "sft", batch_size=2)

    result = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(launch_path), "--main_process_port",
                             str(free_port()), "-m", "pipelines.cli", "sft", "--config", str(config)],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]

    manifest = assert_one_output(tmp_path, "sft")
    assert manifest["effective"]["distributed"] == "MULTI_CPU"
    assert "asks for FSDP, but accelerate runs it as MULTI_CPU" in result.stderr
    assert_same_training(tmp_path / "sft", one_process_sft)

    # the saved adapter is a plain PEFT adapter: it loads without FSDP or accelerate
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "sft")
    assert any("lora_B" in name for name, _ in model.named_parameters())
