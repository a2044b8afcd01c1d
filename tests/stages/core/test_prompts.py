"""Prompt datasets with reference columns (GRPO's input)."""

from __future__ import annotations

import pytest

from stages.core.data import DatasetSpec
from stages.core.errors import DataError
from stages.core.prompts import load_prompts
from tests.conftest import write_jsonl


def test_prompt_forms_become_conversations_with_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Route: charged twice", "answer": "billing"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello — N"}],
         "sign_off": "— N"},
        {"prompt": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Why?"}],
         "completion": "Because."},
    ])
    prompts = load_prompts([DatasetSpec(path=str(path), system_prompt="You triage.")], seed=0)
    by_text = {r["prompt"][-1]["content"]: r for r in prompts.train}
    assert prompts.columns == ["answer", "reference", "sign_off"]
    assert by_text["Route: charged twice"]["prompt"][0] == {"role": "system", "content": "You triage."}
    assert by_text["Route: charged twice"]["answer"] == "billing" and by_text["Hi"]["answer"] is None
    assert by_text["Hi"]["reference"] == "Hello — N" and by_text["Hi"]["prompt"][-1]["role"] == "user"
    assert by_text["Why?"]["prompt"][0]["content"] == "Be brief" and by_text["Why?"]["reference"] == "Because."
    assert by_text["Hi"]["source"].endswith("p.jsonl:2")


def test_held_out_prompts_are_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(10)])
    first = load_prompts([DatasetSpec(path=str(path))], seed=3, eval_count=3)
    again = load_prompts([DatasetSpec(path=str(path))], seed=3, eval_count=3)
    assert [r["prompt"] for r in first.eval] == [r["prompt"] for r in again.eval]
    assert len(first.eval) == 3 and len(first.train) == 7
    assert not {r["source"] for r in first.eval} & {r["source"] for r in first.train}


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "answer": "x"}, {"prompt": "b", "answer": ["x"]}], "column 'answer' holds a str at .*:1 and a list"),
    ([{"prompt": "a", "completions": "x"}], "p.jsonl:1 field 'completions'.*trainer uses itself"),
    ([{"messages": [{"role": "assistant", "content": "x"}]}], "p.jsonl:1 .*must end with a user turn"),
    ([{"text": "no prompt"}], "p.jsonl:1 .*expected a `prompt`"),
])
def test_bad_prompt_rows_are_named(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_prompts([DatasetSpec(path=str(path))], seed=0)
