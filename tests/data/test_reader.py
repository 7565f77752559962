import json
import logging

import pytest

from nlm.data.reader import ReadStats, iter_records, load_records
from nlm.errors import DataError
from tests.conftest import write_jsonl

GOOD = {"prompt": "p", "completion": "c"}


def test_each_format_is_detected_and_normalised(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        GOOD,
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])
    records, stats = load_records([path])
    assert [r["format"] for r in records] == ["prompt_completion", "text", "chat"]
    assert records[0]["prompt"] == "p" and records[1]["text"] == "plain text"
    assert json.loads(records[2]["messages"])[1] == {"role": "assistant", "content": "hello"}
    assert stats.formats == {"prompt_completion": 1, "text": 1, "chat": 1}


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_object"),
        (b'"a string"', "not_object"),
        (b'{"prompt": 1, "completion": "x"}', "wrong_type"),
        (b'{"prompt": "only prompt"}', "wrong_type"),
        (b'{"text": ["a"]}', "wrong_type"),
        (b'{"messages": "hi"}', "wrong_type"),
        (b'{"messages": [{"role": "user"}]}', "wrong_type"),
        (b'{"question": "q", "answer": "a"}', "unknown_format"),
        (b'{"text": "\xff\xfe bad"}', "invalid_utf8"),
        (b'{"text": "' + b"x" * 2000 + b'"}', "too_large"),
    ],
)
def test_every_skip_reason_is_counted_and_logged_with_file_and_line(tmp_path, caplog, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with caplog.at_level(logging.WARNING):
        records, stats = load_records([path], max_line_bytes=1024)
    assert len(records) == 2
    assert stats.skipped == {reason: 1} and stats.lines == 3 and stats.valid == 2
    per_line = [r.getMessage() for r in caplog.records if "line 2 skipped" in r.getMessage()]
    assert per_line and f"{path} line 2 skipped ({reason})" in per_line[0]
    assert any("skipped 1 of 3 lines" in r.getMessage() for r in caplog.records)


def test_skip_messages_never_contain_the_line_content(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"secret_field": "SENSITIVE-CONTENT"}\n')
    with caplog.at_level(logging.DEBUG):
        load_records([path])
    assert "SENSITIVE-CONTENT" not in caplog.text


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\r\n" + json.dumps({"text": "t"}).encode() + b"\r\n")
    records, stats = load_records([path])
    assert len(records) == 2 and not stats.skipped


def test_empty_fields_are_kept_and_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "completion": "c"}, {"text": "  "}, GOOD])
    with caplog.at_level(logging.WARNING):
        records, stats = load_records([path])
    assert len(records) == 3 and stats.empty_fields == 2
    assert "2 records have an empty" in caplog.text


def test_a_file_of_only_bad_lines_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("nope\n[1]\n")
    with pytest.raises(DataError, match=r"bad.jsonl: none of its lines is a usable record \(invalid_json: 1, not_object: 1\)"):
        load_records([path])


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.mkdir(), "not a regular file"),
])
def test_missing_empty_or_odd_files_are_errors_naming_the_path(tmp_path, make, message):
    path = tmp_path / "x.jsonl"
    make(path)
    with pytest.raises(DataError, match=message) as info:
        load_records([path])
    assert str(path) in str(info.value)


def test_unreadable_file_is_an_error(tmp_path, monkeypatch):
    from pathlib import Path

    path = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(DataError, match=r"x.jsonl cannot be read: Permission denied"):
        load_records([path])


def test_records_stream_without_reading_the_whole_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 5)
    stats = ReadStats()
    iterator = iter_records([path], stats)
    next(iterator)
    assert stats.lines == 1  # one line read for one record
