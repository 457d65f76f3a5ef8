"""``python -m producer evaluate --model all --plot`` against the session's worker (tiny random models):
the report's metrics are those the test recomputes from the fleet's own scores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from producer.evaluate import version_field
from tests.conftest import ROOT
from tests.unit.test_evaluate import average_precision, mann_whitney_auc, reference_metrics

pytestmark = pytest.mark.integration

SPAM = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "대출 승인 완료 010-1234-5678 로 연락 주세요",
        "[광고] 최저가 할인 이벤트 진행중", "Congratulations you won a free prize click here"]
HAM = ["내일 회의는 오후 3시에 시작합니다", "엄마 오늘 저녁 같이 먹어요", "See you at lunch tomorrow",
       "택배가 도착했습니다 확인 부탁드립니다"]


def test_evaluate_all_models_reports_what_the_fleet_scored(served, tmp_path):
    worker, client = served
    records = [(f"{text} ({i})", label) for i in range(3) for texts, label in ((SPAM, "spam"), (HAM, "Ham "))
               for text in texts]
    source = tmp_path / "labeled.jsonl"
    source.write_text("".join(json.dumps({"body": t, "y": y}, ensure_ascii=False) + "\n" for t, y in records),
                      encoding="utf-8")
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    env = {"CELERY_BROKER_URL": worker.broker_url, "CELERY_RESULT_BACKEND": worker.backend_url,
           "PATH": "/usr/bin:/bin", "SPAM_THRESHOLD": "0.5", "CASCADE_BAND": "0.45,0.55"}
    run = subprocess.run(
        [sys.executable, "-m", "producer", "evaluate", str(source), "--out", str(out), "--plot", str(png),
         "--model", "all", "--field", "body", "--label-field", "y", "--chunk-size", "5", "--window", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and f"report -> {out}" in run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["records"] == len(records) == 24
    assert report["labels"] == {"spam": 12, "ham": 12}
    assert report["threshold"] == 0.5 and report["band"] == [0.45, 0.55] and report["band_source"] == "CASCADE_BAND"
    assert report["input"] == str(source) and report["created_at"]

    y = [int(label == "spam") for _, label in records]
    texts = [t for t, _ in records]
    fleet = {m: client.submit_batch(texts, m).get(timeout=120) for m in ("koelectra", "exaone")}
    for model, results in fleet.items():
        entry = report["models"][model]
        assert entry["n"] == len(records) and entry["errors"] == 0
        scores = [r["spam_score"] for r in results]
        expected = reference_metrics(y, [int(r["label"] == "spam") for r in results], scores)
        assert entry["confusion"] == expected.pop("confusion")
        for name, value in expected.items():
            assert entry[name] == pytest.approx(value, abs=1e-6), (model, name)
        assert entry["model_version"] == version_field({r["model_version"] for r in results if "model_version" in r})
        assert entry["messages_per_second"] > 0

    k = [r["spam_score"] for r in fleet["koelectra"]]
    e = [r["spam_score"] for r in fleet["exaone"]]
    escalated = [0.45 <= s <= 0.55 for s in k]
    decided = [se if esc else sk for sk, se, esc in zip(k, e, escalated, strict=True)]
    auto = report["models"]["auto"]
    assert auto["derived"] == "cascade at the configured band"
    assert auto["escalated"] == pytest.approx(sum(escalated) / len(records))
    expected = reference_metrics(y, [int(s >= 0.5) for s in decided], decided)
    assert auto["confusion"] == expected["confusion"] and auto["f1"] == pytest.approx(expected["f1"], abs=1e-6)
    assert auto["roc_auc"] == pytest.approx(mann_whitney_auc(y, decided), abs=1e-6)
    assert auto["pr_auc"] == pytest.approx(average_precision(y, decided), abs=1e-6)

    cascade = report["cascade"]
    assert cascade["configured"]["low"] == 0.45 and cascade["configured"]["f1"] == pytest.approx(auto["f1"])
    assert cascade["exaone_f1"] == pytest.approx(report["models"]["exaone"]["f1"], abs=1e-6)
    full = next(b for b in cascade["bands"] if (b["low"], b["high"]) == (0.0, 1.0))
    assert full["escalated"] == 1.0 and full["f1"] == pytest.approx(cascade["exaone_f1"])
    near = cascade["narrowest_near_exaone"]
    assert near["f1"] >= cascade["exaone_f1"] - 0.005
    assert all(b["escalated"] >= near["escalated"] for b in cascade["bands"] if b["f1"] >= cascade["exaone_f1"] - 0.005)


def test_evaluate_auto_on_one_class_notes_the_missing_ranking_metrics(served, tmp_path):
    worker, client = served
    texts = [f"{text} ({i})" for i in range(2) for text in SPAM] + [""]  # the empty one is an item error
    source = tmp_path / "spam.csv"
    source.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in zip(texts, ["1", "TRUE", "spam"] * 3,
                                                                                  strict=False)),
                      encoding="utf-8")
    out = tmp_path / "report.json"
    env = {"CELERY_BROKER_URL": worker.broker_url, "CELERY_RESULT_BACKEND": worker.backend_url,
           "PATH": "/usr/bin:/bin", "SPAM_THRESHOLD": "0.5"}
    run = subprocess.run([sys.executable, "-m", "producer", "evaluate", str(source), "--out", str(out),
                          "--max-errors", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    assert list(report["models"]) == ["auto"] and "cascade" not in report
    assert report["labels"] == {"spam": 9, "ham": 0}
    entry = report["models"]["auto"]
    assert entry["n"] == 8 and entry["errors"] == 1
    assert entry["roc_auc"] is None and entry["pr_auc"] is None and "every label is spam" in entry["notes"][0]
    assert "note: every label is spam" in run.stderr
    results = client.submit_batch(texts[:-1], "auto").get(timeout=120)  # this worker's band is empty
    expected = reference_metrics([1] * 8, [int(r["label"] == "spam") for r in results],
                                 [r["spam_score"] for r in results])
    assert entry["confusion"] == expected["confusion"] and entry["accuracy"] == pytest.approx(expected["accuracy"])
    assert entry["escalated"] == 0.0
