"""lorelay data check: plain-text corpora get CPT's checks file by file, --kind selects the checks when
the format does not say, progress shows only on a terminal, and the template worker process reports what
the check in one process reports."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from pipelines.data_check import check_command, corpus_kind
from stages.core import tokenizer_loading
from stages.core.errors import DataError
from tests.conftest import write_jsonl

DOCS = {"a.txt": "The pool robot cleans the floor.\n", "notes/b.md": "# Refunds\n\nRefunds take five days.\n"}


@pytest.fixture(autouse=True)
def session_tokenizer(monkeypatch, tokenizer):
    # the tokenizer is loaded once per session; loading it again per check only costs time
    monkeypatch.setattr(tokenizer_loading, "load_tokenizer", lambda path, config, alone: (tokenizer, None))


def run_check(path, smollm2_dir, *, terminal: bool = False, worker: bool = False, **options) -> tuple[int, str]:
    """The check's status and report. ``worker=False`` (most tests): the session's tokenizer, in this process."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200, color_system=None)
    status = check_command(str(path), model=str(smollm2_dir), console=console, worker=worker, **options)
    return status, out.getvalue()


def cell(out: str, name: str) -> str:
    """The value beside ``name`` in the printed table."""
    for line in out.splitlines():
        cells = [part.strip() for part in line.split("│")]
        if len(cells) > 2 and cells[1] == name:
            return cells[2]
    raise AssertionError(f"no row {name!r} in:\n{out}")


def test_a_text_corpus_is_counted_with_cpts_reader(tmp_path, smollm2_dir, tokenizer):
    for name, text in DOCS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "blank.md").write_text(" \n\n", encoding="utf-8")

    status, out = run_check(tmp_path, smollm2_dir)

    expected = sum(len(tokenizer(t.strip(), add_special_tokens=False)["input_ids"]) + 1 for t in DOCS.values())
    assert status == 0, out
    assert cell(out, "kind") == "cpt (plain-text corpus)"
    assert cell(out, "tokens") == f"{expected} (each document ends with EOS)"
    assert cell(out, "documents") == "2" and cell(out, "empty documents (skipped)") == "1"  # the blank file


def test_bad_text_files_are_named_and_the_others_still_checked(tmp_path, smollm2_dir):
    (tmp_path / "good.txt").write_text("Fine text.\n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"text\nmore\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("line one\ncaf\xe9\n".encode("latin-1"))

    status, out = run_check(tmp_path, smollm2_dir)

    assert status == 1
    assert f"{tmp_path / 'binary.txt'}:2: looks like a binary file" in out
    assert f"{tmp_path / 'latin1.txt'}:2: not valid UTF-8" in out
    assert cell(out, "bad files") == "2" and cell(out, "documents") == "1"


def test_kind_selects_the_checks_when_the_format_does_not_say(tmp_path, smollm2_dir):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "One document."}, {"text": "Another one."}])
    assert not corpus_kind(str(data), "auto") and corpus_kind(str(data), "cpt") and corpus_kind(str(data), "text")

    status, out = run_check(data, smollm2_dir, kind="cpt")
    assert status == 0 and cell(out, "kind") == "cpt (plain-text corpus)" and cell(out, "documents") == "2"

    kto = write_jsonl(tmp_path / "kto.jsonl", [{"messages": [{"role": "user", "content": "2+2?"},
                                                             {"role": "assistant", "content": "4"}], "label": True}])
    status, out = run_check(kto, smollm2_dir, kind="kto", data_format="kto")
    assert status == 0 and cell(out, "format") == "kto"
    with pytest.raises(DataError, match="but preference training needs one of: preference"):
        run_check(kto, smollm2_dir, kind="preference")


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_shows_only_on_a_terminal(tmp_path, smollm2_dir, terminal):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(300)]
    rows.insert(7, {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    status, out = run_check(data, smollm2_dir, terminal=terminal, sample=50)

    assert status == 1 and "chat.jsonl:8 field 'messages[0].content': turn 0: the user message is empty" in out
    assert cell(out, "chat template checked on") == "a seeded sample of 50 of 300 rows"
    assert ("reading rows" in out) == terminal and ("rendering the chat template" in out) == terminal


def chat_rows(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"{i}."}]}
            for i in range(count)]


@pytest.mark.slow
def test_the_template_worker_reports_what_the_check_in_one_process_reports(tmp_path, smollm2_dir):
    rows = chat_rows(150)
    rows[3]["messages"].append({"role": "user", "content": "and?"})  # ends without a reply: a bad row
    data = write_jsonl(tmp_path / "chat.jsonl", rows)

    local = run_check(data, smollm2_dir, sample=120)
    in_worker = run_check(data, smollm2_dir, sample=120, worker=True)

    assert in_worker == local and local[0] == 1
    assert cell(local[1], "chat template checked on") == "a seeded sample of 120 of 149 rows"
    assert "chat.jsonl:4 field 'messages[2]': ends with a 'user' turn" in local[1]


@pytest.mark.slow
def test_a_tokenizer_the_worker_cannot_load_is_reported_before_the_datas_own_faults(tmp_path):
    from stages.core.errors import LorelayError

    missing_model = tmp_path / "no-such-model"
    with pytest.raises(LorelayError) as caught:  # the data file is missing too: the tokenizer was always first
        run_check(tmp_path / "missing.jsonl", missing_model, worker=True)
    assert not isinstance(caught.value, DataError)
    assert caught.value.file == str(missing_model) and caught.value.field == "model.name"
    assert "cannot load a tokenizer" in caught.value.reason
