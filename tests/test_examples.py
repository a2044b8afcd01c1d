"""examples/rewards.py, the README's worked `file.py:function` example, as the demo pipeline configures it."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.runner import load_pipeline
from stages.core.judges import check_outcomes
from stages.core.rewards import RewardSpec, load_rewards

ROOT = Path(__file__).resolve().parents[1]


def test_queue_rules_pass_fail_or_do_not_apply():
    queue_only, no_label = load_rewards([RewardSpec(fn="examples/rewards.py:queue_only"),
                                         RewardSpec(fn="examples/rewards.py:no_queue_label")])
    replies = ["Technical.", "technical\n\nNimbus Support", "It lasts 2 hours.\n\ntechnical", "Your account is safe."]
    kind = ["triage", "triage", "question", "question"]
    assert queue_only([""] * 4, replies, kind=kind) == [1.0, 0.0, None, None]
    assert no_label([""] * 4, replies, kind=kind) == [None, None, 0.0, 1.0]  # a word in a sentence is no label
    chat = [[{"role": "assistant", "content": "returns"}]]  # conversational completions work too
    assert queue_only([""], chat, kind=["triage"]) == [1.0]


def test_demo_checks_pass_every_chosen_reply_and_catch_the_rejected_ones(monkeypatch):
    monkeypatch.chdir(ROOT)
    pipeline, _ = load_pipeline(ROOT / "configs" / "pipelines" / "demo.yaml", [])
    checks = load_rewards(pipeline.evaluation.checks)
    assert [c.name for c in checks] == ["queue", "queue_only", "sign_off", "no_queue_label"]
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "preferences_eval.jsonl").read_text().splitlines()]
    columns = [{k: row[k] for k in ("kind", "queue", "sign_off")} for row in rows]
    prompts = [row["prompt"] for row in rows]
    chosen = check_outcomes(checks, prompts, [row["chosen"] for row in rows], columns)
    rejected = check_outcomes(checks, prompts, [row["rejected"] for row in rows], columns)
    assert all(False not in outcome.values() for outcome in chosen)
    # every check applies to half the rows: the triage ones, or the company questions
    assert [sum(o[c.name] is not None for o in chosen) for c in checks] == [20, 20, 20, 20]
    assert sum(False in outcome.values() for outcome in rejected) >= 30  # the rest are wrong facts or evasions
