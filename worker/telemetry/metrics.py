"""A Prometheus endpoint with the worker's own figures; off unless ``METRICS_PORT`` is set.

prometheus_client's multiprocess mode: every process writes its values to files in one folder and
the main process serves their sum. Each worker has a folder of its own, inside
``PROMETHEUS_MULTIPROC_DIR`` when that is set (two workers sharing it must neither delete nor sum
each other's files), removed when the worker exits. Gauges are per live process (``pid`` label);
the files of processes that died are removed at each scrape. Flower's own ``/metrics`` covers
task events; these are the load, memory and latency figures it cannot see.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from worker.telemetry import folders

if TYPE_CHECKING:
    from worker.loading.base import LoadedModel

log = logging.getLogger(__name__)

FOLDER_PREFIX = "spam-metrics-"
_OWN_FOLDER = re.compile(re.escape(FOLDER_PREFIX) + r"\d+-")
_metrics: _Metrics | None = None
_PID_FILE = re.compile(r"_(\d+)\.db$")
_served: dict[str, tuple[str, str]] = {}  # model -> the version and precision this process serves
_reload_outcomes: set[str] = set()


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.load_seconds = Gauge("spam_model_load_seconds", "Seconds spent per load stage",
                                  ["model", "stage"], multiprocess_mode="liveall")
        self.load_bytes = Gauge("spam_model_load_bytes", "Bytes of weights the load read",
                                ["model", "source", "device", "dtype", "quantization"], multiprocess_mode="liveall")
        self.info = Gauge("spam_model_info", "1 for each model a process serves, labelled with its model_version "
                          "and the precision it computes in", ["model", "version", "precision"],
                          multiprocess_mode="liveall")
        self.reload = Gauge("spam_reload_seconds", "Seconds this process's last reload took, under its outcome",
                            ["outcome"], multiprocess_mode="liveall")
        self.reload_at = Gauge("spam_reload_timestamp_seconds", "When this process's last reload ended (Unix time)",
                               multiprocess_mode="liveall")
        self.memory = Gauge("spam_process_memory_bytes", "Process memory (rss, pss, cuda*_allocated, ...)",
                            ["kind"], multiprocess_mode="liveall")
        self.tasks = Counter("spam_tasks", "Classification tasks by outcome", ["outcome"])
        self.latency = Histogram("spam_task_seconds", "Classification task latency",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("spam_task_batch_size", "Texts per classification task",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.forward = Histogram("spam_forward_batch_size", "Texts per dynamically batched forward pass",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128))


def enable() -> Path:
    """Switch prometheus_client to multiprocess mode in a folder of this worker's own; call in the
    main process before the fork (the children find the folder in ``PROMETHEUS_MULTIPROC_DIR``).

    The ``celery`` command imports prometheus_client before our code runs, so the value class is
    chosen again here, once the variable names the worker's folder.
    """
    global _metrics
    from prometheus_client import values

    base = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    if base and _OWN_FOLDER.match(Path(base).name):  # this process's image before a restart set it
        base = str(Path(base).parent)
    folder = folders.make(FOLDER_PREFIX, base)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    values.ValueClass = values.get_value_class()
    _metrics = _Metrics()
    return folder


def serve(port: int, bind: str, folder: Path, live_pids: Callable[[], set[int]]) -> None:
    """Serve ``/metrics`` on ``bind:port`` from the main process, dropping dead processes' gauges at
    each scrape. It has no authentication: bind it to loopback or a private network."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    class DeadProcessSweeper:
        def collect(self):
            live = live_pids()
            for file in folder.glob("gauge_live*.db"):
                match = _PID_FILE.search(file.name)
                if match and int(match.group(1)) not in live:
                    multiprocess.mark_process_dead(int(match.group(1)), str(folder))
            return []

    registry = CollectorRegistry()
    registry.register(DeadProcessSweeper())
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    start_http_server(port, addr=bind, registry=registry)
    log.info("Prometheus metrics on %s:%d/metrics", bind, port)


def record_load(name: str, loaded: LoadedModel) -> None:
    if _metrics is None:
        return
    p = loaded.placement
    served = (loaded.version, p.precision)
    previous = _served.get(name)
    if previous is not None and previous != served:  # a reload: the old version is no longer served
        _metrics.info.labels(name, *previous).set(0)
    _served[name] = served
    for stage, seconds in loaded.timings.items():
        _metrics.load_seconds.labels(name, stage).set(seconds)
    _metrics.info.labels(name, *served).set(1)
    _metrics.load_bytes.labels(name, loaded.source, str(p.device), p.dtype_name,
                               p.quantization or "none").set(loaded.bytes_read)


def record_reload(outcome: str, seconds: float) -> None:
    if _metrics is None:
        return
    for other in _reload_outcomes - {outcome}:  # multiprocess gauges cannot drop a label: zero it
        _metrics.reload.labels(other).set(0)
    _reload_outcomes.add(outcome)
    _metrics.reload.labels(outcome).set(seconds)
    _metrics.reload_at.set_to_current_time()


def record_task(seconds: float, batch_size: int, ok: bool) -> None:
    if _metrics is None:
        return
    _metrics.tasks.labels("succeeded" if ok else "failed").inc()
    if ok:
        _metrics.latency.observe(seconds)
        _metrics.batch.observe(batch_size)


def record_forward(texts: int) -> None:
    if _metrics is not None:
        _metrics.forward.observe(texts)


def record_memory(figures_mb: dict[str, float]) -> None:
    if _metrics is None:
        return
    for key, mb in figures_mb.items():
        _metrics.memory.labels(key.removesuffix("_mb")).set(mb * 2**20)
