"""Workers sharing a host and a broker: each keeps its Prometheus figures to itself though they share
PROMETHEUS_MULTIPROC_DIR, a differing VISIBILITY_TIMEOUT_S is warned about and shown in the stats, and
no per-worker folder outlives its worker: gone after SIGTERM and after a start that fails, and those of
workers that were killed are swept by the next start."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port
from tests.integration.helpers import client_for, wait_until, wait_until_serving

pytestmark = pytest.mark.integration

SHM = Path("/dev/shm")
USING = re.compile(r"using (\S+) \(removed when this worker exits\)")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _samples(port: int) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _pids(samples: dict[tuple[str, str], float]) -> set[int]:
    return {int(m) for _, labels in samples for m in re.findall(r'pid="(\d+)"', labels)}


def _folders_of(worker) -> list[Path]:
    """The folders a worker's log says it made; at least its stats folder."""
    found = [Path(p) for p in USING.findall(worker.log())]
    assert found, worker.log()[-3000:]
    return found


def test_two_workers_on_one_host_keep_apart_and_leave_nothing_behind(worker_factory, models, tmp_path):
    shared = tmp_path / "prometheus"  # one PROMETHEUS_MULTIPROC_DIR for the host's workers
    dead = _dead_pid()
    leftovers = [SHM / f"spam-worker-{dead}-killed", shared / f"spam-metrics-{dead}-killed"]
    for folder in leftovers:  # what a worker killed with SIGKILL leaves
        (folder / "1234.json").mkdir(parents=True)
    common = {"PRELOAD_MODELS": "koelectra", "TASK_TIME_LIMIT_S": "60", "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    ports = free_port(), free_port()
    a = worker_factory(models.env(**common, METRICS_PORT=str(ports[0]), VISIBILITY_TIMEOUT_S="400"),
                       pool="prefork", concurrency=1, name="a")
    client = client_for(a)
    wait_until_serving(a, client)
    assert not any(folder.exists() for folder in leftovers), "the start did not sweep a dead worker's folders"
    b = worker_factory(models.env(**common, METRICS_PORT=str(ports[1]), VISIBILITY_TIMEOUT_S="500"),
                       pool="threads", concurrency=2, name="b", urls=(a.broker_url, a.backend_url))
    host = socket.gethostname()
    node_a, node_b = f"prefork-a-0@{host}", f"threads-b-1@{host}"

    # B found A's value at its start; both values, and what differs, are in the stats Flower shows.
    wait_until(lambda: f"VISIBILITY_TIMEOUT_S is 500 s here but 400 s on {node_a}" in b.log(), 120, "B's warning")
    inspect = client.app.control.inspect(timeout=5)
    stats = wait_until(lambda: (s := inspect.stats() or {}) and len(s) == 2 and s, 120, "both workers answer")
    assert stats[node_a]["visibility_timeout_s"] == 400 and stats[node_b]["visibility_timeout_s"] == 500
    assert stats[node_b]["visibility_timeout_differs"] == f"{node_a}=400"

    # Every task is counted once, by the worker that ran it; each endpoint shows only its own processes.
    handles = [client.submit(f"무료 쿠폰 {i}", "koelectra") for i in range(12)]
    assert all(h.get(timeout=120)["model"] == "koelectra" for h in handles)
    samples = [_samples(port) for port in ports]
    done = [s.get(("spam_tasks_total", 'outcome="succeeded"'), 0) for s in samples]
    assert sum(done) == 1 + len(handles), done  # + the first classification, which A served alone
    children_a = {int(k.split(".")[1].removeprefix("pid")) for k in stats[node_a] if k.startswith("child")}
    assert _pids(samples[0]) == children_a and _pids(samples[1]) == {b.process.pid}

    made = _folders_of(a) + _folders_of(b)
    assert len(made) == 4 and all(folder.is_dir() for folder in made)
    for worker in (a, b):
        worker.process.send_signal(signal.SIGTERM)
    for worker in (a, b):
        assert worker.process.wait(timeout=60) == 0, worker.log()[-3000:]
    assert [folder for folder in made if folder.exists()] == []
    assert shared.is_dir() and list(shared.iterdir()) == []  # the host's folder stays, emptied of theirs
    assert redis.Redis.from_url(a.broker_url).keys("spam-workers:*") == []  # their announced values too
    client.close()


def test_a_start_that_fails_removes_its_folders(worker_factory, models, tmp_path):
    broken = tmp_path / "adapter-without-weights"
    broken.mkdir()
    worker = worker_factory(models.env(PRELOAD_MODELS="koelectra", KOELECTRA_ADAPTER_DIR=str(broken),
                                       METRICS_PORT=str(free_port()), PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m")),
                            pool="threads", concurrency=2, name="broken")
    assert worker.process.wait(timeout=120) == 1, worker.log()[-3000:]
    made = _folders_of(worker)
    assert len(made) == 2 and [folder for folder in made if folder.exists()] == []
