"""CSV batch output says what decided each row (model_version, precision, KoELECTRA's when it escalated),
so a job spanning a rollout can be attributed; a job an older producer started resumes in its own columns."""

from __future__ import annotations

import csv

import pytest

from producer import files, jobs
from producer.jobs import BatchJob
from tests.unit import test_jobs
from tests.unit.test_jobs import TEXTS, FakeClient, Fleet, Killed, spec_for

OLD_COLUMNS = ("index", "label", "spam_score", "model", "escalated", "koelectra_score", "truncated", "error")


def versioned(text: str, model: str, index: int) -> dict:
    """Results across a rollout: the first texts on one EXAONE version, the rest on the next; some escalated."""
    if not text:
        return {"error": "text is empty", "index": index}
    number = int(text.split()[1])
    result = {"label": "ham", "spam_score": 0.1, "model": "koelectra", "model_version": "17430e234ab0",
              "escalated": False, "truncated": False}
    if "쿠폰" in text:
        result.update(label="spam", spam_score=0.9, model="exaone", escalated=True, koelectra_score=0.5,
                      koelectra_version="17430e234ab0",
                      model_version="2eebb1e9f94d" if number < 25 else "4b71878f3c8f")
    if number % 3 == 0:  # a field the worker may add (issue 18's precision): filled in when present
        result.update(precision="bfloat16")
    return result


def _rows(path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_rows_carry_the_versions_that_decided_them(tmp_path, monkeypatch):
    monkeypatch.setattr(test_jobs, "score", versioned)
    spec = spec_for(tmp_path, "csv")
    with BatchJob.open(FakeClient(Fleet()), spec, window=3) as job:
        job.run()
    rows = _rows(spec.out)
    assert len(rows) == len(TEXTS)
    for i, (row, text) in enumerate(zip(rows, TEXTS, strict=True)):
        expected = versioned(text, "auto", i)
        assert row["index"] == str(i)
        for column in ("model_version", "koelectra_version", "precision", "koelectra_score", "error"):
            assert row[column] == str(expected.get(column, "")), (i, column)
    assert {r["model_version"] for r in rows if r["model"] == "exaone"} == {"2eebb1e9f94d", "4b71878f3c8f"}


def test_a_job_started_with_the_old_columns_resumes_in_them(tmp_path, monkeypatch):
    monkeypatch.setattr(test_jobs, "score", versioned)
    spec = spec_for(tmp_path, "csv")
    fleet = Fleet()  # the result backend, outliving the killed run
    with monkeypatch.context() as old:  # an older producer: its header and rows lack the version columns
        old.setattr(files, "OUTPUT_COLUMNS", OLD_COLUMNS)
        old.setattr(jobs, "OUTPUT_COLUMNS", OLD_COLUMNS)
        old.setattr(files.ResultWriter.__init__, "__defaults__", (True, OLD_COLUMNS))
        with pytest.raises(Killed), BatchJob.open(FakeClient(fleet, kill_at_get=2), spec, window=3) as job:
            job.run()
    with BatchJob.open(FakeClient(fleet), spec, resume=True, window=3) as job:
        summary = job.run()
    assert summary.resumed_at == 4 and summary.written == len(TEXTS)
    with spec.out.open(encoding="utf-8", newline="") as fh:
        lines = list(csv.reader(fh))
    assert tuple(lines[0]) == OLD_COLUMNS and all(len(line) == len(OLD_COLUMNS) for line in lines)
    rows = _rows(spec.out)
    assert [r["index"] for r in rows] == [str(i) for i in range(len(TEXTS))]
    assert all(r["label"] in ("spam", "ham", "") for r in rows)
