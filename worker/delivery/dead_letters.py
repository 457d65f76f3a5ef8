"""Giving up on a message: its task fails with a line saying why, and the message is kept.

A message that never finishes (it killed its worker process ``MAX_TASK_ATTEMPTS`` times), one too
big to decode, or an escalation no worker took ends here instead of looping or waiting forever:
the task's result becomes that failure, so its caller hears at once (through a split batch's chord
too), and the message goes, newest first, onto the broker's Redis list ``spam.dead_letter``
(:data:`producer.contract.DEAD_LETTER_LIST`, the last :data:`KEEP`), which
``python -m producer stats`` shows. Acknowledging or removing the message is the caller's part.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from celery.worker.request import Request

from producer.contract import DEAD_LETTER_LIST

log = logging.getLogger(__name__)

KEEP = 1000
"""Records kept in the list; older ones are dropped (the list must not fill Redis)."""


def give_up(app, message, error: Exception, hostname: str, attempts: int | None = None,
            keep_body: bool = True) -> None:
    """Fail ``message``'s task with ``error`` and keep the message in the dead-letter list.
    ``keep_body=False``: the body is neither decoded nor kept (a message too big to read)."""
    headers = message.headers or {}
    record = {
        "task_id": headers.get("id"),
        "task": headers.get("task"),
        "reason": str(error),
        "attempts": attempts,
        "queue": (message.delivery_info or {}).get("routing_key"),
        "worker": hostname,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "body_bytes": len(message.body or b""),
        "message": message.serializable() if keep_body else None,
    }
    with message.channel.conn_or_acquire() as client:
        with client.pipeline() as pipe:
            pipe.lpush(DEAD_LETTER_LIST, json.dumps(record, default=str))
            pipe.ltrim(DEAD_LETTER_LIST, 0, KEEP - 1)
            pipe.execute()
    log.error("dead-lettered task %s (%s): %s; its message is kept in the Redis list %s", record["task_id"],
              record["task"], error, DEAD_LETTER_LIST)
    context = _context(app, message, hostname) if keep_body else None
    app.backend.mark_as_failure(record["task_id"], error, request=context)


def _context(app, message, hostname: str):
    """The request Celery would run the message as, so a failure reaches a chord the task belongs to
    (a split batch's chunk); None for a message no registered task can read."""
    try:
        return Request(message, app=app, hostname=hostname)._context
    except Exception:  # noqa: BLE001 - an unreadable message fails its task id alone
        return None
