"""Load and memory figures of every worker process, as Flower shows them (a real Flower)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT, free_port
from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration

AUTH = "watcher:s3cret-pw"


def _get(url: str, auth: str | None = AUTH) -> dict:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def flower(tmp_path):
    def start(worker):
        port = free_port()
        env = {**os.environ, "CELERY_BROKER_URL": worker.broker_url, "CELERY_RESULT_BACKEND": worker.backend_url}
        log = (tmp_path / "flower.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1",
             f"--basic-auth={AUTH}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        started.append(process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
                return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.3)
        raise AssertionError((tmp_path / "flower.log").read_text())

    started: list[subprocess.Popen] = []
    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=20)


def _metrics(port: int) -> dict[tuple[str, str], float]:
    """The worker's Prometheus samples as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


def _process_figures(workers: dict) -> dict[int, dict]:
    """{pid: {key: value}} of the child processes, from /api/workers."""
    (stats,) = [w["stats"] for w in workers.values()]
    by_pid: dict[int, dict] = {}
    for key, value in stats.items():
        if key.startswith("child"):
            _, pid, rest = key.split(".", 2)
            by_pid.setdefault(int(pid.removeprefix("pid")), {})[rest] = value
    return by_pid


def _wait_for(predicate, url: str, timeout: float = 120.0) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        figures = _process_figures(_get(f"{url}/api/workers?refresh=1"))
        if predicate(figures):
            return figures
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {json.dumps(figures, indent=1)}")
        time.sleep(0.5)


def test_flower_shows_each_childs_load_and_memory_and_drops_dead_children(worker_factory, models, flower):
    metrics_port = free_port()
    worker = worker_factory(models.env(METRICS_PORT=str(metrics_port)), pool="prefork", concurrency=2, name="stats")
    client = client_for(worker)
    wait_until_serving(worker, client)
    url = flower(worker)
    with pytest.raises(urllib.error.HTTPError, match="401"):
        _get(f"{url}/api/workers", auth=None)

    # A first start serves from the checkpoint while it builds the snapshot, then switches to it.
    figures = _wait_for(lambda f: len(f) == 2 and all(v.get(f"{m}.source") == "snapshot" for v in f.values()
                                                      for m in ("koelectra", "exaone")), url)
    for values in figures.values():
        for model in ("koelectra", "exaone"):
            assert values[f"{model}.load_s"] > 0
            assert values[f"{model}.bytes_read_mb"] > 0
            assert values[f"{model}.device"] == "cpu" and values[f"{model}.dtype"] == "float32"
            assert len(values[f"{model}.version"]) == 12
            stages = {part.split()[0] for part in values[f"{model}.stages"].split(" · ")}
            assert stages >= {"resolve", "materialise", "tokenizer", "warmup"}  # + snapshot on the build
        assert values["rss_mb"] > 50 and 0 < values["pss_mb"] <= values["rss_mb"]
    versions = {m: {v[f"{m}.version"] for v in figures.values()} for m in ("koelectra", "exaone")}
    assert all(len(v) == 1 for v in versions.values()), versions  # one version across the children

    for _ in range(6):
        client.classify("무료 쿠폰 당첨")
    client.submit_batch(["a", "b", "c"]).get(timeout=30)
    figures = _wait_for(lambda f: sum(v["tasks_done"] for v in f.values()) >= 8, url)
    busy = [v for v in figures.values() if v["tasks_done"]]
    assert all(v["latency_p50_ms"] > 0 and v["latency_p95_ms"] >= v["latency_p50_ms"] for v in busy)
    assert max(v["batch_max"] for v in busy) == 3

    env = {**os.environ, "CELERY_BROKER_URL": worker.broker_url, "CELERY_RESULT_BACKEND": worker.backend_url}
    table = subprocess.run([sys.executable, "-m", "producer", "stats"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["worker", "process", "model", "version", "load"]
    assert sum(next(iter(versions["exaone"])) in line for line in lines) == 2
    assert sum(" exaone " in line for line in lines) == 2 and sum(" koelectra " in line for line in lines) == 2

    metrics = _metrics(metrics_port)
    for pid in figures:
        assert metrics[("spam_model_load_seconds", f'model="exaone",pid="{pid}",stage="materialise"')] > 0
        assert metrics[("spam_process_memory_bytes", f'kind="pss",pid="{pid}"')] > 0
        for model, (version,) in versions.items():
            labels = f'model="{model}",pid="{pid}",precision="float32",version="{version}"'
            assert metrics[("spam_model_info", labels)] == 1
    assert metrics[("spam_tasks_total", 'outcome="succeeded"')] >= 8
    assert metrics[("spam_task_seconds_count", "")] >= 8

    victim = min(figures)
    os.kill(victim, signal.SIGKILL)
    after = _wait_for(lambda f: victim not in f and len(f) == 2, url)
    assert victim not in after
    (new_pid,) = set(after) - set(figures)
    assert after[new_pid]["exaone.load_s"] > 0  # the respawned child loaded and reports
    metrics = _metrics(metrics_port)
    assert not [key for key in metrics if f'pid="{victim}"' in key[1]], "a dead child's gauges remain"
    assert metrics[("spam_model_load_seconds", f'model="exaone",pid="{new_pid}",stage="materialise"')] > 0
    assert metrics[("spam_tasks_total", 'outcome="succeeded"')] >= 8  # counts survive the child
    client.close()
