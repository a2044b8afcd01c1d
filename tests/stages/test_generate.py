"""The generate stage on the tiny model: the checks outrank the reward model, so no chosen reply fails one."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from stages import generate
from stages.core import scoring
from stages.core.config import load_config
from stages.core.errors import ConfigError
from stages.core.modeling import ModelConfig, load_base
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


def length_reward_model(monkeypatch):
    """A stand-in reward model that prefers longer replies, so it disagrees with a length limit."""
    @contextlib.contextmanager
    def fake_reward_model(shared, directory):
        yield None

    def by_length(judge, tokenizer, conversations, batch_size=8):
        return [float(len(c[-1]["content"])) for c in conversations]

    monkeypatch.setattr(scoring, "reward_model", fake_reward_model)
    monkeypatch.setattr(scoring, "score", by_length)


def config_for(tmp_path, prompts, *overrides):
    return load_config(generate.GenerateConfig, None, [
        f"prompts={{path: {prompts}}}", f"reward_model={tmp_path}", f"output_dir={tmp_path / 'generate'}",
        "samples_per_prompt=4", "max_new_tokens=6", "temperature=1.5", "top_p=1.0", *overrides])


def test_generate_never_emits_a_pair_whose_chosen_reply_fails_a_check(tmp_path, base, monkeypatch):
    torch.set_num_threads(1)
    length_reward_model(monkeypatch)
    rows = [{"prompt": f"Route ticket {i}", "limit": 38 if i % 2 else ""} for i in range(12)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    # `short`: a reply at most 38 characters long, on odd rows only (rows whose `limit` is empty: n/a)
    checks = "checks=[{fn: 'tests/stages/test_generate.py:at_most', name: short}]"
    output = generate.run(config_for(tmp_path, prompts, checks, "min_score_gap=0.5"), base)

    pairs = [json.loads(line) for line in (output / "dataset.jsonl").read_text().splitlines()]
    metrics = json.loads((output / "metrics.json").read_text())
    assert pairs and metrics["pairs"] == len(pairs)
    assert metrics["pairs"] + metrics["dropped_low_gap"] + metrics["dropped_no_passing_reply"] == 12
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        odd = int(pair["prompt"][0]["content"].split()[-1]) % 2
        verdict = pair["provenance"]["checks"]
        assert verdict["chosen"] == {"short": True if odd else None}, pair
        assert not odd or len(chosen) <= 38, pair
        if verdict["rejected"]["short"] is False:  # the check decided, even against the reward model
            assert pair["provenance"]["decided_by"] == "checks" and len(rejected) > 38
        else:  # the reward model decided: the longer reply, by at least the gap
            assert len(chosen) - len(rejected) >= 0.5
    # the reward model alone would have chosen a reply the check fails on some odd prompt
    assert metrics["pairs_decided_by_checks"] >= 1
    assert 0 < metrics["sample_short_rate"] < 1


def at_most(completions, limit, **_):
    return [None if not n else float(len(c) <= n) for c, n in zip(completions, limit)]


def test_a_check_that_needs_a_missing_column_stops_before_sampling(tmp_path, base, monkeypatch):
    length_reward_model(monkeypatch)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Route ticket 1"}])
    config = config_for(tmp_path, prompts, "checks=[{fn: exact_match, args: {column: queue}}]")
    monkeypatch.setattr(generate, "generate", lambda *a, **k: pytest.fail("sampled before checking the checks"))
    with pytest.raises(ConfigError, match="no column 'queue'"):
        generate.run(config, base)
