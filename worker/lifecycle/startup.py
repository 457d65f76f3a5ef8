"""Preload the models once per worker process, and refuse to run when they cannot load.

- prefork: each child loads in ``worker_process_init``; the heavy libraries are imported once in
  the main process before the fork, so children start with them in shared memory.
- solo, threads (and other non-forking pools): the main process loads them while the worker is
  being built, before the consumer exists (``worker_process_init`` never fires for threads).
  With more than one thread, concurrent tasks share forward passes (:mod:`worker.serving.batching`).

Celery logs and swallows exceptions from ``worker_process_init``, so a child whose load failed
would serve with no model, and a child that exits is respawned forever. Instead the child records
one line in memory shared with the main process and waits without taking a task. The main process
starts consuming only once every child has loaded; if one fails it logs that line and shuts down
with exit code 1 before fetching a message (later, for a respawned child, it shuts down warm so
unacknowledged messages go back to the queue), then releases the waiting children.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from billiard.process import current_process
from celery import bootsteps
from celery.exceptions import WorkerShutdown
from celery.signals import worker_process_init
from celery.worker import state

from producer.connection import insecure_warnings
from worker.errors import ModelLoadError, first_line
from worker.lifecycle import follow, prefetch, reload  # noqa: F401 (reload: its control commands)
from worker.lifecycle.fleet import fleet
from worker.lifecycle.registry import registry
from worker.serving import time_limits
from worker.settings import Settings
from worker.telemetry import metrics, peers, stats

log = logging.getLogger(__name__)

EX_LOAD_FAILED = 1
_CHECK_INTERVAL_S = 0.2


class _Shared:
    """State created in the main process before the fork and inherited by every child."""

    main_pid: int = 0
    forks: bool = False
    failure: multiprocessing.Array | None = None  # type: ignore[valid-type]
    release: multiprocessing.Value | None = None  # type: ignore[valid-type]
    loaded: multiprocessing.Value | None = None  # type: ignore[valid-type]
    threads: int = 1
    stats_folder: Path = Path()
    metrics_folder: Path = Path()


def install(app, settings: Settings) -> None:
    """Register the start-up bootstep and the per-process hook on ``app``."""

    class Preload(bootsteps.StartStopStep):
        """Import the libraries before the pool forks; load in-process for non-forking pools."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, worker, **kwargs):
            super().__init__(worker, **kwargs)
            _Shared.main_pid = os.getpid()
            _Shared.stats_folder = stats.make_folder()
            if settings.metrics_port:
                _Shared.metrics_folder = metrics.enable()
            _Shared.forks = worker.pool_cls.__module__ == "celery.concurrency.prefork"
            # Every process loads the files the settings name now, resolved once, whatever a link
            # or the Hub cache names later.
            pinned = fleet.install(settings, _Shared.forks, _Shared.stats_folder, lambda: _live_pids(worker))
            if settings.prefetch_weights:
                prefetch.start(pinned)  # reads the weights while the next line imports torch
            import_libraries(pinned)
            _set_threads(pinned, worker.concurrency if _Shared.forks else 1,
                         spare=not _Shared.forks and worker.concurrency > 1)
            if _Shared.forks:
                context = multiprocessing.get_context("fork")
                _Shared.failure = context.Array(ctypes.c_char, 2048)
                _Shared.release = context.Value(ctypes.c_bool, False)
                _Shared.loaded = context.Value(ctypes.c_int, 0)
            else:
                _load_or_exit(pinned)
                # threads, solo: concurrent tasks share forward passes, and since these pools ignore
                # time limits, a task's wait for its pass ends at TASK_TIME_LIMIT_S.
                registry.enable_batching(settings.batch_wait_ms / 1000)
                time_limits.install(settings.task_time_limit_s)
                stats.process_stats.attach(_Shared.stats_folder, "main")

        def start(self, worker):
            for line in insecure_warnings(settings.celery_broker_url, settings.celery_result_backend):
                log.warning("%s", line)
            if settings.metrics_port:
                metrics.serve(settings.metrics_port, settings.metrics_bind, _Shared.metrics_folder,
                              lambda: _live_pids(worker))
            # The consumer starts after this step: no message is fetched until every child is ready.
            if _Shared.forks:
                _wait_for_children(worker.concurrency, settings.load_timeout_s)
            threading.Thread(target=_supervise, name="lifecycle", daemon=True).start()
            peers.start(app, worker.hostname, settings.visibility_timeout_s)

        def stop(self, worker):
            # Runs before the pool stops (this step requires it): let waiting children exit.
            if _Shared.release is not None:
                _Shared.release.value = True
            fleet.stop()
            peers.stop()
            # No shutdown(): Celery never calls it on a worker step; the folders go when the process
            # exits (worker.telemetry.folders).

        def info(self, worker):
            """Extra ``inspect stats`` keys, shown by Flower: every live process's figures."""
            return {**peers.figures(), **stats.collect(_Shared.stats_folder, _live_pids(worker))}

        terminate = stop

    app.steps["worker"].add(Preload)

    @worker_process_init.connect(weak=False)
    def _load_in_child(**_):
        if os.getpid() == _Shared.main_pid or not _Shared.forks:
            return  # solo fires this in the main process, which already loaded
        import torch

        torch.set_num_threads(_Shared.threads)
        # The accepted version as the fork copied it: a reload in progress or refused changes nothing here.
        current, generation = fleet.at_fork(settings)
        try:
            registry.preload(current)
            stats.process_stats.attach(_Shared.stats_folder, f"child{current_process().index}")
            follow.start(fleet.board, current, generation)
            with _Shared.loaded.get_lock():
                _Shared.loaded.value += 1
        except Exception as exc:  # noqa: BLE001 - every cause must stop the worker, not a swallowed log
            line = _failure_line(exc)
            log.critical("%s", line)
            with _Shared.failure.get_lock():
                _Shared.failure.value = line.encode("utf-8", "replace")[:2000]
            # Never take a task: wait until the main process is shutting down, then leave.
            while not _Shared.release.value:
                time.sleep(_CHECK_INTERVAL_S)
            os._exit(EX_LOAD_FAILED)


def _live_pids(worker) -> set[int]:
    """The processes that serve tasks now: the pool's children, or the main process itself."""
    if _Shared.forks:
        return set(worker.pool.info.get("processes", []))
    return {os.getpid()}


def _load_or_exit(settings: Settings) -> None:
    try:
        registry.preload(settings)
    except Exception as exc:  # noqa: BLE001
        line = _failure_line(exc)
        log.critical("%s", line)
        print(f"worker: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EX_LOAD_FAILED) from None


def _wait_for_children(count: int, timeout: float) -> None:
    start = time.monotonic()
    while _Shared.loaded.value < count:
        if failure := _child_failure():
            log.critical("stopping the worker: %s", failure)
            raise WorkerShutdown(EX_LOAD_FAILED)
        if time.monotonic() - start > timeout:
            log.critical("stopping the worker: models not loaded after %.0fs (LOAD_TIMEOUT_S)", timeout)
            raise WorkerShutdown(EX_LOAD_FAILED)
        time.sleep(0.05)
    log.info("%d worker processes loaded their models in %.2fs", count, time.monotonic() - start)


def _supervise() -> None:
    """The main process's loop after start-up: a respawned child that cannot load stops the worker;
    about once a second, the background builds (:meth:`worker.lifecycle.fleet.Fleet.tick`)."""
    ticks = 0
    while True:
        time.sleep(_CHECK_INTERVAL_S)
        if _Shared.forks and (failure := _child_failure()):
            log.critical("stopping the worker: %s", failure)
            state.should_stop = EX_LOAD_FAILED
            return
        ticks += 1
        if ticks % 5 == 0:
            fleet.tick()


def _child_failure() -> str:
    """The line a child that could not load left in shared memory; empty while none has failed."""
    return _Shared.failure.value.decode("utf-8", "replace")


def _failure_line(exc: BaseException) -> str:
    if isinstance(exc, ModelLoadError):
        return str(exc)
    return f"cannot load models: {type(exc).__name__}: {first_line(exc)}"


def import_libraries(settings: Settings) -> None:
    """Import torch, transformers and the models' code once (seconds) and quiet their load-time
    chatter. PEFT is left out: only a first start, which builds a snapshot, needs it.

    The cyclic garbage collector is paused meanwhile: the imports create some 600,000 objects and
    its passes over them cost about a quarter of the import time here. They live as long as the
    process, so they are then frozen: later collections, a prefork child's included, skip them
    instead of walking (and so copying) the parent's pages. The few megabytes of import-time
    garbage this keeps cost less than the half second one full collection takes.
    """
    collecting = gc.isenabled()
    if collecting:
        gc.disable()
    try:
        import torch  # noqa: F401
        import transformers

        from worker.loading.plan import import_model_code

        import_model_code(settings)
    finally:
        if collecting:
            gc.freeze()
            gc.enable()
    transformers.logging.set_verbosity_error()
    # PEFT calls an API transformers deprecates; the warning is not ours to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    transformers.logging.disable_progress_bar()


def _set_threads(settings: Settings, processes: int, spare: bool = False) -> None:
    """Share the cores among the worker processes instead of oversubscribing them. A threads-pool
    worker keeps one core for Celery's own threads (receiving, events, results): torch's intra-op
    threads stall each other badly when one of them is descheduled."""
    import torch

    cores = os.cpu_count() or 1
    automatic = max(1, cores - 1) if spare else max(1, cores // max(1, processes))
    _Shared.threads = settings.torch_threads or automatic
    torch.set_num_threads(_Shared.threads)
