"""stages.core.data.tokenize: Dataset.map in several processes gives the same samples and report as one,
and a bad record in a worker still names its file and line."""

from __future__ import annotations

import pytest

from stages.core.data import tokenize_records
from stages.core.errors import DataError


def chats(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
             "tools": None, "source": f"chat.jsonl:{i + 1}"} for i in range(count)]


@pytest.mark.slow  # spawns worker processes
def test_two_processes_tokenize_exactly_as_one(tokenizer):
    records = chats(300)  # more rows than one map batch, so the work is split
    one, one_report = tokenize_records(tokenizer, records, max_length=None)
    two, two_report = tokenize_records(tokenizer, records, max_length=None, num_proc=2)

    assert one["input_ids"] == two["input_ids"] and one["assistant_masks"] == two["assistant_masks"]
    assert one_report.summary() == two_report.summary() and one_report.kept == 300

    records[280]["messages"] = records[280]["messages"][:1]
    with pytest.raises(DataError, match=r"chat\.jsonl:281: the conversation has no assistant message"):
        tokenize_records(tokenizer, records, max_length=None, num_proc=2)


def test_truncation_is_counted_per_sample(tokenizer):
    records = chats(3)
    records[1]["messages"][1]["content"] = "A much longer answer " * 20
    dataset, report = tokenize_records(tokenizer, records, max_length=40)

    assert report.truncated == 1 and report.kept == 3 and max(len(ids) for ids in dataset["input_ids"]) == 40
    records[2]["messages"][0]["content"] = "A very long question " * 40  # nothing of the reply survives
    dataset, report = tokenize_records(tokenizer, records, max_length=40)
    assert report.dropped == {"no loss-bearing tokens after truncation": 1} and len(dataset) == 2
