"""A small client for apps that enqueue classifications. Needs only Celery and Redis, not torch.

It knows the workers by task name alone (``send_task``), so it never imports worker code, and any
other Celery client can do the same with the names in :mod:`producer.contract`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from celery import Celery
from celery.result import AsyncResult

from producer import connection
from producer.contract import CLASSIFY, CLASSIFY_BATCH, route
from producer.settings import ProducerSettings

log = logging.getLogger(__name__)


def make_app(settings: ProducerSettings | None = None) -> Celery:
    """A broker-only Celery app speaking JSON, like the workers, routing each model to its queue, with
    the workers' bounds on a dead connection (:mod:`producer.connection`)."""
    settings = settings or ProducerSettings.from_env()
    app = Celery("spam-producer", broker=settings.broker_url, backend=settings.result_backend)
    timeout, health = settings.redis_socket_timeout_s, settings.redis_health_check_interval_s
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        result_accept_content=["json"], task_send_sent_event=True, broker_connection_retry_on_startup=True,
        task_routes=(route,),
        broker_transport_options=connection.broker_transport_options(timeout, health),
        **connection.backend_options(timeout, health),
    )
    for line in connection.insecure_warnings(settings.broker_url, settings.result_backend):
        log.warning("%s", line)
    return app


class SpamClient:
    """Classify texts through the worker fleet.

    ``classify`` waits for one result; ``submit``/``submit_batch`` return Celery ``AsyncResult``
    handles; ``classify_many`` streams results in input order, chunking the texts into batch tasks.
    """

    def __init__(self, app: Celery | None = None, timeout: float = 300.0) -> None:
        self.app = app or make_app()
        self.timeout = timeout

    def submit(self, text: str, model: str = "auto") -> AsyncResult:
        return self.app.send_task(CLASSIFY, args=[text], kwargs={"model": model})

    def submit_batch(self, texts: list[str], model: str = "auto") -> AsyncResult:
        return self.app.send_task(CLASSIFY_BATCH, args=[list(texts)], kwargs={"model": model})

    def classify(self, text: str, model: str = "auto", timeout: float | None = None) -> dict:
        """One result dict; raises the task's error (e.g. ``InvalidInput``) if it failed."""
        return self.submit(text, model).get(timeout=timeout or self.timeout)

    def classify_many(self, texts: Iterable[str], model: str = "auto", chunk_size: int = 64,
                      window: int = 8) -> Iterator[dict]:
        """Results in input order, keeping at most ``window`` batch tasks in flight. An item error's
        ``index`` counts from the first text, not from the start of its chunk."""
        pending: list[tuple[int, AsyncResult]] = []
        chunk: list[str] = []
        offset = 0
        for text in texts:
            chunk.append(text)
            if len(chunk) == chunk_size:
                pending.append((offset, self.submit_batch(chunk, model)))
                offset += len(chunk)
                chunk = []
                while len(pending) >= window:
                    yield from self._collect(*pending.pop(0))
        if chunk:
            pending.append((offset, self.submit_batch(chunk, model)))
        for start, handle in pending:
            yield from self._collect(start, handle)

    def _collect(self, offset: int, handle: AsyncResult) -> list[dict]:
        try:
            results = handle.get(timeout=self.timeout)
        finally:
            handle.forget()
        return [{**r, "index": r["index"] + offset} if "error" in r else r for r in results]

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> SpamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
