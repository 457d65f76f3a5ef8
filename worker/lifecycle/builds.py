"""Builder processes (:mod:`worker.lifecycle.builder`), owned by the worker's main process.

A reload that needs something built first (the converted base a new adapter is served over) runs
one and waits (:func:`run`). Snapshot builds run in the background
(:class:`Builds`): a process that serves a model before its snapshot exists (a first start serving
from the checkpoint, a reload serving its adapter unmerged) asks for one, the main process starts
it, one per model at a time, and tells the serving processes to switch when it is done. A build that
fails (a full disk, a killed builder) leaves the worker serving what it serves, and is retried by the
main process after 10 s, then 20 s, ... up to 10 min; a build for a version that a newer one replaced
is cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from worker.errors import ModelLoadError
from worker.lifecycle.pinning import model_fields
from worker.settings import Settings

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parents[2]
_FIRST_RETRY_S = 10.0
_LAST_RETRY_S = 600.0


def start(name: str, settings: Settings, unmerged: bool = False) -> subprocess.Popen:
    """A builder process for ``name`` with ``settings`` (model paths pinned); CPU only. ``unmerged``:
    only what the adapter is served over unmerged (the converted base), not its merged snapshot."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    request = {"model": name, "env": replace(settings, device="cpu").to_env(), "unmerged": unmerged}
    process = subprocess.Popen([sys.executable, "-m", "worker.lifecycle.builder"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=env, text=True)
    process.stdin.write(json.dumps(request))
    process.stdin.close()
    return process


def outcome(process: subprocess.Popen) -> dict:
    """The builder's answer once it has exited: ``{"ok": True, "version": ...}`` or ``{"ok": False, "error": ...}``."""
    out = process.stdout.read() if process.stdout else ""
    for line in reversed(out.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {"ok": False, "error": f"the builder process exited with {_exit_name(process.returncode)} and no answer"}


def run(name: str, settings: Settings, timeout: float, unmerged: bool = False) -> str:
    """Run a builder to its end: the ``model_version`` it built for, or ``ModelLoadError``."""
    process = start(name, settings, unmerged)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise ModelLoadError(name, f"not built within {timeout:.0f}s (LOAD_TIMEOUT_S)") from None
    result = outcome(process)
    if not result.get("ok"):
        raise ModelLoadError(name, result.get("error", "").removeprefix(f"cannot load model {name!r}: "))
    return result["version"]


@dataclass
class _Job:
    name: str
    key: str
    settings: Settings
    process: subprocess.Popen
    started: float


@dataclass(frozen=True)
class Finished:
    name: str
    key: str
    settings: Settings
    ok: bool


def build_key(name: str, settings: Settings) -> str:
    """What a build of ``name`` with ``settings`` makes: the same key, the same snapshot."""
    fields = {f: getattr(settings, f) for f in model_fields((name,))}
    return json.dumps({**fields, "dtype": settings.torch_dtype, "quantization": settings.quantization_for(name),
                       "loader": settings.model_loader}, sort_keys=True)


class Builds:
    """Background snapshot builds, one builder process per model at a time."""

    def __init__(self) -> None:
        self._jobs: dict[str, _Job] = {}
        self._done: set[str] = set()
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures, retry at)

    def want(self, name: str, settings: Settings) -> None:
        """Build ``name``'s snapshot for ``settings`` unless it is being built, was built, or failed
        too recently; a build of another version of ``name`` is cancelled."""
        key = build_key(name, settings)
        job = self._jobs.get(name)
        if job is not None and job.key == key:
            return
        if key in self._done or time.monotonic() < self._failures.get(key, (0, 0.0))[1]:
            return
        if job is not None:
            self.cancel(name)
        log.info("%s: building its snapshot in a builder process", name)
        self._jobs[name] = _Job(name, key, settings, start(name, settings), time.monotonic())

    def running(self, name: str) -> bool:
        return name in self._jobs

    def cancel(self, name: str) -> None:
        """Stop the build of ``name``: a newer version replaced it."""
        job = self._jobs.get(name)
        if job is None:
            return
        del self._jobs[name]
        job.process.terminate()
        try:
            job.process.wait(10)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
        log.info("%s: cancelled a snapshot build that a newer version replaced", name)

    def poll(self) -> list[Finished]:
        """The builds that ended since the last call."""
        finished = []
        for name, job in list(self._jobs.items()):
            if job.process.poll() is None:
                continue
            del self._jobs[name]
            result = outcome(job.process)
            if result.get("ok"):
                self._done.add(job.key)
                self._failures.pop(job.key, None)
                log.info("%s: snapshot built in %.1fs", name, time.monotonic() - job.started)
                finished.append(Finished(name, job.key, job.settings, True))
                continue
            count = self._failures.get(job.key, (0, 0.0))[0] + 1
            wait = min(_LAST_RETRY_S, _FIRST_RETRY_S * 2 ** (count - 1))
            self._failures[job.key] = (count, time.monotonic() + wait)
            error = result.get("error", "failed")
            log.error("%s: the snapshot build failed (%d time%s), serving on; retrying in %.0fs: %s", name, count,
                      "" if count == 1 else "s", wait, error)
            finished.append(Finished(name, job.key, job.settings, False))
        return finished

    def stop(self) -> None:
        for name in list(self._jobs):
            self.cancel(name)


def _exit_name(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
