"""Per-process figures: recorded, published as files, collected as flat keys, rendered as a table."""

from __future__ import annotations

import os

import pytest

from producer.stats_table import render, rows
from worker.telemetry.stats import ProcessStats, collect, flatten, memory_mb


def test_task_figures_and_percentiles():
    stats = ProcessStats()
    for ms in range(1, 101):
        stats.record_task(ms / 1000, batch_size=ms % 4 + 1, ok=True)
    with pytest.raises(ValueError), stats.task():
        raise ValueError("boom")
    snap = stats.snapshot()
    assert snap["tasks_done"] == 100 and snap["tasks_failed"] == 1
    assert snap["latency_p50_ms"] == pytest.approx(50.5, abs=0.6)
    assert snap["latency_p95_ms"] == pytest.approx(95.05, abs=0.6)
    assert snap["batch_max"] == 4
    assert snap["rss_mb"] > 0


def test_memory_reports_rss_and_pss():
    figures = memory_mb()
    assert figures["rss_mb"] > 0 and 0 < figures["pss_mb"] <= figures["rss_mb"]


def test_files_of_dead_processes_are_dropped(tmp_path):
    stats = ProcessStats()
    stats.models["koelectra"] = {"load_s": 0.5, "device": "cpu"}
    stats.attach(tmp_path, "child0")
    (tmp_path / "999999.json").write_text('{"pid": 999999, "label": "child1", "models": {}}')
    info = collect(tmp_path, {os.getpid()})
    assert info[f"child0.pid{os.getpid()}.koelectra.load_s"] == 0.5
    assert not any(".pid999999." in key for key in info)
    assert not (tmp_path / "999999.json").exists()


def test_flat_keys_render_as_a_table():
    flat = flatten({"pid": 7, "label": "child0", "rss_mb": 100.0, "tasks_done": 3,
                    "models": {"exaone": {"load_s": 1.25, "device": "cuda:0"}, "koelectra": {"load_s": 0.2}}})
    assert flat["child0.pid7.exaone.load_s"] == 1.25 and flat["child0.pid7.rss_mb"] == 100.0
    stats = {"celery@a": {"pid": 1, "uptime": 5, **flat}}
    table = rows(stats)
    assert [(r["process"], r["model"]) for r in table] == [("child0 pid7", "exaone"), ("child0 pid7", "koelectra")]
    text = render(stats)
    assert "cuda:0" in text and "1.25" in text and text.splitlines()[0].startswith("worker")
    assert render({}).startswith("no worker answered")
