"""stages/core/data/: every format becomes its record form, and every fault names its file, line and field.

All data files are written into tmp_path by the tests themselves; nothing touches the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core.config import describe, from_dict
from stages.core.data import (
    DatasetSpec, data_hash, file_sha256, load_mixture, load_records, mix, mix_counts, split, tree_sha256,
)
from stages.core.errors import ConfigError, DataError, LorelayError
from tests.conftest import write_jsonl


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


QA = chat(("user", "What is 2+2?"), ("assistant", "4"))


def load(tmp_path: Path, rows, *, name: str = "data.jsonl", kind: str = "sft",
         skip_invalid: bool = False, **spec):
    path = write_jsonl(tmp_path / name, rows)
    return load_records(DatasetSpec(str(path), **spec), kind=kind, skip_invalid=skip_invalid)


def load_error(tmp_path: Path, rows, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load(tmp_path, rows, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# Formats -> records
# ----------------------------------------------------------------------------------------------

def test_messages_rows_keep_turns_tools_and_source(tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    calls = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]
    conversation = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": calls},  # tool call: no text is fine
        {"role": "tool", "content": "4", "tool_call_id": "c1", "extra": "dropped"},
        {"role": "assistant", "content": "It is 4."},
    ]
    result = load(tmp_path, [{"messages": QA}, {"messages": conversation, "tools": tools}])

    assert result.format == "messages" and result.form == "chat"
    first, second = result.records
    assert first == {"messages": QA, "tools": None, "source": f"{tmp_path / 'data.jsonl'}:1"}
    assert second["tools"] == tools
    assert second["messages"][1] == {"role": "assistant", "content": "", "tool_calls": calls}
    assert second["messages"][2] == {"role": "tool", "content": "4", "tool_call_id": "c1"}
    assert second["source"].endswith("data.jsonl:2")


def test_system_prompt_is_prepended_only_when_a_chat_has_none(tmp_path):
    own = chat(("system", "Be terse."), *[(m["role"], m["content"]) for m in QA])
    result = load(tmp_path, [{"messages": QA}, {"messages": own}], system_prompt="Be kind.")

    assert result.records[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert result.records[1]["messages"] == own


def test_sharegpt_speakers_map_to_roles(tmp_path):
    row = {
        "system": "You add numbers.",
        "tools": json.dumps([{"name": "add"}]),  # LLaMA-Factory stores tools as a JSON string
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "function_call",
             "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "4"},
            {"from": "user", "value": "And 3+3?"},
            {"from": "model", "value": "6"},
        ],
    }
    record = load(tmp_path, [row]).records[0]

    assert [m["role"] for m in record["messages"]] == [
        "system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert record["messages"][0]["content"] == "You add numbers."
    assert record["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
    assert record["tools"] == [{"name": "add"}]


@pytest.mark.parametrize("row, prompt", [
    ({"instruction": "Translate.", "input": "chat", "output": "cat"}, "Translate.\n\nchat"),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "Say hi."),
    ({"instruction": "Say hi.", "output": "hi"}, "Say hi."),
])
def test_alpaca_rows_become_one_exchange(tmp_path, row, prompt):
    record = load(tmp_path, [row]).records[0]

    assert record["messages"] == chat(("user", prompt), ("assistant", row["output"]))


def test_alpaca_system_becomes_a_system_turn(tmp_path):
    record = load(tmp_path, [{"system": "Be brief.", "instruction": "Hi", "output": "Hello"}]).records[0]

    assert record["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("prompt, completion", [
    ("2+2?", "4"),
    (chat(("system", "Math."), ("user", "2+2?")), chat(("assistant", "4"))),
])
def test_prompt_completion_strings_and_message_lists(tmp_path, prompt, completion):
    record = load(tmp_path, [{"prompt": prompt, "completion": completion}]).records[0]

    expected_prompt = chat(("user", prompt)) if isinstance(prompt, str) else prompt
    expected_completion = chat(("assistant", completion)) if isinstance(completion, str) else completion
    assert record["messages"] == expected_prompt + expected_completion


def test_text_rows(tmp_path):
    result = load(tmp_path, [{"text": "Once upon a time."}], kind="text")

    assert result.records == [{"text": "Once upon a time.", "source": f"{tmp_path / 'data.jsonl'}:1"}]
    assert result.form == "text"


def test_explicit_preference_from_strings_with_margin(tmp_path):
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 2}
    record = load(tmp_path, [row], kind="preference", system_prompt="Math.").records[0]

    assert record["prompt"] == chat(("system", "Math."), ("user", "2+2?"))
    assert record["chosen"] == chat(("assistant", "4"))
    assert record["rejected"] == chat(("assistant", "5"))
    assert record["margin"] == 2.0


def test_explicit_preference_from_message_lists_and_scores(tmp_path):
    row = {"prompt": chat(("user", "2+2?")), "chosen": chat(("assistant", "4")),
           "rejected": chat(("assistant", "5")), "score_chosen": 9, "score_rejected": 6.5}
    record = load(tmp_path, [row], kind="preference").records[0]

    assert record["prompt"] == chat(("user", "2+2?"))
    assert record["margin"] == 2.5


def test_implicit_preference_splits_at_the_longest_common_prefix(tmp_path):
    shared = chat(("system", "Math."), ("user", "1+1?"), ("assistant", "2"), ("user", "2+2?"))
    row = {"chosen": shared + chat(("assistant", "4")), "rejected": shared + chat(("assistant", "5"))}
    record = load(tmp_path, [row], kind="preference").records[0]

    assert record["prompt"] == shared
    assert record["chosen"] == chat(("assistant", "4"))
    assert record["rejected"] == chat(("assistant", "5"))
    assert record["margin"] is None


def test_prompt_repeated_inside_whole_conversations_is_split_like_an_implicit_pair(tmp_path):
    # UltraFeedback-binarized rows: a `prompt` string and whole conversations in chosen/rejected.
    row = {"prompt": "2+2?", "chosen": chat(("user", "2+2?"), ("assistant", "4")),
           "rejected": chat(("user", "2+2?"), ("assistant", "5"))}
    record = load(tmp_path, [row], kind="preference").records[0]

    assert record["prompt"] == chat(("user", "2+2?"))
    assert record["chosen"] == chat(("assistant", "4"))


def test_kto_rows(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "4", "label": True},
            {"prompt": chat(("user", "2+2?")), "completion": chat(("assistant", "5")), "label": False}]
    result = load(tmp_path, rows, kind="kto")

    assert result.format == "kto"
    assert result.records[0] == {"prompt": chat(("user", "2+2?")),
                                 "completion": chat(("assistant", "4")), "label": True,
                                 "source": f"{tmp_path / 'data.jsonl'}:1"}
    assert result.records[1]["label"] is False


# ----------------------------------------------------------------------------------------------
# Errors name the file, the line and the field
# ----------------------------------------------------------------------------------------------

def with_turns(*turns):
    return {"messages": chat(*turns)}


ERROR_CASES = {
    "invalid JSON": ([{"text": "a"}, '{"text": "b",}'], 2, None, "invalid JSON"),
    "missing field": ([{"instruction": "a", "output": "b"}, {"instruction": "a", "ouput": "b"}],
                      2, "output", "the record has 'ouput'"),
    "null value": ([{"text": "a"}, {"text": None}], 2, "text", "is null"),
    "mistyped field": ([{"messages": QA}, {"messages": "hi"}],
                       2, "messages", "expected a list of messages"),
    "unknown role": ([{"messages": QA}, with_turns(("user", "hi"), ("asistant", "yo"))],
                     2, "messages[1].role", "did you mean 'assistant'?"),
    "sharegpt role name in messages": ([with_turns(("human", "hi"), ("assistant", "yo"))],
                                       1, "messages[0].role", "use 'user'"),
    "blank content": ([{"messages": QA}, with_turns(("user", "  \t"), ("assistant", "yo"))],
                      2, "messages[0].content", "the user message is empty"),
    "null content": ([{"messages": QA}, {"messages": [{"role": "user", "content": None}, QA[1]]}],
                     2, "messages[0].content", "content is null"),
    "empty assistant without tool calls": ([with_turns(("user", "hi"), ("assistant", ""))],
                                           1, "messages[1].content", "the assistant message is empty"),
    "no assistant turn": ([{"messages": QA}, with_turns(("system", "s"), ("user", "hi"))],
                          2, "messages", "no assistant turn"),
    "trailing user turn": ([{"messages": QA},
                            with_turns(("user", "a"), ("assistant", "b"), ("user", "c"))],
                           2, "messages[2]", "ends with a 'user' turn"),
    "not an object": ([{"text": "a"}, "[1, 2]"], 2, None, "expected a record"),
    "unknown sharegpt speaker": ([{"conversations": [{"from": "humn", "value": "hi"},
                                                     {"from": "gpt", "value": "yo"}]}],
                                 1, "conversations[0].from", "did you mean 'human'?"),
    "line numbers count blank lines": ([{"text": "a"}, "", "   ", {"text": ""}], 4, "text", "is empty"),
    "alpaca output mistyped": ([{"instruction": "a", "output": 3}], 1, "output", "expected a string"),
}


@pytest.mark.parametrize("rows, line, field, phrase", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_sft_rows_name_line_and_field(tmp_path, rows, line, field, phrase):
    message = load_error(tmp_path, rows)

    assert f"data.jsonl:{line}" in message
    if field is not None:
        assert f"field '{field}'" in message
    assert phrase in message


PREFERENCE_ERRORS = {
    "identical chosen and rejected": ([{"prompt": "q", "chosen": "a", "rejected": "a"}],
                                      "rejected", "identical"),
    "identical whole conversations": ([{"chosen": QA, "rejected": QA}], "rejected", "identical"),
    "user turn after the shared prompt": (
        [{"chosen": QA + chat(("user", "more"), ("assistant", "x")),
          "rejected": QA + chat(("assistant", "y"))}],
        "chosen[2].role", "holds a 'user' message"),
    "no shared prompt": ([{"chosen": chat(("user", "a"), ("assistant", "b")),
                           "rejected": chat(("user", "c"), ("assistant", "d"))}], "chosen", "no prompt"),
    "strings without a prompt": ([{"chosen": "a", "rejected": "b"}],
                                 "prompt", "required field is missing"),
    "one score only": ([{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 1}],
                       "score_rejected", "to compute the margin"),
    "margin not a number": ([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}],
                            "margin", "expected a number"),
}


@pytest.mark.parametrize("rows, field, phrase", PREFERENCE_ERRORS.values(), ids=PREFERENCE_ERRORS.keys())
def test_bad_preference_rows_name_line_and_field(tmp_path, rows, field, phrase):
    message = load_error(tmp_path, rows, kind="preference")

    assert "data.jsonl:1" in message and f"field '{field}'" in message and phrase in message


def test_bad_kto_label_names_its_field(tmp_path):
    message = load_error(tmp_path, [{"prompt": "q", "completion": "a", "label": "maybe"}], kind="kto")

    assert "data.jsonl:1 field 'label'" in message and "expected true or false" in message


def test_errors_name_the_files_own_column_when_columns_are_mapped(tmp_path):
    rows = [{"conversation": QA}, {"conversation": chat(("user", "hi"), ("assistent", "yo"))}]
    message = load_error(tmp_path, rows, columns={"messages": "conversation"})

    assert "data.jsonl:2 field 'conversation[1].role'" in message


# ----------------------------------------------------------------------------------------------
# Hostile input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n"])
def test_an_empty_file_says_it_has_no_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)

    with pytest.raises(DataError, match="no records") as info:
        load_records(DatasetSpec(str(path)))
    assert info.value.file == str(path)


def test_bom_and_crlf_line_endings_are_accepted(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n{"text": "b"}\r\n')

    result = load_records(DatasetSpec(str(path)), kind="text")

    assert [r["text"] for r in result.records] == ["a", "b"]
    assert result.records[1]["source"] == f"{path}:2"


def test_invalid_utf8_names_the_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = b'{"text": "a"}\n'
    path.write_bytes(first + b'{"text": "caf\xe9"}\n')

    with pytest.raises(DataError) as info:
        load_records(DatasetSpec(str(path)), kind="text")
    assert "latin1.jsonl:2" in str(info.value)
    assert f"byte offset {len(first) + 13}" in str(info.value) and "0xe9" in str(info.value)


def test_a_truncated_last_line_is_named_and_suspected(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "unfini', encoding="utf-8")

    message = str(pytest.raises(DataError, load_records, DatasetSpec(str(path)), kind="text").value)

    assert "cut.jsonl:3" in message and "invalid JSON" in message and "truncated" in message


def test_pretty_printed_json_in_a_jsonl_file_gets_a_hint(tmp_path):
    message = load_error(tmp_path, ["{", '  "text": "a"', "}"])

    assert "data.jsonl:1" in message and "whole on one line" in message


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    message = load_error(tmp_path, [{"text": "a"}, "[" * 200_000])

    assert "data.jsonl:2" in message and "invalid JSON" in message


def test_a_very_long_line_loads(tmp_path):
    long_text = "x" * 3_000_000
    result = load(tmp_path, [{"text": long_text}, {"text": "short"}], kind="text")

    assert len(result.records[0]["text"]) == 3_000_000


def test_duplicates_are_counted_and_dropped_only_on_request(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, {"text": "a"}, {"text": "a"}]

    kept = load(tmp_path, rows, kind="text")
    dropped = load(tmp_path, rows, kind="text", drop_duplicates=True)

    assert kept.duplicates == 2 and len(kept.records) == 4
    assert dropped.duplicates == 2 and [r["text"] for r in dropped.records] == ["a", "b"]


def test_conversations_are_duplicates_exactly_when_their_content_is(tmp_path):
    """Plain role/content chats are keyed by their strings, chats with tools or tool calls by a digest:
    both count a repeat, and neither mistakes a near-copy for one."""
    ask, answer = {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "weather", "arguments": {"city": "Paris"}}}]}
    tool = {"role": "tool", "content": "sunny", "name": "weather"}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    rows = [{"messages": [ask, answer]},
            {"messages": [ask, answer]},                                                  # a plain repeat
            {"messages": [ask, {**answer, "content": "Sunny!"}]},                       # differs in one character
            {"messages": [{**ask, "name": "Ann"}, answer]},                             # a speaker's name added
            {"messages": [ask, call, tool, answer], "tools": tools},
            {"messages": [ask, call, tool, answer], "tools": tools},                    # a repeat with tools
            {"messages": [ask, call, {**tool, "name": "forecast"}, answer], "tools": tools},  # another tool name
            {"messages": [ask, answer], "tools": tools}]                                # the first, plus tools

    result = load(tmp_path, rows)

    assert result.duplicates == 2 and len(result.records) == 8


def test_a_plain_directory_is_refused_with_a_pointer_to_its_files(tmp_path):
    write_jsonl(tmp_path / "dir" / "train.jsonl", [{"text": "a"}])

    with pytest.raises(DataError, match="not one written by datasets' save_to_disk") as info:
        load_records(DatasetSpec(str(tmp_path / "dir")))
    assert "train.jsonl" in str(info.value)


def test_a_missing_file_suggests_its_neighbour(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])

    with pytest.raises(DataError, match="file not found") as info:
        load_records(DatasetSpec(str(tmp_path / "trian.jsonl")))
    assert "train.jsonl" in str(info.value)


def test_an_unreachable_hub_id_is_a_clear_error():
    # conftest sets HF_DATASETS_OFFLINE=1, so this fails at once without touching the network.
    with pytest.raises(DataError) as info:
        load_records(DatasetSpec("lorelay-tests/no-such-dataset"))
    assert "not found locally" in str(info.value) and "Hub" in str(info.value)


def test_an_unknown_file_type_lists_the_supported_ones(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello", encoding="utf-8")

    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        load_records(DatasetSpec(str(path)))


def test_skip_invalid_counts_skipped_rows_by_reason(tmp_path):
    rows = [{"messages": QA}, "{broken", with_turns(("usr", "a"), ("assistant", "b")), "{also broken",
            with_turns(("user", "a")), {"messages": QA}]
    result = load(tmp_path, rows, skip_invalid=True)

    assert len(result.records) == 2
    assert result.skipped == {"invalid JSON": 2, "unknown role": 1, "no assistant turn": 1}
    assert "data.jsonl:2" in result.skipped_examples["invalid JSON"]  # the first one is kept
    assert "skipped 4" in result.summary()


def test_skip_invalid_still_refuses_a_file_with_no_good_row(tmp_path):
    message = load_error(tmp_path, [{"text": ""}, {"text": None}], kind="text", skip_invalid=True)

    assert "no usable records" in message and "1 empty content" in message and "1 null value" in message


def test_every_fault_is_a_lorelay_error(tmp_path):
    # The CLI prints LorelayError without a traceback; nothing user-caused may escape as another type.
    hostile = ["\x00\x01", "[]", "null", '{"messages": {"role": "user"}}', '{"messages": [null]}',
               '{"messages": [{"role": 3, "content": "x"}]}',
               '{"messages": [{"role": "user", "content": ["a"]}]}',
               '{"messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]}']
    for index, line in enumerate(hostile):
        with pytest.raises(LorelayError):
            load(tmp_path / str(index), [line])


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, kind, expected", [
    ({"messages": QA}, "sft", "messages"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "sft", "sharegpt"),
    ({"instruction": "a", "input": "", "output": "b"}, "sft", "alpaca"),
    ({"prompt": "a", "completion": "b"}, "sft", "prompt_completion"),
    ({"text": "a", "meta": 1}, "sft", "text"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference", "preference"),
    ({"chosen": QA, "rejected": chat(("user", QA[0]["content"]), ("assistant", "5"))},
     "preference", "preference"),
    ({"prompt": "a", "completion": "b", "label": True}, "kto", "kto"),
])
def test_the_format_is_detected_from_the_first_records_keys(tmp_path, row, kind, expected):
    assert load(tmp_path, [row], kind=kind).format == expected


def test_undetectable_rows_say_which_keys_were_expected(tmp_path):
    message = load_error(tmp_path, [{"mesages": QA}])

    assert "data.jsonl:1" in message and "(mesages)" in message
    assert "messages (messages)" in message and "alpaca (instruction + output)" in message
    assert "'mesages' looks like 'messages'" in message


def test_a_dataset_of_the_wrong_kind_is_refused(tmp_path):
    message = load_error(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}], kind="sft")

    assert "holds preference records, but sft training needs one of" in message


def test_a_declared_format_wins_over_detection_and_must_suit_the_kind(tmp_path):
    row = {"text": "ignored", "instruction": "a", "output": "b"}
    assert load(tmp_path, [row], format="alpaca").records[0]["messages"][1]["content"] == "b"

    with pytest.raises(ConfigError, match="format 'alpaca' cannot be used for preference"):
        load(tmp_path, [row], format="alpaca", kind="preference")


def test_columns_map_the_files_names_to_ours(tmp_path):
    rows = [{"question": "What is 2+2?", "answer": "4"}]
    record = load(tmp_path, rows, columns={"prompt": "question", "completion": "answer"}).records[0]

    assert record["messages"] == QA


def test_a_mapped_column_missing_from_the_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, [{"question": "a", "answer": "b"}], columns={"prompt": "questoin"})
    assert "columns.prompt" in str(info.value) and "did you mean 'question'?" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Readers: CSV, JSON, Parquet, datasets directories
# ----------------------------------------------------------------------------------------------

def test_csv_rows_carry_their_line_in_the_file(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\r\n'
                    'Say hi,,hi\r\n'
                    '"Write two\r\nlines",,"a\r\nb"\r\n'
                    'Echo,x,\r\n', encoding="utf-8")

    with pytest.raises(DataError) as info:
        load_records(DatasetSpec(str(path)))
    # the header is line 1 and the row with quoted line breaks spans lines 3-5: the empty output is on 6
    assert "alpaca.csv:6 field 'output'" in str(info.value)

    result = load_records(DatasetSpec(str(path)), skip_invalid=True)
    assert [r["source"] for r in result.records] == [f"{path}:2", f"{path}:3"]
    assert result.records[1]["messages"][0]["content"] == "Write two\r\nlines"


def test_csv_preference_and_kto_values_are_parsed_from_text(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("prompt\tchosen\trejected\tmargin\nq\ta\tb\t0.5\nq2\ta\tb\t\n", encoding="utf-8")
    unpaired = tmp_path / "kto.csv"
    unpaired.write_text("prompt,completion,label\nq,a,true\nq,b,0\n", encoding="utf-8")

    margins = [r["margin"] for r in load_records(DatasetSpec(str(pairs)), kind="preference").records]
    labels = [r["label"] for r in load_records(DatasetSpec(str(unpaired)), kind="kto").records]
    assert margins == [0.5, None] and labels == [True, False]


def test_csv_rows_with_a_wrong_cell_count_are_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text\nfine\n\"a\",\"b\"\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"bad\.csv:3: has 2 cells but the header has 1"):
        load_records(DatasetSpec(str(path)), kind="text")


def test_csv_message_lists_get_a_hint_to_use_jsonl(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user""}]"\n', encoding="utf-8")

    with pytest.raises(DataError, match="keep message lists in JSONL"):
        load_records(DatasetSpec(str(path)))


def test_json_lists_report_the_line_and_record(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"},\n  {\n    "text": ""\n  }\n]\n',
                    encoding="utf-8")

    with pytest.raises(DataError) as info:
        load_records(DatasetSpec(str(path)), kind="text")
    assert "list.json:4 field 'text': record 2: is empty" in str(info.value)

    result = load_records(DatasetSpec(str(path)), kind="text", skip_invalid=True)
    assert [r["source"] for r in result.records] == [f"{path}:2", f"{path}:3"]


def test_json_files_holding_json_lines_are_read_as_such(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}])

    assert len(load_records(DatasetSpec(str(path)), kind="text").records) == 2


@pytest.mark.parametrize("content, phrase", [
    ('[{"text": "a"},\n {"text": "b"', "truncated"),
    ('[{"text": "a"} {"text": "b"}]', "Expecting ',' or ']'"),
    ('"just a string"', "expected a JSON list of records"),
])
def test_broken_json_lists_are_named(tmp_path, content, phrase):
    path = tmp_path / "broken.json"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(DataError, match=phrase) as info:
        load_records(DatasetSpec(str(path)), kind="text")
    assert info.value.line is not None


def test_parquet_rows_report_their_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    rows = [{"messages": QA}, {"messages": chat(("user", "a"), ("assistant", " "))}]
    pq.write_table(pa.Table.from_pylist(rows), path)

    wanted = r"chat\.parquet field 'messages\[1\]\.content': row 1: turn 1: the assistant message is empty"
    with pytest.raises(DataError, match=wanted):
        load_records(DatasetSpec(str(path)))
    result = load_records(DatasetSpec(str(path)), skip_invalid=True)
    assert result.records == [{"messages": QA, "tools": None, "source": f"{path} row 0"}]


def test_datasets_directories_and_their_splits(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}]).save_to_disk(str(single))
    several = tmp_path / "several"
    splits = {"train": [{"text": "t"}], "test": [{"text": "e"}]}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
                         ).save_to_disk(str(several))

    record = load_records(DatasetSpec(str(single))).records[0]
    assert record["messages"] == chat(("user", "q"), ("assistant", "a"))
    assert record["source"] == f"{single} row 0"
    assert load_records(DatasetSpec(str(several), split="test"), kind="text").records[0]["text"] == "e"
    with pytest.raises(DataError, match="has no split 'tset'.*did you mean 'test'"):
        load_records(DatasetSpec(str(several), split="tset"), kind="text")


# ----------------------------------------------------------------------------------------------
# Mixing and splitting
# ----------------------------------------------------------------------------------------------

def records(name: str, count: int) -> list[dict]:
    return [{"text": f"{name}{index}", "source": f"{name}:{index + 1}"} for index in range(count)]


def test_without_weights_every_record_is_used_once():
    a, b = records("a", 5), records("b", 7)

    mixed = mix([(DatasetSpec("a.jsonl"), a), (DatasetSpec("b.jsonl"), b)], seed=0)

    assert sorted(r["text"] for r in mixed) == sorted(r["text"] for r in a + b)


def test_weights_set_shares_of_the_total_and_are_deterministic_per_seed():
    inputs = [(DatasetSpec("a.jsonl", weight=3), records("a", 10)),
              (DatasetSpec("b.jsonl", weight=1), records("b", 10))]

    first, again, other = mix(inputs, seed=1), mix(inputs, seed=1), mix(inputs, seed=2)

    assert len(first) == 20
    assert sum(r["text"].startswith("a") for r in first) == 15  # 3/4 of 20, a upsampled
    assert first == again and first != other


def test_samples_take_an_exact_count_repeating_only_when_needed():
    small, large = records("s", 4), records("l", 100)
    inputs = [(DatasetSpec("s.jsonl", samples=10), small), (DatasetSpec("l.jsonl", samples=3), large)]

    mixed = mix(inputs, seed=0)

    from_small = [r["text"] for r in mixed if r["text"].startswith("s")]
    from_large = [r["text"] for r in mixed if r["text"].startswith("l")]
    assert len(from_small) == 10 and {from_small.count(t) for t in set(from_small)} <= {2, 3}
    assert len(from_large) == 3 == len(set(from_large))
    assert mix(inputs, seed=0) == mixed


def test_weights_on_some_datasets_only_are_refused():
    with pytest.raises(ConfigError, match="'b.jsonl' has no weight"):
        mix_counts([(DatasetSpec("a.jsonl", weight=1), 3), (DatasetSpec("b.jsonl"), 3),
                    (DatasetSpec("c.jsonl", samples=2), 3)])


def test_weighted_counts_add_up_to_the_total():
    specs = [DatasetSpec(f"{i}.jsonl", weight=1) for i in range(3)]

    assert mix_counts([(spec, 10) for spec in specs]) == [10, 10, 10]
    assert sum(mix_counts(list(zip(specs, [7, 1, 3])))) == 11


def test_split_is_seeded_disjoint_and_complete():
    data = records("r", 50)

    train, evaluation = split(data, 0.2, seed=3)

    assert len(evaluation) == 10 and len(train) == 40
    assert {r["source"] for r in train}.isdisjoint(r["source"] for r in evaluation)
    assert sorted(r["source"] for r in train + evaluation) == sorted(r["source"] for r in data)
    assert split(data, 0.2, seed=3) == (train, evaluation)
    assert split(data, 0.2, seed=4)[1] != evaluation
    assert split(data, 0.0, seed=3) == (data, [])


def test_split_refuses_ratios_it_cannot_honour():
    with pytest.raises(ConfigError, match="eval_ratio"):
        split(records("r", 10), 1.0, seed=0)
    with pytest.raises(DataError, match="too few"):
        split(records("r", 1), 0.5, seed=0)


def test_load_mixture_holds_out_eval_reports_and_hashes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl",
                    [{"messages": chat(("user", f"q{i}"), ("assistant", "a"))} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)])
    specs = [DatasetSpec(str(a)), DatasetSpec(str(b), samples=30)]

    mixture = load_mixture(specs, kind="sft", seed=0, eval_ratio=0.1)

    assert mixture.form == "chat"
    assert len(mixture.eval) == 3 and len(mixture.train) == 18 + 30
    assert {r["source"] for r in mixture.eval}.isdisjoint(r["source"] for r in mixture.train)
    rows = [(e["path"], e["format"], e["records"], e["used"], e["held_out"]) for e in mixture.report]
    assert rows == [(str(a), "messages", 20, 18, 2), (str(b), "prompt_completion", 10, 30, 1)]
    assert mixture.data_hashes == {str(a): file_sha256(a), str(b): file_sha256(b)}
    assert load_mixture(specs, kind="sft", seed=0, eval_ratio=0.1).train == mixture.train


def test_load_mixture_with_eval_datasets(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(4)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": f"e{i}"} for i in range(2)])

    specs, eval_specs = [DatasetSpec(str(train))], [DatasetSpec(str(held))]
    mixture = load_mixture(specs, "text", seed=0, eval_specs=eval_specs)

    assert sorted(r["text"] for r in mixture.eval) == ["e0", "e1"]
    assert [e["role"] for e in mixture.report] == ["train", "eval"]
    # eval datasets replace the held-out share: the training data stays whole
    with_ratio = load_mixture(specs, "text", seed=0, eval_ratio=0.5, eval_specs=eval_specs)
    assert len(with_ratio.train) == 4 and len(with_ratio.eval) == 2


def test_load_mixture_refuses_chat_and_text_together(tmp_path):
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": QA}])
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": "a"}])

    with pytest.raises(ConfigError, match="cannot mix record forms"):
        load_mixture([DatasetSpec(str(chats)), DatasetSpec(str(texts))], "sft", seed=0)


def test_data_hash_covers_files_directories_and_hub_ids(tmp_path):
    write_jsonl(tmp_path / "d" / "x.jsonl", [{"text": "a"}])
    before = tree_sha256(tmp_path / "d")
    write_jsonl(tmp_path / "d" / "x.jsonl", [{"text": "b"}])

    assert data_hash(str(tmp_path / "d")) != before
    assert data_hash("org/name") == "hub:org/name"


# ----------------------------------------------------------------------------------------------
# DatasetSpec
# ----------------------------------------------------------------------------------------------

def test_spec_builds_from_config_data_and_documents_every_field():
    spec = from_dict(DatasetSpec, {"path": "d.jsonl", "format": "sharegpt",
                                   "columns": {"conversations": "c"}, "weight": 2})

    assert spec.columns == {"conversations": "c"} and spec.weight == 2.0
    assert all(help_text for _key, _default, help_text in describe(DatasetSpec))


@pytest.mark.parametrize("values, field, phrase", [
    ({"format": "sharegtp"}, "format", "did you mean 'sharegpt'?"),
    ({"weight": -1.0}, "weight", "positive"),
    ({"samples": 0}, "samples", "positive"),
    ({"weight": 1.0, "samples": 5}, "samples", "not both"),
    ({"columns": {"mesages": "conv"}}, "columns.mesages", "did you mean 'messages'?"),
    ({"path": " "}, "path", "must name"),
    ({"system_prompt": ""}, "system_prompt", "non-empty"),
])
def test_spec_refuses_bad_values_by_field(values, field, phrase):
    with pytest.raises(ConfigError) as info:
        DatasetSpec(**{"path": "d.jsonl", **values})
    assert info.value.field == field and phrase in str(info.value)


@pytest.mark.spawn
def test_importing_data_loads_no_heavy_library():
    heavy = ("torch", "transformers", "datasets", "pyarrow")
    code = f"import sys, stages.core.data; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])

    assert out.stdout.strip() == "[]"
