"""Resume after a hard kill: a stage SIGKILLed after its first checkpoint, then run with ``--resume``,
ends with the adapter an uninterrupted run ends with (to 1e-5) - for CPT (in memory and streaming), RM,
DPO and GRPO (SFT: tests/reliability/test_resume.py); and ``lorelay run`` SIGKILLed in its third stage,
re-run, re-uses the first two stages and resumes the third to the same final adapter.

The kill is real: the child process sends itself SIGKILL at the end of step 3 (after the checkpoint of
step 2), so nothing of lorelay's (no handler, no finally) runs on the way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stages import registry
from stages.core.config import load_config
from tests.conftest import write_jsonl
from tests.reliability.helpers import CHATS, adapter_tensors, assert_same_adapter, base, checkpoints  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# Four steps, a checkpoint every two; dropout on, so the RNG state must be restored too.
SCHEDULE = ["training.max_steps=4", "training.save_steps=2", "training.batch_size=2", "training.learning_rate=1e-2",
            "training.warmup_ratio=0.25", "training.logging_steps=1", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1"]
PAIRS = [{"prompt": f"Route ticket {i}", "chosen": f"Queue: {q} — Support", "rejected": f"Queue: {q}"}
         for i in range(6) for q in ("billing", "shipping")]

CHILD = """
import json, os, signal, sys
from transformers import TrainerCallback

spec = json.loads(sys.argv[1])


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == spec["kill_at"] and spec["kill_in"] in str(args.output_dir):
            os.kill(os.getpid(), signal.SIGKILL)


import importlib
from stages import registry
for name in registry.names():
    module = importlib.import_module(registry.RECIPES[name])
    if hasattr(module, "callbacks"):
        own = module.callbacks
        module.callbacks = lambda *a, _own=own, **k: [*_own(*a, **k), KillAt()]
if "pipeline" in spec:
    from pipelines.runner import run_pipeline
    run_pipeline(spec["pipeline"])
else:
    from stages.core.config import load_config
    from stages.core.modeling import ModelConfig, load_base
    stage = registry.get(spec["stage"])
    config = load_config(stage.config_class, None, spec["overrides"])
    stage.run(config, load_base(ModelConfig(name=spec["model"])))
print("finished without being killed", flush=True)
"""


def killed_child(spec: dict) -> None:
    """Run ``spec`` in a child process that SIGKILLs itself at step 3 of the stage named by ``kill_in``."""
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]),
                                                           "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL, f"not killed (rc {done.returncode}): {done.stderr[-2000:]}"


def stage_data(tmp_path: Path) -> dict[str, list[str]]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(6):
        (corpus / f"doc{index}.txt").write_text(f"Nimbus robot {index} sweeps floors and answers questions. " * 6)
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": pair["prompt"]} for pair in PAIRS])
    cpt = [f"data.sources=[{{path: '{corpus}'}}]", "data.block_size=32", "data.eval_ratio=0"]
    return {
        "cpt": cpt,
        "cpt-streaming": [*cpt, "data.streaming=true", "data.shuffle_buffer=8"],
        "rm": [f"data.datasets=[{{path: '{pairs}'}}]", "data.eval_ratio=0", "data.max_length=64"],
        "dpo": [f"data.datasets=[{{path: '{pairs}'}}]", "data.eval_ratio=0", "data.max_length=64", "sample_prompts=1",
                "max_new_tokens=2"],
        "sft": [f"data.datasets=[{{path: '{chats}'}}]", "data.eval_ratio=0", "data.sample_prompts=0"],
        # sampling too must resume where it stopped: replies are drawn from the restored RNG state. The tiny
        # model's 4-token replies contain an "a" about half the time: steps 2 and 4 have groups that differ.
        "grpo": [f"data.datasets=[{{path: '{prompts}'}}]", "data.eval_prompts=0", "num_generations=2",
                 "max_completion_length=4", "rewards=[{fn: contains, args: {text: a}}]"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cpt", "cpt-streaming", "rm", "dpo", "grpo"])
def test_a_stage_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(variant, tmp_path, base,
                                                                              tiny_model_dir, capsys):
    stage = registry.get(variant.split("-")[0])
    overrides = [*stage_data(tmp_path)[variant], *SCHEDULE]
    reference = stage.run(load_config(stage.config_class, None, [*overrides, f"training.output_dir={tmp_path / 'ref'}"]),
                          base)

    output = tmp_path / "killed"
    killed_child({"stage": stage.name, "model": str(tiny_model_dir), "kill_at": 3, "kill_in": str(output),
                  "overrides": [*overrides, f"training.output_dir={output}"]})
    assert checkpoints(output) == ["checkpoint-2"] and not output.exists()
    # Litter of a save the kill cut short: never resumed from, cleaned when the stage starts again.
    (output.with_name("killed.partial") / "checkpoints" / ".incomplete" / "checkpoint-4").mkdir(parents=True)

    resumed = stage.run(load_config(stage.config_class, None, [*overrides, f"training.output_dir={output}",
                                                               "training.resume=true"]), base)
    assert "from a process that is gone" in capsys.readouterr().err  # the dead child's lock, taken over
    assert_same_adapter(resumed, reference, atol=1e-5)
    trained = adapter_tensors(reference)  # equal because both trained alike, not because neither moved
    assert any(t.abs().max() > 0 for name, t in trained.items() if "lora_B" in name), "the adapter did not train"


@pytest.mark.slow
def test_a_pipeline_killed_in_its_third_stage_reuses_two_and_resumes_the_third(tmp_path, tiny_model_dir):
    import yaml

    from pipelines.runner import run_pipeline

    stage_data(tmp_path)  # writes the corpus and chats the stages read
    schedule = {"max_steps": 4, "save_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "warmup_ratio": 0.25,
                "logging_steps": 1}
    settings = {"data": {"datasets": [{"path": str(tmp_path / "chats.jsonl")}], "eval_ratio": 0.0,
                         "sample_prompts": 0}, "training": schedule}
    stages = [{"name": "cpt", "settings": {"data": {"sources": [{"path": str(tmp_path / "corpus")}], "block_size": 32,
                                                    "eval_ratio": 0.0}, "training": schedule}},
              {"name": "sft", "settings": settings}, {"name": "sft2", "type": "sft", "settings": settings}]

    def pipeline(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "run_dir": str(tmp_path / name), "stages": stages,
            "base": {"model": {"name": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}}))
        return path

    reference = run_pipeline(pipeline("uninterrupted"))
    killed_child({"pipeline": str(pipeline("killed")), "kill_at": 3, "kill_in": str(tmp_path / "killed" / "sft2")})
    run_dir = tmp_path / "killed"
    statuses = {s["name"]: s["status"] for s in json.loads((run_dir / "run.json").read_text())["stages"]}
    assert statuses == {"cpt": "done", "sft": "done", "sft2": "running"}
    assert checkpoints(run_dir / "sft2") == ["checkpoint-2"]

    run_pipeline(pipeline("killed"))
    statuses = {s["name"]: s["status"] for s in json.loads((run_dir / "run.json").read_text())["stages"]}
    assert statuses == {"cpt": "cached", "sft": "cached", "sft2": "done"}
    assert_same_adapter(run_dir / "sft2", reference / "sft2", atol=1e-5)
