"""``python -m producer evaluate``: the metric maths against plain-Python formulas, the label parser,
the cascade band grid on a hand-made case, the report's shape and the figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from array import array
from types import SimpleNamespace

import pytest

from producer.evaluate import (
    EvaluationError,
    Run,
    build_report,
    classify_all,
    parse_band,
    scan,
    settings_from_env,
    version_field,
)
from producer.files import parse_label, read_labeled
from producer.metrics_report import binary_metrics, cascade, grid, summary
from tests.conftest import ROOT

# --- reference formulas, written out so they share nothing with the code under test ---------------


def reference_metrics(y: list[int], predicted: list[int], scores: list[float]) -> dict:
    tp = sum(1 for t, p in zip(y, predicted, strict=True) if t == 1 and p == 1)
    fp = sum(1 for t, p in zip(y, predicted, strict=True) if t == 0 and p == 1)
    tn = sum(1 for t, p in zip(y, predicted, strict=True) if t == 0 and p == 0)
    fn = sum(1 for t, p in zip(y, predicted, strict=True) if t == 1 and p == 0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(y),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "accuracy": (tp + tn) / len(y),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "brier": sum((s - t) ** 2 for s, t in zip(scores, y, strict=True)) / len(y),
        "roc_auc": mann_whitney_auc(y, scores),
        "pr_auc": average_precision(y, scores),
    }


def mann_whitney_auc(y: list[int], scores: list[float]) -> float | None:
    """The chance that a random spam outscores a random ham, ties counting one half."""
    spam = [s for s, t in zip(scores, y, strict=True) if t == 1]
    ham = [s for s, t in zip(scores, y, strict=True) if t == 0]
    if not spam or not ham:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in spam for n in ham)
    return wins / (len(spam) * len(ham))


def average_precision(y: list[int], scores: list[float]) -> float | None:
    """AP = sum over the distinct thresholds t (high to low) of (R(t) - R(previous t)) * P(t)."""
    positives = sum(y)
    if positives in (0, len(y)):
        return None
    total, last_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        chosen = [label for s, label in zip(scores, y, strict=True) if s >= t]
        recall = sum(chosen) / positives
        total += (recall - last_recall) * sum(chosen) / len(chosen)
        last_recall = recall
    return total


def f1_at(y: list[int], scores: list[float], threshold: float) -> float:
    predicted = [int(s >= threshold) for s in scores]
    return reference_metrics(y, predicted, scores)["f1"]


Y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
SCORES = [0.92, 0.81, 0.40, 0.65, 0.65, 0.30, 0.55, 0.05, 0.20, 0.81]  # ties across and within classes
PREDICTED = [int(s >= 0.5) for s in SCORES]


def test_metrics_match_the_formulas():
    got = binary_metrics(Y, PREDICTED, SCORES)
    expected = reference_metrics(Y, PREDICTED, SCORES)
    assert got["confusion"] == expected.pop("confusion") == {"tp": 4, "fp": 2, "tn": 3, "fn": 1}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert got["roc_auc"] == pytest.approx(22.5 / 25)  # by hand: 25 pairs, one tie (0.65), two losses (0.40)
    assert "notes" not in got


def test_metrics_use_the_labels_given_not_the_scores():
    predicted = [1] * len(Y)  # labels that a worker with another threshold might send
    got = binary_metrics(Y, predicted, SCORES)
    assert got["confusion"] == {"tp": 5, "fp": 5, "tn": 0, "fn": 0}
    assert got["precision"] == 0.5 and got["recall"] == 1.0


def test_best_f1_threshold_is_the_best_of_all_cuts():
    got = binary_metrics(Y, PREDICTED, SCORES)
    best = max(f1_at(Y, SCORES, t) for t in set(SCORES))
    assert got["best_f1"] == pytest.approx(best)
    assert got["best_f1_threshold"] in SCORES
    assert f1_at(Y, SCORES, got["best_f1_threshold"]) == pytest.approx(best)


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_only_gives_null_ranking_metrics_and_a_note(label):
    y = [label] * 4
    got = binary_metrics(y, [1, 0, 1, 1], [0.9, 0.1, 0.7, 0.6])
    assert got["roc_auc"] is None and got["pr_auc"] is None and got["best_f1_threshold"] is None
    assert "every label is " + ("spam" if label else "ham") in got["notes"][0]
    assert got["accuracy"] == (0.75 if label else 0.25)
    assert got["brier"] == pytest.approx(reference_metrics(y, [1, 0, 1, 1], [0.9, 0.1, 0.7, 0.6])["brier"])
    json.dumps(got)


# --- labels -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, spam", [("spam", True), (" SPAM ", True), ("Ham", False), ("1", True), ("0", False),
                                        ("true", True), (" False\t", False), (True, True), (0, False), (1, True),
                                        ("스팸", True), (" 정상 ", False), ("TRUE", True)])
def test_parse_label_accepts(raw, spam):
    assert parse_label(raw) is spam


@pytest.mark.parametrize("raw", ["", "yes", "2", "s pam", None, 1.0, 2, "스팸 아님"])
def test_parse_label_refuses(raw):
    with pytest.raises(ValueError, match="is not spam/ham, 스팸/정상, 1/0 or true/false"):
        parse_label(raw)


def test_read_labeled_names_the_line_of_a_bad_label(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,label\n무료 쿠폰,spam\n"줄\n바꿈", ham\n회의,maybe\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.csv:5: label 'maybe' is not"):
        list(read_labeled(path, "csv"))
    path.write_text('text,label\n무료 쿠폰,spam\n"줄\n바꿈", ham\n', encoding="utf-8")
    assert list(read_labeled(path, "csv")) == [("무료 쿠폰", True), ("줄\n바꿈", False)]
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "가", "y": true}\n\n{"body": "나", "y": "0"}\n{"body": "다", "y": "x"}\n',
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:4: label 'x'"):
        list(read_labeled(path, "jsonl", "body", "y"))
    path.write_text('{"body": "가"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'y'"):
        list(read_labeled(path, "jsonl", "body", "y"))


def test_scan_counts_labels_and_refuses_empty_or_unlabeled_files(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("text,label\na,spam\nb,ham\nc,1\n", encoding="utf-8")
    assert list(scan(path).y) == [1, 0, 1]
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(EvaluationError, match="no records"):
        scan(path)
    path.write_text("text\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no column 'label'"):
        scan(path)
    (tmp_path / "a.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="format 'txt' is not one of csv, jsonl"):
        scan(tmp_path / "a.txt")


def test_band_and_threshold_settings(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("CASCADE_BAND", "SPAM_THRESHOLD"):
        monkeypatch.setenv(name, "")  # records the variable, so the undo also drops what .env sets below
        monkeypatch.delenv(name)
    assert settings_from_env() == (0.5, (0.2, 0.8), "default")
    (tmp_path / ".env").write_text("CASCADE_BAND=0.3, 0.6\nSPAM_THRESHOLD=0.4\n")
    assert settings_from_env() == (0.4, (0.3, 0.6), "CASCADE_BAND")
    assert settings_from_env("0.1,0.9") == (0.4, (0.1, 0.9), "--band")
    monkeypatch.setenv("CASCADE_BAND", "")
    assert settings_from_env()[1] is None
    assert parse_band(" ") is None
    with pytest.raises(EvaluationError, match="CASCADE_BAND: '0.9,0.1'"):
        parse_band("0.9,0.1")
    with pytest.raises(EvaluationError, match="not two numbers"):
        parse_band("0.2")


# --- the cascade grid ---------------------------------------------------------------------------------

# EXAONE is right on every message; KoELECTRA only on the two it is sure about (0.9 and 0.1). To
# match EXAONE the cascade must escalate 0.30..0.75 and should leave 0.1 and 0.9 alone: the
# narrowest such grid band is [0.30, 0.75] (bounds inclusive), escalating 4 of 6.
CASE_Y = [1, 0, 1, 0, 1, 0]
CASE_K = [0.9, 0.1, 0.45, 0.55, 0.30, 0.75]
CASE_E = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3]


def test_cascade_finds_the_narrowest_band_matching_exaone():
    got = cascade(CASE_Y, CASE_K, CASE_E, 0.5, (0.2, 0.8))
    assert got["exaone_f1"] == 1.0
    assert got["koelectra_f1"] == pytest.approx(1 / 3)  # tp 1, fp 2, fn 2
    near = got["narrowest_near_exaone"]
    assert (near["low"], near["high"], near["f1"]) == (0.3, 0.75, 1.0)
    assert near["escalated"] == pytest.approx(4 / 6)
    assert got["configured"] == {"low": 0.2, "high": 0.8, "escalated": pytest.approx(4 / 6), "f1": 1.0,
                                 "configured": True}
    by_band = {(r["low"], r["high"]): r for r in got["bands"]}
    assert len(by_band) == len(grid()) + 1 == 11 * 11 + 1  # the grid and no escalation
    assert by_band[(None, None)]["escalated"] == 0 and by_band[(None, None)]["f1"] == pytest.approx(1 / 3)
    assert by_band[(0.5, 0.5)]["f1"] == pytest.approx(1 / 3)
    assert by_band[(0.4, 0.6)]["f1"] == pytest.approx(2 / 3)  # escalates 0.45 and 0.55: tp 2, fp 1, fn 1
    assert by_band[(0.35, 0.75)]["f1"] < 1.0  # misses 0.30
    assert by_band[(0.0, 1.0)]["escalated"] == 1.0 and by_band[(0.0, 1.0)]["f1"] == 1.0
    assert sum(r["configured"] for r in got["bands"]) == 1


def test_cascade_marks_an_off_grid_or_empty_configured_band():
    got = cascade(CASE_Y, CASE_K, CASE_E, 0.5, (0.33, 0.77))
    assert got["configured"]["low"] == 0.33 and got["configured"]["escalated"] == pytest.approx(3 / 6)
    assert len(got["bands"]) == 11 * 11 + 2
    none = cascade(CASE_Y, CASE_K, CASE_E, 0.5, None)["configured"]
    assert (none["low"], none["escalated"], none["f1"]) == (None, 0.0, pytest.approx(1 / 3))


# --- the report ---------------------------------------------------------------------------------------


def make_run(model: str, scores: list[float | None], versions=("abc123",), threshold=0.5) -> Run:
    run = Run(model)
    for i, s in enumerate(scores):
        if s is None:
            run.add({"error": "text is empty", "index": i})
            continue
        result = {"label": "spam" if s >= threshold else "ham", "spam_score": s, "model": model,
                  "escalated": False, "truncated": False}
        if versions:
            result["model_version"] = versions[i % len(versions)]
        run.add(result)
    run.elapsed_s = 2.0
    return run


def test_report_with_all_models(tmp_path):
    labeled = SimpleNamespace(path=tmp_path / "in.csv", field="text", label_field="label",
                              y=array("b", CASE_Y + [1]))
    runs = {"koelectra": make_run("koelectra", CASE_K + [None], versions=("k1",)),
            "exaone": make_run("exaone", CASE_E + [None], versions=("e1", "e2"))}
    report, section = build_report(labeled, runs, 0.5, (0.2, 0.8), "CASCADE_BAND", "all")
    json.dumps(report)
    assert report["records"] == 7 and report["labels"] == {"spam": 4, "ham": 3}
    assert report["threshold"] == 0.5 and report["band"] == [0.2, 0.8] and report["created_at"]
    k, e, auto = (report["models"][m] for m in ("koelectra", "exaone", "auto"))
    assert k["n"] == 6 and k["errors"] == 1 and k["model_version"] == "k1"
    assert e["model_version"] == ["e1", "e2"] and e["f1"] == 1.0
    assert k["messages_per_second"] == 3.5
    assert k["f1"] == pytest.approx(reference_metrics(CASE_Y, [1, 0, 0, 1, 0, 1], CASE_K)["f1"])
    assert auto["derived"] == "cascade at the configured band" and auto["messages_per_second"] is None
    assert auto["escalated"] == pytest.approx(4 / 6) and auto["f1"] == 1.0
    assert auto["model_version"] == ["e1", "e2", "k1"]  # both decided some messages
    assert section is report["cascade"] and report["cascade"]["n"] == 6
    text = summary(report)
    assert "cascade at band 0.2,0.8: 66.7% escalated" in text and "narrowest within 0.005 of EXAONE: 0.3,0.75" in text


def test_report_for_one_model_without_versions(tmp_path):
    labeled = SimpleNamespace(path=tmp_path / "in.csv", field="text", label_field="label", y=array("b", [0, 0]))
    report, section = build_report(labeled, {"auto": make_run("auto", [0.2, 0.7], versions=())}, 0.5, None,
                                   "default", "auto")
    assert section is None and "cascade" not in report and list(report["models"]) == ["auto"]
    entry = report["models"]["auto"]
    assert entry["model_version"] is None and entry["roc_auc"] is None and entry["notes"]
    assert "note: every label is ham" in summary(report)
    report, _ = build_report(labeled, {"auto": make_run("auto", [0.2, 0.7], threshold=0.8)}, 0.5, None,
                             "default", "auto")
    assert "1 labels disagree with spam_score >= 0.5" in report["models"]["auto"]["notes"][-1]
    assert version_field(set()) is None and version_field({"a"}) == "a" and version_field({"b", "a"}) == ["a", "b"]


def test_classify_all_streams_through_classify_many(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": "spam"}) + "\n" for t in ["a", "", "b"]))
    calls = []

    def classify_many(texts, model, chunk_size, window):
        calls.append((model, chunk_size, window))
        for i, text in enumerate(texts):
            yield {"error": "text is empty", "index": i} if not text else \
                {"label": "spam", "spam_score": 0.75, "model": model, "escalated": model == "auto"}

    seen = []
    run = classify_all(SimpleNamespace(classify_many=classify_many), scan(path), "auto", 2, 3, seen.append)
    assert calls == [("auto", 2, 3)] and seen == [1, 1, 1]
    assert run.errors == 1 and list(run.predicted) == [1, -1, 1] and math.isnan(run.scores[1])
    assert run.escalated == 2


def test_plot_writes_a_png(tmp_path):
    from producer.plot import draw

    runs = {"koelectra": make_run("koelectra", CASE_K), "exaone": make_run("exaone", CASE_E)}
    draw(tmp_path / "r.png", array("b", CASE_Y), runs, cascade(CASE_Y, CASE_K, CASE_E, 0.5, (0.2, 0.8)), 0.5)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    draw(tmp_path / "one.png", array("b", [1, 1]), {"auto": make_run("auto", [0.2, 0.9])}, None, 0.5)
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


def test_without_the_eval_extra_evaluate_says_what_to_install(tmp_path):
    (tmp_path / "in.csv").write_text("text,label\na,spam\n", encoding="utf-8")
    script = textwrap.dedent("""
        import importlib.abc, runpy, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"sklearn", "matplotlib"}:
                    raise ImportError(name)

        sys.meta_path.insert(0, Block())
        sys.argv = ["producer", *sys.argv[1:]]
        runpy.run_module("producer", run_name="__main__")
    """)
    run = subprocess.run([sys.executable, "-c", script, "evaluate", str(tmp_path / "in.csv"), "--out",
                          str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == ("producer evaluate: evaluate needs the eval extra (scikit-learn, matplotlib): "
                                  "pip install '.[eval]'")
