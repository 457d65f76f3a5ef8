"""Rolling a retrained adapter onto running workers: nothing lost, a bad version refused, built once."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from producer.reload import EXIT_OK, EXIT_REFUSED, exit_code, reload_fleet
from tests.conftest import ROOT, free_port
from tests.integration.helpers import TEXTS, client_for, flip, serving_figures, wait_for_snapshots, wait_until_serving
from tests.integration.test_stats import _metrics
from tests.prompt_reference import KOREAN
from worker.lifecycle.registry import load_classifier
from worker.serving.prompt import FILE_NAME
from worker.settings import Settings

pytestmark = pytest.mark.integration

def reference(models, adapter: Path, tmp_path: Path) -> list[float]:
    """The scores a worker started fresh on ``adapter`` gives: the same load, in this process."""
    settings = Settings.from_env(models.env(EXAONE_ADAPTER_DIR=str(adapter), SNAPSHOT_DIR=str(tmp_path / "ref")),
                                 dotenv=False)
    return [s.spam_score for s in load_classifier("exaone", settings).score(TEXTS)]


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 8)])
def test_a_stream_of_tasks_runs_through_a_reload_exactly_once(worker_factory, models, adapters, tmp_path, pool,
                                                             concurrency):
    metrics_port = free_port()
    env = models.env(PRELOAD_MODELS="koelectra,exaone", EXAONE_ADAPTER_DIR=str(adapters["current"]),
                     SNAPSHOT_DIR=str(tmp_path / "snapshots"), METRICS_PORT=str(metrics_port))
    worker = worker_factory(env, pool=pool, concurrency=concurrency, name=f"reload-{pool}")
    client = client_for(worker)
    wait_until_serving(worker, client)
    before = serving_figures(client)
    old = {v["exaone"] for v in before.values()}
    assert len(old) == 1 and len(before) == (concurrency if pool == "prefork" else 1)

    handles: list = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            handles.append(("single", client.submit(TEXTS[i % 4], model="exaone")))
            if i % 5 == 0:
                handles.append(("batch", client.submit_batch(TEXTS, model="exaone")))
            i += 1
            time.sleep(0.05)

    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(1.0)
    flip(adapters["current"], adapters["v2"])
    outcomes = reload_fleet(client.app, timeout=180)
    returned = len(handles)
    time.sleep(1.0)
    stop.set()
    sender.join()

    assert exit_code(outcomes) == EXIT_OK, outcomes
    (outcome,) = outcomes
    assert re.search(r"exaone [0-9a-f]{12} -> [0-9a-f]{12}", outcome.line) and "koelectra unchanged" in outcome.line
    after = serving_figures(client)
    assert set(after) == set(before), "no process restarted"
    (new,) = {v["exaone"] for v in after.values()}
    assert new != old.pop()
    stats = next(iter((client.app.control.inspect(timeout=2.0).stats() or {}).values()))
    outcomes_seen = {k: v for k, v in stats.items() if k.endswith(".reload_outcome")}
    assert len(outcomes_seen) == len(after) and set(outcomes_seen.values()) == {"switched"}, stats
    metrics = _metrics(metrics_port)
    for pid in after:
        assert metrics[("spam_model_info", f'model="exaone",pid="{pid}",precision="float32",version="{new}"')] == 1
        assert metrics[("spam_reload_seconds", f'outcome="switched",pid="{pid}"')] > 0
        assert metrics[("spam_reload_timestamp_seconds", f'pid="{pid}"')] > time.time() - 300

    results = [(kind, h.get(timeout=120)) for kind, h in handles]
    assert len(results) > 20
    expected = reference(models, adapters["v2"], tmp_path)
    for kind, result in results[returned:]:
        items = result if kind == "batch" else [result]
        assert {r["model_version"] for r in items} == {new}
        if kind == "batch":
            assert [r["spam_score"] for r in items] == pytest.approx(expected, abs=1e-5)
    ids = [h.id for _, h in handles]
    log = worker.log()
    assert all(log.count(f"[{i}] succeeded") == 1 for i in ids), "every task succeeded exactly once"
    client.close()


@pytest.mark.parametrize("case", ["truncated-weights", "another-base", "bad-prompt"])
def test_a_version_that_cannot_load_is_refused_and_the_old_one_serves(worker_factory, models, adapters, tmp_path,
                                                                     case):
    bad = tmp_path / case
    if case == "another-base":
        shutil.copytree(models.koelectra_adapter, bad)
    else:
        shutil.copytree(adapters["v2"], bad)
    if case == "truncated-weights":
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    if case == "bad-prompt":
        (bad / FILE_NAME).write_text(json.dumps({**KOREAN, "labels": {"spam": "스팸"}}, ensure_ascii=False))
    env = models.env(PRELOAD_MODELS="exaone", EXAONE_ADAPTER_DIR=str(adapters["current"]),
                     SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    worker = worker_factory(env, pool="prefork", concurrency=2, name=f"refuse-{case}")
    client = client_for(worker)
    wait_until_serving(worker, client)
    wait_for_snapshots(client, 2)  # the first start served from the checkpoint until its snapshot was built
    before = serving_figures(client)
    scores = [r["spam_score"] for r in client.submit_batch(TEXTS, model="exaone").get(timeout=60)]

    flip(adapters["current"], bad)
    cli = subprocess.run([sys.executable, "-m", "producer", "reload", "--timeout", "120"], cwd=ROOT, text=True,
                         capture_output=True, timeout=180,
                         env={**os.environ, "CELERY_BROKER_URL": worker.broker_url,
                              "CELERY_RESULT_BACKEND": worker.backend_url})
    assert cli.returncode == EXIT_REFUSED, cli.stderr
    (line,) = cli.stdout.splitlines()
    cause = {"truncated-weights": "corrupt adapter weights", "another-base": "does not fit",
             "bad-prompt": "labels.ham: must be a non-empty string"}[case]
    assert re.match(r"\S+@\S+: exaone refused, still serving [0-9a-f]{12}: ", line), line
    assert "cannot load model 'exaone'" in line and cause in line
    assert serving_figures(client) == before
    again = client.submit_batch(TEXTS, model="exaone").get(timeout=60)
    assert [r["spam_score"] for r in again] == scores
    assert worker.process.poll() is None
    client.close()


def test_two_workers_on_one_snapshot_dir_build_once_and_a_second_reload_is_unchanged(worker_factory, models,
                                                                                    adapters, tmp_path):
    env = models.env(PRELOAD_MODELS="exaone", EXAONE_ADAPTER_DIR=str(adapters["current"]),
                     SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    first = worker_factory(env, pool="prefork", concurrency=2, name="shared-a")
    second = worker_factory(env, pool="threads", concurrency=4, name="shared-b",
                            urls=(first.broker_url, first.backend_url))
    client = client_for(first)
    wait_until_serving(first, client)
    deadline = time.monotonic() + 180
    while len(serving_figures(client)) < 3:  # both workers up: two prefork children and one threads process
        assert time.monotonic() < deadline and second.process.poll() is None, second.log()[-3000:]
        time.sleep(0.5)
    wait_for_snapshots(client, 3)  # the first start's builds are done
    built = lambda: sum(w.log().count("building snapshot") for w in (first, second))  # noqa: E731
    start_builds = built()

    flip(adapters["current"], adapters["v2"])
    outcomes = reload_fleet(client.app, timeout=180)
    assert exit_code(outcomes) == EXIT_OK and len(outcomes) == 2, outcomes
    assert all("exaone" in o.line and "->" in o.line for o in outcomes)
    wait_for_snapshots(client, 3)  # each process serves the new adapter unmerged, then its snapshot
    assert built() == start_builds + 1, "the new snapshot is built once per host"
    versions = {v["exaone"] for v in serving_figures(client).values()}
    assert len(versions) == 1

    again = reload_fleet(client.app, timeout=60)
    assert exit_code(again) == EXIT_OK and all("exaone unchanged" in o.line for o in again), again
    assert built() == start_builds + 1
    client.close()
