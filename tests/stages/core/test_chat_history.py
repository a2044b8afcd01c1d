"""Templates that rewrite the past: a reasoning template that drops earlier <think> blocks is trained
one sample per assistant turn (each rendered as the template renders it at that turn), or on the
final turn only; masks are exact by the incremental-rendering check of test_chat.py."""

from __future__ import annotations

import pytest

from stages.core.chat import HistoryRewritten, assistant_mask, assistant_samples
from stages.core.data import tokenize_records
from stages.core.errors import DataError, LorelayError
from tests.stages.core.test_chat import MISTRAL_V3_SYSTEM_LAST, SYSTEM, masked_runs, with_template

# Qwen3-style: the <think> block of an assistant turn is dropped once a later user turn follows.
THINK_DROPPING = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

REASONING = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\nFive."},
    {"role": "user", "content": "And times four?"},
    {"role": "assistant", "content": "<think>\nFive times four.\n</think>\nTwenty."},
    {"role": "user", "content": "Minus one?"},
    {"role": "assistant", "content": "<think>\nTwenty minus one.\n</think>\nNineteen."},
]
TURNS = [1, 3, 5]  # the assistant turns of REASONING


@pytest.fixture(scope="module")
def thinking(tokenizer):
    return with_template(tokenizer, THINK_DROPPING)


def test_the_whole_conversation_has_no_single_mask(thinking):
    with pytest.raises(HistoryRewritten, match="assistant turn 1 differently once later turns follow"):
        assistant_mask(thinking, REASONING)


def test_each_assistant_turn_is_one_sample_rendered_as_at_that_turn(thinking):
    samples, rewritten = assistant_samples(thinking, REASONING, history="per_turn")

    assert rewritten and len(samples) == len(TURNS)
    for (ids, mask), turn in zip(samples, TURNS):
        prefix = REASONING[:turn + 1]
        assert ids == thinking.apply_chat_template(prefix)["input_ids"]
        # exactly this turn, its <think> block included, and its end-of-turn token; nothing earlier
        assert masked_runs(thinking, ids, mask) == [REASONING[turn]["content"] + "<|im_end|>"]
    # earlier turns appear as the template renders them later: without their <think> block
    last_ids, _ = samples[-1]
    assert "Two plus three" not in thinking.decode(last_ids) and "Five." in thinking.decode(last_ids)


def test_final_turn_only_by_setting(thinking):
    samples, rewritten = assistant_samples(thinking, REASONING, history="final_turn")
    assert rewritten and samples == assistant_samples(thinking, REASONING)[0][-1:]


def test_a_stable_template_stays_one_sample_with_every_turn(tokenizer):
    samples, rewritten = assistant_samples(tokenizer, REASONING)  # plain ChatML keeps <think> blocks
    assert not rewritten and samples == [assistant_mask(tokenizer, REASONING)]


def test_a_template_whose_prompt_is_not_its_turns_start_is_still_refused(tokenizer):
    # This template puts the system prompt in the final message only when it is a user turn, so even
    # messages[:3] does not start with the rendering of messages[:2]: no mask can be right.
    tok = with_template(tokenizer, MISTRAL_V3_SYSTEM_LAST, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(LorelayError, match=r"assistant turn 2 cannot be located even on its own"):
        assistant_samples(tok, SYSTEM)


@pytest.mark.parametrize("history, samples, rewritten", [("per_turn", 3 + 1, 1), ("final_turn", 1 + 1, 1)])
def test_tokenized_data_reports_the_history_mode(thinking, history, samples, rewritten):
    records = [{"messages": REASONING, "tools": None, "source": "chat.jsonl:1"},
               {"messages": REASONING[:2], "tools": None, "source": "chat.jsonl:2"}]
    dataset, report = tokenize_records(thinking, records, max_length=None, history=history)

    assert len(dataset) == samples and report.kept == samples and report.records == 2
    summary = report.summary()["history"]
    assert summary["mode"] == history and summary["rewritten_conversations"] == rewritten
    assert ("one sample per assistant turn" if history == "per_turn" else "final assistant turn") in summary["note"]
    assert dataset[samples - 1]["input_ids"] == thinking.apply_chat_template(REASONING[:2])["input_ids"]


def test_a_bad_record_inside_the_map_names_its_line(tokenizer):
    records = [{"messages": [{"role": "user", "content": "hi"}], "tools": None, "source": "chat.jsonl:7"}]
    with pytest.raises(DataError, match=r"chat\.jsonl:7: the conversation has no assistant message"):
        tokenize_records(tokenizer, records, max_length=None)


def test_records_are_tokenized_as_the_template_renders_them_alone(tokenizer):
    # As Arrow rows, the second call's arguments would read {"a": null, "b": null, "city": "Paris"}.
    template = (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{%- for call in m.tool_calls or [] -%}{{ call.function.name + call.function.arguments | tojson }}{%- endfor -%}"
        "{{ '<|im_end|>\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")
    tok = with_template(tokenizer, template)
    records = [{"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": "Calling.", "tool_calls": [
                                 {"type": "function", "function": {"name": name, "arguments": arguments}}]}],
                "tools": None, "source": f"x:{line}"}
               for line, (question, name, arguments) in enumerate(
                   [("Add.", "add", {"a": 1, "b": 2}), ("Weather?", "weather", {"city": "Paris"})], start=1)]
    dataset, _ = tokenize_records(tok, records, max_length=None)

    assert [row["input_ids"] for row in dataset] == [tok.apply_chat_template(r["messages"])["input_ids"] for r in records]
    assert '{"city": "Paris"}' in tok.decode(dataset[1]["input_ids"])
