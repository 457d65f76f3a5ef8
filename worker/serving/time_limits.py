"""``TASK_TIME_LIMIT_S`` on the pools that do not enforce it (threads, solo).

Celery enforces time limits only in prefork (``celery/concurrency/thread.py`` accepts and ignores
them), so on a threads-pool worker a stuck or starved task would run forever. Here each task's
thread records its deadline when the task starts (``task_prerun`` runs in that thread); a task
still waiting for its forward pass at that deadline stops waiting and fails with Celery's own
``SoftTimeLimitExceeded``, what prefork raises at the soft limit, while the batcher thread and the
process go on serving. A forward pass already running is not interrupted (a thread cannot be
killed); texts of the task not yet in a pass are dropped from the queue.
"""

from __future__ import annotations

import threading
import time

from celery.signals import task_postrun, task_prerun

_local = threading.local()


def deadline() -> float | None:
    """The ``time.monotonic()`` by which the task running on this thread must end, or None."""
    return getattr(_local, "deadline", None)


def install(limit_s: float) -> None:
    """Give every task run in this process a deadline ``limit_s`` after it starts."""

    @task_prerun.connect(weak=False)
    def _start(**_) -> None:
        _local.deadline = time.monotonic() + limit_s

    @task_postrun.connect(weak=False)
    def _end(**_) -> None:
        _local.deadline = None
