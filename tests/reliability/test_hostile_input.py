"""Hostile input: every broken file gets one clear error naming the file and line (or, with
skip_invalid, a count of skipped rows by reason); never a traceback, never a partial output.
(tests/stages/test_data.py covers the readers case by case; this walks the issue's list end to end.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from stages.core.data import MAX_LINE_BYTES, DatasetSpec, load_mixture, load_records
from stages.core.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
GOOD = b'{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}'


def lines(*rows: bytes, end: bytes = b"\n") -> bytes:
    return b"".join(row + end for row in rows)


# (file content, line the error names, phrase of the error, reason counted when skipping)
BROKEN_ROWS = {
    "invalid UTF-8": (lines(GOOD, GOOD.replace(b"2+2?", b"caf\xe9"), GOOD), 2, "not valid UTF-8", "invalid UTF-8"),
    "truncated last line": (lines(GOOD, GOOD) + GOOD[:30], 3, "truncated", "invalid JSON"),
    "wrong type": (lines(GOOD, GOOD.replace(b'"4"', b"4"), GOOD), 2, "field 'messages[1].content': expected text",
                   "wrong type"),
    "null field": (lines(GOOD, b'{"messages": null}', GOOD), 2, "field 'messages': is null", "null value"),
    "null row": (lines(GOOD, b"null", GOOD), 2, "expected a record", "not an object"),
    "a list where a record belongs": (lines(GOOD, b"[1, 2]", GOOD), 2, "got a list", "not an object"),
}


@pytest.mark.parametrize("case", BROKEN_ROWS)
def test_a_broken_row_is_named_or_counted_when_skipping(tmp_path, case):
    content, line, phrase, reason = BROKEN_ROWS[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)

    with pytest.raises(DataError) as info:
        load_records(DatasetSpec(str(path)))
    assert f"{path}:{line}" in str(info.value) and phrase in str(info.value)

    mixture = load_mixture([DatasetSpec(str(path))], kind="sft", seed=0, skip_invalid=True)
    assert mixture.report[0]["skipped"] == {reason: 1}  # what metrics.json reports under data.datasets
    assert len(mixture.train) == content.count(b"\n") + (not content.endswith(b"\n")) - 1


def test_bom_and_crlf_load_with_true_line_numbers(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines(GOOD, GOOD.replace(b"2+2?", b"3+3?"), end=b"\r\n"))
    records = load_records(DatasetSpec(str(path))).records
    assert [r["source"] for r in records] == [f"{path}:1", f"{path}:2"]
    assert records[0]["messages"][0]["content"] == "2+2?"  # no BOM left in the first key or value


def test_an_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="no records") as info:
        load_records(DatasetSpec(str(path)))
    assert info.value.file == str(path)


def test_duplicates_are_counted_and_dropped_on_request(tmp_path):
    path = tmp_path / "dups.jsonl"
    path.write_bytes(lines(GOOD, GOOD, GOOD.replace(b"2+2?", b"1+1?"), GOOD))
    kept = load_mixture([DatasetSpec(str(path))], kind="sft", seed=0)
    dropped = load_mixture([DatasetSpec(str(path), drop_duplicates=True)], kind="sft", seed=0)
    assert kept.report[0]["duplicates"] == 2 and len(kept.train) == 4
    assert dropped.report[0]["duplicates"] == 2 and len(dropped.train) == 2


def test_a_directory_where_a_file_is_expected(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(lines(GOOD))
    with pytest.raises(DataError, match="is a directory") as info:
        load_records(DatasetSpec(str(tmp_path / "data")))
    assert str(tmp_path / "data") in str(info.value) and "train.jsonl" in str(info.value)

    from stages.core.config import load_config
    from stages.sft import SFTConfig

    with pytest.raises(ConfigError, match="expected a YAML file, found a directory"):
        load_config(SFTConfig, tmp_path / "data")


def test_a_100_mb_line_is_refused_by_line_with_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as handle:
        handle.write(GOOD + b'\n{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(100):
            handle.write(chunk)
        handle.write(b'"}\n' + GOOD + b"\n")
    assert path.stat().st_size > 100 << 20

    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_records(DatasetSpec(str(path)))
        result = load_records(DatasetSpec(str(path)), skip_invalid=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert f"{path}:2" in str(info.value) and "100 MiB long" in str(info.value)
    assert [r["source"] for r in result.records] == [f"{path}:1", f"{path}:3"]
    assert result.skipped == {"line too long": 1}
    # Bounded by the line limit, not the line: readline(limit) holds its pieces and their join at once.
    assert peak < 2 * MAX_LINE_BYTES + (16 << 20), f"peak {peak >> 20} MiB"


@pytest.mark.spawn
def test_the_cli_names_file_and_line_without_a_traceback_and_touches_no_output(tmp_path, tiny_model_dir):
    from tests.reliability.test_atomic_output import commit

    commit(tmp_path / "sft", "an earlier result")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sft").iterdir()}
    data = tmp_path / "data.jsonl"
    data.write_bytes(BROKEN_ROWS["wrong type"][0])
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{name: '{tiny_model_dir}'}}\n"
                      f"data: {{datasets: [{{path: '{data}'}}]}}\n"
                      f"training: {{output_dir: '{tmp_path / 'sft'}'}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LORELAY_QUIET": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "sft", "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"lorelay: error: {data}:2 field 'messages[1].content': expected text" in done.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "sft").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "sft", "sft.yaml"]
    assert json.loads(before["metrics.json"]) == {"loss": 1.0}
