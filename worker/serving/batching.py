"""Dynamic batching: the messages one worker process runs at the same time share forward passes.

With ``--pool=threads`` a process runs up to ``--concurrency`` tasks at once. Each task hands its
texts to the model's batcher and waits; one thread per model takes everything queued, up to
``max_batch`` texts, and scores them in one call (which sorts by length to limit padding). While a
pass runs, new texts queue up for the next one, so batches grow with the load by themselves. The
batcher waits up to ``max_wait_s`` for more only while other tasks of this process are still on
their way to it, so a lone message never waits. Every message stays an ordinary Celery task.

A caller may give a deadline (:mod:`worker.serving.time_limits`): past it, it stops waiting, its texts not
yet in a pass are dropped, and it raises ``SoftTimeLimitExceeded``; the batcher thread goes on.
A pass that fails is run again one text at a time, so a text that cannot be scored fails its own
task only, never the others that shared its pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

from celery.exceptions import SoftTimeLimitExceeded

from worker.serving.score import Score

log = logging.getLogger(__name__)


class Scorer(Protocol):
    name: str

    def score(self, texts: list[str]) -> list[Score]: ...


class Batcher:
    """Coalesces concurrent ``score`` calls into batched calls of ``scorer.score`` on one thread."""

    def __init__(self, scorer: Scorer, max_batch: int, max_wait_s: float,
                 in_flight: Callable[[], int] = lambda: 0, on_batch: Callable[[int], None] = lambda n: None,
                 thread_init: Callable[[], None] = lambda: None) -> None:
        self.scorer = scorer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._in_flight = in_flight
        self._on_batch = on_batch
        self._thread_init = thread_init
        self._queue: queue.SimpleQueue[tuple[str, Future]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{scorer.name}", daemon=True)
        self._thread.start()

    def score(self, texts: Sequence[str], deadline: float | None = None) -> list[Score]:
        """Scores in input order; blocks until every text was part of some forward pass, or until
        ``deadline`` (``time.monotonic()``), when it raises ``SoftTimeLimitExceeded``."""
        futures = []
        for text in texts:
            future: Future[Score] = Future()
            self._queue.put((text, future))
            futures.append(future)
        try:
            return [f.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]
        except FutureTimeout:
            dropped = sum(f.cancel() for f in futures)
            raise SoftTimeLimitExceeded(
                f"the task ran past its time limit (TASK_TIME_LIMIT_S) waiting for {self.scorer.name} to score "
                f"{len(texts)} text(s); {dropped} not yet started were dropped and this worker goes on serving"
            ) from None

    def _run(self) -> None:
        self._thread_init()
        while True:
            # A text whose task gave up (its deadline passed) is cancelled: skip it.
            batch = [(text, future) for text, future in self._collect() if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                scores = self.scorer.score([text for text, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - every waiting task must hear about it
                if len(batch) == 1:
                    log.exception("%s: a forward pass failed", self.scorer.name)
                    batch[0][1].set_exception(exc)
                else:
                    log.warning("%s: a batched forward pass of %d texts failed (%s: %s); scoring each alone",
                                self.scorer.name, len(batch), type(exc).__name__, exc)
                    self._score_alone(batch)
                continue
            self._on_batch(len(batch))
            for (_, future), score in zip(batch, scores, strict=True):
                future.set_result(score)

    def _score_alone(self, batch: list[tuple[str, Future]]) -> None:
        """After a failed pass: one pass per text, so a text that cannot be scored fails only its own task."""
        for text, future in batch:
            try:
                score = self.scorer.score([text])[0]
            except BaseException as exc:  # noqa: BLE001 - its task hears about it
                log.exception("%s: a forward pass failed on one text", self.scorer.name)
                future.set_exception(exc)
            else:
                self._on_batch(1)
                future.set_result(score)

    def _collect(self) -> list[tuple[str, Future]]:
        """The next batch: block for one text, take what is queued, wait briefly for the rest of
        the tasks in flight (they would otherwise trail in one pass later)."""
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(batch) >= self._in_flight():
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch
