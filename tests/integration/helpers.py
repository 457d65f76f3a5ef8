"""Helpers for talking to a real worker the way other apps do."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
from celery import Celery
from celery.result import AsyncResult

from producer.client import SpamClient, make_app
from producer.settings import ProducerSettings
from tests.conftest import WorkerProcess


def client_for(worker: WorkerProcess, timeout: float = 60.0) -> SpamClient:
    app = make_app(ProducerSettings(broker_url=worker.broker_url, result_backend=worker.backend_url))
    return SpamClient(app, timeout=timeout)


def bare_app(worker: WorkerProcess) -> Celery:
    """A Celery client that knows nothing but the broker, the backend and the task names."""
    return Celery("bare", broker=worker.broker_url, backend=worker.backend_url)


def wait_until_serving(worker: WorkerProcess, client: SpamClient, timeout: float = 180.0,
                       handle: AsyncResult | None = None) -> dict:
    """Classify one text (or wait for ``handle``); the task waits in the queue until the worker has
    loaded its models."""
    handle = handle or client.submit("준비 확인")
    deadline = time.monotonic() + timeout
    while not handle.ready():
        if worker.process.poll() is not None:
            raise AssertionError(f"worker exited with {worker.process.returncode}:\n{worker.log()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"worker not serving after {timeout}s:\n{worker.log()[-4000:]}")
        time.sleep(0.2)
    return handle.get(timeout=5)


TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다",
         "대출 승인 완료 010-1234-5678", "엄마 오늘 저녁 같이 먹어요"]


def flip(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    tmp.replace(link)


def serving_figures(client, figure: str = "version") -> dict[int, dict[str, str]]:
    """{pid: {model: figure}} of every serving process of the workers on ``client``'s broker (asked
    again for up to 10 s while no worker answers: one late reply is not an empty fleet)."""
    deadline = time.monotonic() + 10
    while not (stats := client.app.control.inspect(timeout=2.0).stats() or {}) and time.monotonic() < deadline:
        time.sleep(0.5)
    out: dict[int, dict[str, str]] = {}
    for figures in stats.values():
        for key, value in figures.items():
            parts = key.split(".")
            if len(parts) == 4 and parts[3] == figure:
                out.setdefault(int(parts[1].removeprefix("pid")), {})[parts[2]] = value
    return out


def wait_for_snapshots(client, processes: int, timeout: float = 240) -> None:
    """Until ``processes`` serving processes serve every model from its built snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        sources = serving_figures(client, "source")
        if len(sources) >= processes and all(s == "snapshot" for p in sources.values() for s in p.values()):
            return
        assert time.monotonic() < deadline, f"not all serving from snapshots: {sources}"
        time.sleep(0.5)


def scores(client) -> list[float]:
    return [r["spam_score"] for r in client.submit_batch(TEXTS, model="exaone").get(timeout=120)]


def _children(worker, builder: bool) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(worker.process.pid).children():
        try:
            if ("worker.lifecycle.builder" in " ".join(process.cmdline())) == builder:
                found.append(process)
        except psutil.Error:  # gone, or a zombie not reaped yet
            continue
    return found


def pool_children(worker) -> list[psutil.Process]:
    """The prefork pool's children (not the builder processes the main process also starts)."""
    return _children(worker, builder=False)


def builders(worker) -> list[psutil.Process]:
    return _children(worker, builder=True)


def wait_until(condition, timeout: float, what: str, worker=None):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if worker is not None and worker.process.poll() is not None:
            raise AssertionError(f"worker exited with {worker.process.returncode} waiting for {what}:\n"
                                 f"{worker.log()[-4000:]}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s" + \
            (f"\n{worker.log()[-3000:]}" if worker is not None else "")
        time.sleep(0.3)
    return value
