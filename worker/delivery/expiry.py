"""Escalations and forwards that no worker takes end with a clear error instead of waiting forever.

A KoELECTRA-only worker sends its unsure messages to ``spam.exaone`` (``spam.escalate``), and a
task for a model it lacks to that model's queue, each with Celery's ``expires`` set
``ESCALATION_TIMEOUT_S`` ahead. Celery only looks at ``expires`` when a worker takes the message:
with no EXAONE worker at all, nobody ever does, and the caller waits until its own timeout. So a
worker that sends to a queue it does not serve looks at the oldest messages waiting there every
few seconds, and takes each such message past its expiry off the queue (``LREM``: a worker that
took it first keeps it) and fails its task with ``ModelUnavailable`` (:mod:`worker.delivery.dead_letters`).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from kombu.utils.json import loads

from producer.contract import ModelUnavailable
from worker.delivery import dead_letters
from worker.delivery.admission import expired, expiry_line

log = logging.getLogger(__name__)

SCAN = 100
"""How many of the oldest messages of a queue each look reads."""


def start(app, queues: list[str], timeout_s: float, hostname: str) -> threading.Thread | None:
    """Watch ``queues`` (the model queues this worker sends to but does not serve) in a thread."""
    if not queues:
        return None
    interval = max(1.0, min(10.0, timeout_s / 10))
    thread = threading.Thread(target=_watch, args=(app, queues, interval, hostname), name="expiry-watch",
                              daemon=True)
    thread.start()
    return thread


def _watch(app, queues: list[str], interval: float, hostname: str) -> None:
    connection = None
    while True:
        time.sleep(interval)
        try:
            connection = connection or app.connection_for_write()
            for queue in queues:
                sweep(app, connection.default_channel, queue, hostname)
        except Exception as exc:  # noqa: BLE001 - Redis away: look again later, on a new connection
            log.debug("could not look for expired escalations: %s", exc)
            if connection is not None:
                connection.release()
                connection = None


def sweep(app, channel, queue: str, hostname: str, now: datetime | None = None) -> int:
    """Fail every expired escalation or forward among the oldest waiting in ``queue``; how many."""
    now = now or datetime.now(UTC)
    failed = 0
    with channel.conn_or_acquire() as client:
        for raw in client.lrange(queue, -SCAN, -1):  # BRPOP takes from the right: the oldest
            payload = loads(raw)
            if not expired(payload.get("headers") or {}, now) or not client.lrem(queue, 1, raw):
                continue
            message = channel.Message(payload, channel=channel)
            dead_letters.give_up(app, message, ModelUnavailable(expiry_line(message)), hostname)
            failed += 1
    return failed
