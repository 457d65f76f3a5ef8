"""``evaluate`` on a fleet that serves one model in several (model_version, precision) pairs, and the
count of records that could not be scored."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest

from producer.evaluate import Run, build_report, failed_records
from producer.metrics_report import summary
from tests.unit.test_evaluate import reference_metrics

Y = [1, 0, 1, 0, 1, 0, 1, 0]
SCORES = [0.9, 0.2, 0.4, 0.6, 0.8, 0.1, 0.7, 0.3]
PAIRS = [("v1", "float32"), ("v1", "bfloat16")] * 4


def run_of(model: str, pairs, failed=()) -> Run:
    run = Run(model)
    for i, (score, (version, precision)) in enumerate(zip(SCORES, pairs, strict=True)):
        if i in failed:
            run.add({"error": "text is empty", "index": i})
            continue
        run.add({"label": "spam" if score >= 0.5 else "ham", "spam_score": score, "model": model,
                 "model_version": version, "precision": precision, "escalated": False, "truncated": False})
    run.elapsed_s = 1.0
    return run


def test_each_version_and_precision_is_reported_apart_when_the_fleet_mixes_them(tmp_path):
    labeled = SimpleNamespace(path=tmp_path / "in.csv", field="text", label_field="label", y=array("b", Y))
    report, _ = build_report(labeled, {"exaone": run_of("exaone", PAIRS, failed={5})}, 0.5, None, "default",
                             "exaone")
    entry = report["models"]["exaone"]
    assert entry["model_version"] == "v1" and entry["model_precision"] == ["bfloat16", "float32"]
    parts = {(p["model_version"], p["model_precision"]): p for p in entry["by_version"]}
    assert set(parts) == {("v1", "float32"), ("v1", "bfloat16")}
    for (version, precision), part in parts.items():
        mine = [i for i, pair in enumerate(PAIRS) if pair == (version, precision) and i != 5]
        expected = reference_metrics([Y[i] for i in mine], [int(SCORES[i] >= 0.5) for i in mine],
                                     [SCORES[i] for i in mine])
        assert part["n"] == len(mine) and part["confusion"] == expected["confusion"]
        assert part["f1"] == pytest.approx(expected["f1"]) and part["brier"] == pytest.approx(expected["brier"])
    assert report["failed_records"] == 1
    assert "  v1 bfloat16: n 3," in summary(report) and "  v1 float32: n 4," in summary(report)


def test_one_pair_gives_no_breakdown_and_a_record_failing_twice_counts_once(tmp_path):
    labeled = SimpleNamespace(path=tmp_path / "in.csv", field="text", label_field="label", y=array("b", Y))
    same = [("v1", "float32")] * 8
    runs = {"koelectra": run_of("koelectra", same, failed={1, 2}), "exaone": run_of("exaone", same, failed={2, 6})}
    report, _ = build_report(labeled, runs, 0.5, (0.2, 0.8), "default", "all")
    assert "by_version" not in report["models"]["koelectra"]
    assert report["models"]["exaone"]["model_precision"] == "float32"
    assert report["models"]["auto"]["model_precision"] == "float32"
    assert failed_records(runs) == report["failed_records"] == 3  # records 1, 2 and 6
