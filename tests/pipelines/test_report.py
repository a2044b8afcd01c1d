"""The report's RL section: rewards per function, lengths and ratios over the steps of a GRPO stage."""

from __future__ import annotations

import json

from pipelines.report import reward_curves


def test_reward_curves_plot_each_reward_of_an_rl_stage(tmp_path):
    (tmp_path / "grpo").mkdir()
    (tmp_path / "sft").mkdir()
    history = [{"step": s, "reward": 0.1 * s, "reward_right_queue": 0.2 * s, "reward_sign_off": None,
                "completion_length": 30 - s, "truncated_ratio": 0.5, "clipped_ratio": 0.0} for s in range(1, 5)]
    (tmp_path / "grpo" / "metrics.json").write_text(json.dumps({"train_history": history}))
    (tmp_path / "sft" / "metrics.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 2.0}]}))
    run = {"stages": [{"name": "sft", "output_dir": "sft"}, {"name": "grpo", "output_dir": "grpo"}]}
    assert reward_curves(tmp_path, run, tmp_path / "rewards.png")
    assert (tmp_path / "rewards.png").stat().st_size > 10_000
    no_rl = {"stages": [{"name": "sft", "output_dir": "sft"}]}
    assert not reward_curves(tmp_path, no_rl, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
