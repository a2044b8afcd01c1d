"""configs/accelerate/multi_node.yaml's launch, simulated: two "machines" on this host (machine ranks 0 and 1,
main process 127.0.0.1, one process each, gloo on CPU), each started by its own `accelerate launch`.

Both machines see one filesystem here, as the template requires of real nodes (the run directory on a
shared mount), so "written by the main process only" is checked as exactly one output per stage.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from tests.conftest import pairs, write_jsonl
from tests.distributed.launch import (assert_one_output, assert_same_training, free_port, kill_tree, run_machines,
                                      sft_config, start_machine, training)

pytestmark = [pytest.mark.slow, pytest.mark.spawn]


def test_a_pipeline_on_two_machines_writes_each_stage_once_and_trains_as_one_process(tmp_path, tiny_model_dir,
                                                                                     one_process_sft):
    """SFT -> DPO; the SFT stage has the settings of `one_process_sft` at 2 machines x batch 2."""
    sft = yaml.safe_load(sft_config(tmp_path, tiny_model_dir, "sft", batch_size=2).read_text())
    pair_data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(16))
    pipeline = {
        "name": "nodes", "run_dir": str(tmp_path / "run"),
        "base": {"model": sft["model"], "lora": sft["lora"]},
        "stages": [
            {"name": "sft", "settings": {key: sft[key] for key in ("data", "sample_max_new_tokens")}
                                        | {"training": training(2)}},
            {"name": "dpo", "settings": {"data": {"datasets": [{"path": str(pair_data)}], "eval_ratio": 0.25},
                                         "training": training(2)}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    run_machines(["run", str(path)], tmp_path)

    for stage in ("sft", "dpo"):
        effective = assert_one_output(tmp_path / "run", stage)["effective"]
        assert (effective["world_size"], effective["distributed"]) == (2, "MULTI_CPU")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [(s["name"], s["status"]) for s in run["stages"]] == [("sft", "done"), ("dpo", "done")]
    assert_same_training(tmp_path / "run" / "sft", one_process_sft)


def test_a_machine_dying_mid_stage_stops_the_other_with_a_clear_error(tmp_path, tiny_model_dir):
    config = yaml.safe_load(sft_config(tmp_path, tiny_model_dir, "sft", batch_size=2).read_text())
    config["training"]["max_steps"] = 100_000  # still training when machine 1 dies
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config))
    port, logs = free_port(), [tmp_path / "machine0.log", tmp_path / "machine1.log"]
    main, other = (start_machine(rank, port, ["sft", "--config", str(path)], logs[rank]) for rank in (0, 1))
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "sft.partial").exists():  # the stage has started on both ranks
            assert time.monotonic() < deadline and main.poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)
        kill_tree(other)  # machine 1's launcher and its worker, as a node that loses power
        started = time.monotonic()
        code = main.wait(timeout=120)  # a hang would end the test here
        stopped_after = time.monotonic() - started
    finally:
        kill_tree(main)
        kill_tree(other)
    log = logs[0].read_text()
    assert code != 0
    assert "lorelay [rank 0]: error: another process of this run stopped mid-stage" in log, log[-3000:]
    assert "Traceback" not in log.split("lorelay [rank 0]: error:")[0][-2000:]
    assert not (tmp_path / "sft").exists()  # nothing committed as finished
    assert stopped_after < 60, f"rank 0 took {stopped_after:.0f} s to stop"
    assert os.path.isdir(tmp_path / "sft.partial")  # the interrupted stage's work is kept for --resume
