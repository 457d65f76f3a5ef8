"""Helpers for talking to a real worker the way other apps do."""

from __future__ import annotations

import time

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
