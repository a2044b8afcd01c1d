"""The evaluation block: prompts are read with their line on error, and wins are counted like a judge would."""

from __future__ import annotations

import pytest

from stages.core.errors import DataError
from stages.core.evaluation import read_prompts, reward_verdicts, task_accuracy
from tests.conftest import write_jsonl


def test_read_prompts_keeps_columns_and_names_the_bad_line(tmp_path):
    good = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Where is my parcel?", "queue": "shipping"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}])
    prompts = read_prompts(good)
    assert [p["messages"][-1]["content"] for p in prompts] == ["Where is my parcel?", "Hi"]
    assert prompts[0]["columns"] == {"queue": "shipping"} and prompts[1]["source"].endswith("prompts.jsonl:2")
    assert len(read_prompts(good, limit=1)) == 1
    ends_with_reply = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok"}, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*must end with a user turn, not 'assistant'"):
        read_prompts(ends_with_reply)


def test_reward_verdicts_count_the_same_reply_as_a_tie_whatever_its_score():
    verdicts = reward_verdicts([1.0, 0.2, 0.5, 0.30], [0.5, 0.9, 0.5 + 1e-7, 0.25],
                               my_replies=["a", "b", "c", "d"], their_replies=["x", "y", "c", "z"], tie_margin=0.1)
    assert verdicts == [1, -1, 0, 0]  # same text; within the margin
    assert reward_verdicts([0.3], [0.2]) == [1] and reward_verdicts([0.2], [0.2]) == [0]


def test_task_accuracy_answers_batch_size_prompts_per_generate_call_with_the_same_answers(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    items = [{"prompt": f"Route ticket {n}: my {'parcel' * (n % 3 + 1)} is late", "answer": "delivery"}
             for n in range(10)]
    calls = []
    generate = model.generate
    model.generate = lambda **kwargs: calls.append(len(kwargs["input_ids"])) or generate(**kwargs)
    one_by_one = task_accuracy(model, tokenizer, items, max_new_tokens=4, batch_size=1)
    together = task_accuracy(model, tokenizer, items, max_new_tokens=4, batch_size=8)
    assert calls == [1] * 10 + [8, 2]
    assert [e["generated"] for e in together["examples"]] == [e["generated"] for e in one_by_one["examples"]]
