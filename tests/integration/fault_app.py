"""The worker app with a fault injector, for the fault tests: ``celery -A tests.integration.fault_app worker``.

Everything is the real worker (tasks, start-up, consumer, pools, results, acks). A task whose
arguments hold a text marked for the test acts on it in the process that runs it, so a test
catches a task in the state it wants by construction, not by timing:

- ``HOLD:<gate>``: before the task body runs, write ``<FAULT_DIR>/<gate>.<task id>.held`` (the
  pid), then wait until ``<FAULT_DIR>/<gate>.open`` exists. The test knows the task is running
  in that pid: it kills it, or takes Redis away, then opens the gate.
- ``HOLD-PART:<gate>``: a chunk of a split batch stores its result, then waits at the gate before
  Celery records it as a part of its chord (the bookkeeping that publishes the join).
- ``DIE-AFTER:<gate>``: after the task stored its result, write the same file and wait for the
  gate, then kill the process (once per gate): a process lost after its task succeeded.
- ``POISON``: kill the process running the task, before its body, every time: a message that
  crashes its worker.

``FAULT_DIR`` is set in the worker's environment by the test.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from celery.signals import task_postrun, task_prerun

from worker.celery import app
from worker.delivery.results import MarkingRedisBackend

_POLL_S = 0.02


def _texts(value: object, depth: int = 0):
    """Every string in a task's arguments (texts, lists of texts, escalation items)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple) and depth < 3:
        for item in value:
            yield from _texts(item, depth + 1)


def _marked(args, kwargs, marker: str) -> str | None:
    """The gate named after ``marker`` in the task's arguments, if any (up to the next space)."""
    for text in _texts([*(args or ()), *(kwargs or {}).values()]):
        if text.startswith(marker):
            return text[len(marker):].split(" ", 1)[0] if marker.endswith(":") else marker
    return None


def _wait_at(gate: str, task_id: str) -> None:
    folder = Path(os.environ["FAULT_DIR"])
    (folder / f"{gate}.{task_id}.held").write_text(str(os.getpid()))
    while not (folder / f"{gate}.open").exists():
        time.sleep(_POLL_S)


@task_prerun.connect(weak=False)
def _before(task_id=None, args=None, kwargs=None, **_) -> None:
    if _marked(args, kwargs, "POISON"):
        os.kill(os.getpid(), signal.SIGKILL)
    gate = _marked(args, kwargs, "HOLD:")
    if gate:
        _wait_at(gate, task_id)


@task_postrun.connect(weak=False)
def _after(task_id=None, args=None, kwargs=None, **_) -> None:
    gate = _marked(args, kwargs, "DIE-AFTER:")
    if not gate:
        return
    died = Path(os.environ["FAULT_DIR"]) / f"{gate}.died"
    if died.exists():
        return
    _wait_at(gate, task_id)
    died.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


_record_part = MarkingRedisBackend.on_chord_part_return


def _held_part(self, request, state, result, **kwargs):
    gate = _marked(request.args, request.kwargs, "HOLD-PART:")
    if gate:
        _wait_at(gate, request.id)
    return _record_part(self, request, state, result, **kwargs)


MarkingRedisBackend.on_chord_part_return = _held_part

__all__ = ["app"]
