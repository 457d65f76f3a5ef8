"""An Excel-saved CSV ("CSV UTF-8": BOM, CRLF, labels 1/0, spam/ham, 스팸/정상, TRUE/false) through
``producer batch`` and ``producer evaluate``, and evaluate's exit code when records fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.unit.test_excel_files import ROWS, SPAM, excel_csv

pytestmark = pytest.mark.integration


def producer(worker, *args: str) -> subprocess.CompletedProcess:
    env = {"CELERY_BROKER_URL": worker.broker_url, "CELERY_RESULT_BACKEND": worker.backend_url,
           "PATH": "/usr/bin:/bin", "CASCADE_BAND": ""}
    return subprocess.run([sys.executable, "-m", "producer", *args, "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_an_excel_csv_through_batch_and_evaluate(served, tmp_path):
    worker, client = served
    source = tmp_path / "labeled.csv"
    excel_csv(source)
    texts = [t for t, _ in ROWS]

    out = tmp_path / "results.jsonl"
    run = producer(worker, "batch", str(source), "--out", str(out), "--model", "koelectra")
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    direct = client.submit_batch(texts, "koelectra").get(timeout=60)
    assert [r["index"] for r in rows] == list(range(len(ROWS)))
    assert [r["spam_score"] for r in rows] == pytest.approx([d["spam_score"] for d in direct], abs=1e-6)

    report_path = tmp_path / "report.json"
    run = producer(worker, "evaluate", str(source), "--out", str(report_path), "--model", "koelectra")
    assert run.returncode == 0, run.stderr
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["labels"] == {"spam": sum(SPAM), "ham": len(SPAM) - sum(SPAM)} and report["failed_records"] == 0
    entry = report["models"]["koelectra"]
    assert entry["n"] == len(ROWS) and entry["errors"] == 0 and entry["model_precision"] == "float32"
    tp = sum(1 for d, spam in zip(direct, SPAM, strict=True) if spam and d["label"] == "spam")
    assert entry["confusion"]["tp"] == tp

    # A record the workers refuse (an empty text): by default that fails the command, naming the count.
    excel_csv(source, ROWS + [("", "spam")])
    run = producer(worker, "evaluate", str(source), "--out", str(report_path), "--model", "koelectra")
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines()[-1] == (f"producer evaluate: 1 of {len(ROWS) + 1} records could not be scored, "
                                           f"more than --max-errors (0); their errors are counted in {report_path}")
    assert json.loads(report_path.read_text(encoding="utf-8"))["models"]["koelectra"]["errors"] == 1
    run = producer(worker, "evaluate", str(source), "--out", str(report_path), "--model", "koelectra",
                   "--max-errors", "1")
    assert run.returncode == 0, run.stderr
