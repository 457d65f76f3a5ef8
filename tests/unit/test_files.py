"""Reading texts from txt/CSV/JSONL and writing JSONL/CSV results."""

from __future__ import annotations

import csv
import io
import json

import pytest

from producer.files import ResultWriter, count_records, detect_format, read_texts


def test_reads_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("하나\n둘\n\n셋\n", encoding="utf-8")
    assert list(read_texts(tmp_path / "a.txt", "txt")) == ["하나", "둘", "", "셋"]
    assert count_records(tmp_path / "a.txt", "txt") == 4
    (tmp_path / "a.csv").write_text('id,text\n1,"쉼표, 포함"\n2,"줄\n바꿈"\n', encoding="utf-8")
    assert list(read_texts(tmp_path / "a.csv", "csv")) == ["쉼표, 포함", "줄\n바꿈"]
    assert count_records(tmp_path / "a.csv", "csv") == 2  # records, not lines
    (tmp_path / "a.jsonl").write_text('{"text": "가"}\n\n{"text": "나", "x": 1}\n', encoding="utf-8")
    assert list(read_texts(tmp_path / "a.jsonl", "jsonl")) == ["가", "나"]
    assert count_records(tmp_path / "a.jsonl", "jsonl") == 2


def test_missing_column_or_field_is_named(tmp_path):
    (tmp_path / "a.csv").write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no column 'text'"):
        list(read_texts(tmp_path / "a.csv", "csv"))
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'text'"):
        list(read_texts(tmp_path / "a.jsonl", "jsonl"))


def test_unreadable_records_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "가"}\n\n{"text": 나}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:3: not JSON \(Expecting value\)"):
        count_records(tmp_path / "a.jsonl", "jsonl", "text")
    (tmp_path / "a.csv").write_text("text\n가\n" + "나" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.csv:3: field larger than field limit"):
        list(read_texts(tmp_path / "a.csv", "csv"))
    (tmp_path / "a.txt").write_bytes("가\n".encode() + b"\xff\n")
    with pytest.raises(ValueError, match=r"a.txt: not UTF-8 text \(invalid start byte\)"):
        list(read_texts(tmp_path / "a.txt", "txt"))


def test_detect_format(tmp_path):
    assert detect_format(tmp_path / "x.ndjson", ("jsonl", "csv")) == "jsonl"
    assert detect_format(tmp_path / "x", ("txt", "csv", "jsonl")) == "txt"
    with pytest.raises(ValueError, match="'xlsx' is not one of"):
        detect_format(tmp_path / "x.xlsx", ("jsonl", "csv"))


def test_writers():
    result = {"label": "spam", "spam_score": 0.9, "model": "koelectra", "truncated": False}
    buf = io.StringIO()
    writer = ResultWriter(buf, "jsonl")
    writer.write(0, result)
    writer.write(1, {"error": "text is empty", "index": 1})
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines == [{"index": 0, **result}, {"index": 1, "error": "text is empty"}]
    buf = io.StringIO()
    writer = ResultWriter(buf, "csv")
    writer.write(0, result)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert rows[0]["label"] == "spam" and rows[0]["error"] == ""
    ResultWriter(buf, "csv", header=False).write(1, result)  # continuing a file that has its header
    assert len(list(csv.DictReader(io.StringIO(buf.getvalue())))) == 2


def test_rows_carry_the_index_in_the_whole_input():
    buf = io.StringIO()
    ResultWriter(buf, "jsonl").write(70, {"error": "text is empty", "index": 6})  # 6 within its batch task
    assert json.loads(buf.getvalue()) == {"index": 70, "error": "text is empty"}
