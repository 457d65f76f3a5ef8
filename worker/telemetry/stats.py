"""Load, memory and task figures of each worker process, handed to the main process for Flower.

Prefork children hold the figures, but ``celery inspect stats`` (what Flower shows) is answered by
the main process. Each serving process writes its figures as one small JSON file, atomically, into
a folder on tmpfs that the main process created before the fork; the main process reads the files
of its live processes when asked and deletes those of dead ones. Reading a few files keeps the
answer well inside the second Flower waits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import quantiles
from typing import TYPE_CHECKING, Any

from worker.telemetry import folders, metrics

if TYPE_CHECKING:
    from worker.loading.base import LoadedModel

log = logging.getLogger(__name__)

_PUBLISH_INTERVAL_S = 1.0
_WINDOW = 2048  # latencies and batch sizes kept for the percentiles


def memory_mb() -> dict[str, float]:
    """RSS and PSS of this process (PSS counts shared pages once across the processes sharing them)."""
    figures: dict[str, float] = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                figures[f"{key.lower()}_mb"] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:  # not Linux: RSS only
        import resource

        figures["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    torch = sys.modules.get("torch")  # only where the worker imported it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            figures[f"cuda{i}_allocated_mb"] = round(torch.cuda.memory_allocated(i) / 2**20, 1)
            figures[f"cuda{i}_reserved_mb"] = round(torch.cuda.memory_reserved(i) / 2**20, 1)
            figures[f"cuda{i}_peak_mb"] = round(torch.cuda.max_memory_allocated(i) / 2**20, 1)
    return figures


def load_figures(loaded: LoadedModel) -> dict[str, Any]:
    from worker.loading.memory_cap import summarize

    seconds = sum(loaded.timings.values())
    read_s = loaded.timings.get("materialise", 0.0) + loaded.timings.get("warmup", 0.0)
    placement = loaded.placement
    figures = {
        "version": loaded.version,
        "load_s": round(seconds, 3),
        "stages": " · ".join(f"{k} {v:.2f}" for k, v in loaded.timings.items()),
        "source": loaded.source,
        # Served before its snapshot existed (from the checkpoint, or the adapter unmerged): a builder
        # process is making the snapshot, and the process switches to it when it is done.
        "deferred": loaded.finish is not None,
        "bytes_read_mb": round(loaded.bytes_read / 2**20, 1),
        "read_gbps": round(loaded.bytes_read / 1e9 / read_s, 2) if read_s > 0 else 0.0,
        "device": str(placement.device),
        "dtype": placement.dtype_name,
        "quantization": placement.quantization or "none",
        "precision": placement.precision,
        # Modules per device when a device map placed the model (MAX_MEMORY_GB): "cuda:0 30, cpu 6".
        "device_map": summarize(getattr(loaded.model, "hf_device_map", None)) or str(placement.device),
    }
    if loaded.plan.prompt is not None:
        figures["prompt"] = loaded.plan.prompt.source
    return figures


@dataclass
class TaskRecord:
    batch_size: int


class ProcessStats:
    """The figures of one serving process; ``publish`` writes them for the main process."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.label = "main"
        self.models: dict[str, dict[str, Any]] = {}
        self.done = 0
        self.failed = 0
        self.latencies: deque[float] = deque(maxlen=_WINDOW)
        self.batch_sizes: deque[int] = deque(maxlen=_WINDOW)
        self.forward_sizes: deque[int] = deque(maxlen=_WINDOW)
        self.reload: dict[str, Any] = {}
        """The last reload this process took part in: generation, at, outcome, seconds, error."""
        self._lock = threading.Lock()
        self._dirty = threading.Event()

    def attach(self, folder: Path, label: str) -> None:
        """Start publishing into ``folder`` (called in the process that serves tasks)."""
        self.folder, self.label = folder, label
        self.publish()
        threading.Thread(target=self._publisher, name="stats-publisher", daemon=True).start()

    def record_load(self, name: str, loaded: LoadedModel) -> None:
        self.models[name] = load_figures(loaded)
        metrics.record_load(name, loaded)
        self._dirty.set()

    def record_reload(self, generation: int, outcome: str, seconds: float, error: str = "") -> None:
        """Publish at once: the main process waits for every process's answer."""
        self.reload = {"generation": generation, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "outcome": outcome,
                       "seconds": round(seconds, 3), **({"error": error} if error else {})}
        metrics.record_reload(outcome, seconds)
        self.publish()

    @contextmanager
    def task(self, batch_size: int = 1) -> Iterator[TaskRecord]:
        """Time one task; it counts as failed if the block raises."""
        record = TaskRecord(batch_size)
        start = time.perf_counter()
        try:
            yield record
        except BaseException:
            self.record_task(time.perf_counter() - start, record.batch_size, ok=False)
            raise
        self.record_task(time.perf_counter() - start, record.batch_size, ok=True)

    def record_task(self, seconds: float, batch_size: int, ok: bool) -> None:
        metrics.record_task(seconds, batch_size, ok)
        with self._lock:
            if ok:
                self.done += 1
                self.latencies.append(seconds)
                self.batch_sizes.append(batch_size)
            else:
                self.failed += 1
        self._dirty.set()

    def record_forward(self, texts: int) -> None:
        """One dynamically batched forward pass of ``texts`` texts (threads pool)."""
        metrics.record_forward(texts)
        with self._lock:
            self.forward_sizes.append(texts)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latencies = list(self.latencies)
            sizes = list(self.batch_sizes)
            forwards = list(self.forward_sizes)
            figures: dict[str, Any] = {"pid": os.getpid(), "label": self.label, "models": self.models,
                                       "tasks_done": self.done, "tasks_failed": self.failed,
                                       **{f"reload_{k}": v for k, v in self.reload.items()}}
        if latencies:
            cuts = quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
            figures["latency_p50_ms"] = round(cuts[49] * 1000, 2)
            figures["latency_p95_ms"] = round(cuts[94] * 1000, 2)
            figures["batch_mean"] = round(sum(sizes) / len(sizes), 2)
            figures["batch_max"] = max(sizes)
        if forwards:
            figures["forward_batch_mean"] = round(sum(forwards) / len(forwards), 2)
            figures["forward_batch_max"] = max(forwards)
        memory = memory_mb()
        metrics.record_memory(memory)
        figures.update(memory)
        return figures

    def publish(self) -> None:
        if self.folder is None:
            return
        data = json.dumps(self.snapshot())
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        os.replace(tmp, self.folder / f"{os.getpid()}.json")

    def _publisher(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(_PUBLISH_INTERVAL_S)
            self._dirty.clear()
            try:
                self.publish()
            except OSError as exc:  # the folder went away: the worker is shutting down
                log.debug("stats not published: %s", exc)
                return


FOLDER_PREFIX = "spam-worker-"


def make_folder() -> Path:
    """A private folder on tmpfs (where available) for this worker's processes to publish into,
    removed when the worker exits (:mod:`worker.telemetry.folders`)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return folders.make(FOLDER_PREFIX, base)


def collect(folder: Path, live_pids: set[int]) -> dict[str, Any]:
    """Flat, readable keys for ``inspect stats``; files of processes that are gone are deleted."""
    info: dict[str, Any] = {}
    for figures in read_figures(folder, live_pids).values():
        info.update(flatten(figures))
    return info


def read_figures(folder: Path, live_pids: set[int]) -> dict[int, dict[str, Any]]:
    """{pid: figures} of the live processes, as they published them; files of dead ones are deleted."""
    by_pid: dict[int, dict[str, Any]] = {}
    for file in sorted(folder.glob("*.json")):
        pid = int(file.stem)
        if pid not in live_pids:
            file.unlink(missing_ok=True)
            continue
        try:
            by_pid[pid] = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
    return by_pid


def flatten(figures: dict[str, Any]) -> dict[str, Any]:
    prefix = f"{figures['label']}.pid{figures['pid']}"
    flat = {f"{prefix}.{k}": v for k, v in figures.items() if k not in ("label", "pid", "models")}
    for model, values in figures.get("models", {}).items():
        flat.update({f"{prefix}.{model}.{k}": v for k, v in values.items()})
    return flat


process_stats = ProcessStats()
