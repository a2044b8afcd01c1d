"""Data as users bring it (issue 17): a .json file with one object, empty turns in any role and
format, ShareGPT's tool speakers, LLaMA-Factory's KTO layout. Every refusal names file, line and
field (with the turn index)."""

from __future__ import annotations

import json

import pytest

from stages.core.data import DatasetSpec, load_records
from stages.core.errors import DataError
from tests.conftest import write_jsonl

QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


def test_a_json_file_holding_one_object_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"messages": QA}, indent=2), encoding="utf-8")

    result = load_records(DatasetSpec(str(path)))

    assert [r["messages"] for r in result.records] == [QA]
    assert result.records[0]["source"] == f"{path}:1"


def test_a_json_file_of_one_object_per_line_is_still_json_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ("a", "b", "c")) + "\n", encoding="utf-8")
    assert [r["source"] for r in load_records(DatasetSpec(str(path))).records] == [f"{path}:{n}" for n in (1, 2, 3)]


@pytest.mark.parametrize("text, line", [
    ('{\n  "messages": [\n    {"role": "user", "content": "hi"},\n    {"role": "assistant" "content": "yo"}\n  ]\n}\n', 4),
    ('{\n  "messages": [\n    {"role": "user", "content": "hi"},\n', 4),  # truncated
    ('{"text": "a"}\n{"text": "b",}\n', 2),  # JSON Lines with a bad line
])
def test_malformed_json_names_the_line_and_never_suggests_a_json_file(tmp_path, text, line):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(DatasetSpec(str(path)))
    message = str(info.value)
    assert f"bad.json:{line}" in message and "invalid JSON" in message
    assert ".json file" not in message


CONVERSATIONS = {
    "messages": lambda turns: {"messages": [{"role": r, "content": c} for r, c in turns]},
    "sharegpt": lambda turns: {"conversations": [
        {"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c} for r, c in turns]},
    "preference": lambda turns: {"chosen": [{"role": r, "content": c} for r, c in turns],
                                 "rejected": [{"role": r, "content": c} for r, c in turns[:-1]]
                                 + [{"role": "assistant", "content": "other"}]},
    "kto": lambda turns: {"messages": [{"role": r, "content": c} for r, c in turns], "kto_tag": True},
}
KINDS = {"messages": ("sft", "messages"), "sharegpt": ("sft", "conversations"),
         "preference": ("preference", "chosen"), "kto": ("kto", "messages")}


@pytest.mark.parametrize("layout", CONVERSATIONS)
@pytest.mark.parametrize("turn, role", [(0, "system"), (1, "user"), (2, "assistant")])
def test_an_empty_turn_is_named_by_line_and_turn_whatever_the_role(tmp_path, layout, turn, role):
    turns = [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4."), ("user", "3+3?"), ("assistant", "6.")]
    turns[turn] = (role, " \n\t ")
    kind, column = KINDS[layout]
    path = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[layout](QA_TURNS), CONVERSATIONS[layout](turns)])
    with pytest.raises(DataError) as info:
        load_records(DatasetSpec(str(path)), kind=kind)
    message = str(info.value)
    assert f"chat.jsonl:2 field '{column}[{turn}]." in message, message
    assert f"turn {turn}: the {role} message is empty" in message


QA_TURNS = [("user", "2+2?"), ("assistant", "4.")]


def test_sharegpt_tool_speakers_are_mapped(tmp_path):
    turns = [{"from": "human", "value": "Weather in Paris?"},
             {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
             {"from": "observation", "value": "24C"},
             {"from": "gpt", "value": "24C."},
             {"from": "human", "value": "And Rome?"},
             {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Rome"}})},
             {"from": "tool", "value": "26C"},
             {"from": "gpt", "value": "26C."}]
    path = write_jsonl(tmp_path / "tools.jsonl", [{"conversations": turns}])
    messages = load_records(DatasetSpec(str(path))).records[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] * 2
    assert messages[5]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Rome"}}


@pytest.mark.parametrize("speaker, hint", [("observaton", "did you mean 'observation'?"),
                                           ("function_cal", "did you mean 'function_call'?"),
                                           ("narrator", None)])
def test_an_unknown_sharegpt_speaker_is_refused_with_its_line(tmp_path, speaker, hint):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": speaker, "value": "x"},
                               {"from": "gpt", "value": "yo"}]}]
    path = write_jsonl(tmp_path / "share.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(DatasetSpec(str(path)))
    message = str(info.value)
    assert "share.jsonl:2 field 'conversations[1].from'" in message
    assert f"turn 1: unknown speaker '{speaker}'" in message and "function_call" in message
    assert hint is None or hint in message


def test_llama_factory_kto_layout_is_read_as_kto(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, *QA], "kto_tag": True},
            {"messages": [{"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Berlin."}], "kto_tag": False}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    result = load_records(DatasetSpec(str(path)), kind="kto")

    assert result.format == "kto"
    first, second = result.records
    assert first["prompt"] == [{"role": "system", "content": "Be brief."}, QA[0]]
    assert first["completion"] == [QA[1]] and first["label"] is True
    assert second["label"] is False and second["completion"] == [{"role": "assistant", "content": "Berlin."}]


def test_llama_factory_kto_tag_must_be_a_boolean(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"messages": QA, "kto_tag": "perhaps"}])
    with pytest.raises(DataError, match=r"kto\.jsonl:1 field 'kto_tag': expected true or false"):
        load_records(DatasetSpec(str(path)), kind="kto")
