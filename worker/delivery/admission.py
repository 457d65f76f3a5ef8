"""What the consumer checks before a message becomes a task (:class:`worker.delivery.consumer.RedisRestoringConsumer`).

- **Size**: a body over ``MAX_MESSAGE_BYTES`` is refused before anything decodes it: its task
  fails with ``InvalidInput`` and the message is dead-lettered without its body.
- **Expired escalations and forwards**: one past ``ESCALATION_TIMEOUT_S`` fails with
  ``ModelUnavailable`` saying so (Celery would mark it revoked as "expired").
- **Redelivery** (kombu marks a message it gives back: a process that died running it, a Redis
  restart, a requeue): a task that already succeeded (``spam-done-<id>``, written with its result
  by :mod:`worker.delivery.results`) is acknowledged without running again, even when its caller deleted
  the result. Otherwise its delivery is counted in ``spam-attempts-<id>`` (a TTL'd Redis key the
  task's final result deletes); past ``MAX_TASK_ATTEMPTS`` deliveries it is dead-lettered, and
  each delivery again is logged with the task id and count, so a worker that keeps dying says why.

A first delivery costs no Redis round trip. When Redis cannot answer a check, the message is let
through: a check must never be what loses or holds a task.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from kombu.utils.encoding import bytes_to_str

from producer.contract import InvalidInput, ModelUnavailable, TaskDeadLettered
from worker.delivery import dead_letters
from worker.delivery.results import ATTEMPTS_PREFIX, DONE_PREFIX
from worker.settings import Settings

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, app, settings: Settings, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self.max_bytes = settings.message_bytes_limit
        self.max_attempts = settings.max_task_attempts
        # Long enough to span the attempts of a task whose whole worker dies each time (each comes
        # back a visibility timeout later); a task that finishes deletes it.
        self.attempts_ttl_s = int(settings.visibility_timeout_s * (settings.max_task_attempts + 1))
        self.escalation_timeout_s = settings.escalation_timeout_s

    def admit(self, message) -> bool:
        """True: hand the message on to Celery. False: it was settled here (and acknowledged)."""
        try:
            return self._admit(message)
        except Exception:  # noqa: BLE001 - see the module docstring: let it through
            log.warning("could not check message %s before running it; running it", _task_id(message),
                        exc_info=True)
            return True

    def _admit(self, message) -> bool:
        headers = message.headers or {}
        size = len(message.body or b"")
        if size > self.max_bytes:
            error = InvalidInput(f"the task message is {size} bytes; the limit is {self.max_bytes} "
                                 "(MAX_MESSAGE_BYTES)")
            return self._give_up(message, error, keep_body=False)
        if expired(headers):
            return self._give_up(message, ModelUnavailable(expiry_line(message)))
        redelivered = (message.delivery_info or {}).get("redelivered") or headers.get("redelivered")
        if not redelivered or not headers.get("id"):
            return True  # a first delivery, or no task id to count by (Celery refuses such a message itself)
        task_id = _task_id(message)
        with self.app.backend.client.pipeline() as pipe:
            pipe.exists(DONE_PREFIX + task_id)
            pipe.incr(ATTEMPTS_PREFIX + task_id)
            pipe.expire(ATTEMPTS_PREFIX + task_id, self.attempts_ttl_s)
            done, redeliveries, _ = pipe.execute()
        if done:
            self.app.backend.client.delete(ATTEMPTS_PREFIX + task_id)
            log.warning("task %s (%s) delivered again but already succeeded: acknowledged without running it "
                        "again", task_id, headers.get("task"))
            message.ack()
            return False
        delivery = redeliveries + 1
        if delivery > self.max_attempts:
            error = TaskDeadLettered(
                f"task {task_id} was delivered {delivery} times and never finished (its worker process died "
                f"running it, or it was requeued, each time); given up after MAX_TASK_ATTEMPTS={self.max_attempts}")
            return self._give_up(message, error, attempts=delivery)
        log.warning("task %s (%s) delivered again, attempt %d of at most %d (MAX_TASK_ATTEMPTS): its last delivery "
                    "did not finish (its worker process died, or the broker connection was lost)", task_id,
                    headers.get("task"), delivery, self.max_attempts)
        return True

    def _give_up(self, message, error: Exception, attempts: int | None = None, keep_body: bool = True) -> bool:
        dead_letters.give_up(self.app, message, error, self.hostname, attempts, keep_body)
        message.ack()
        return False


def expired(headers: dict, now: datetime | None = None) -> bool:
    """An escalation or forward (a replaced task, which is what carries an expiry of ours) past it."""
    expires = headers.get("expires")
    if not expires or not headers.get("replaced_task_nesting"):
        return False
    try:
        when = datetime.fromisoformat(str(expires))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when <= (now or datetime.now(UTC))


def expiry_line(message) -> str:
    queue = (message.delivery_info or {}).get("routing_key") or "its queue"
    return (f"no worker took task {_task_id(message)} ({(message.headers or {}).get('task')}) from {queue} before "
            f"it expired (ESCALATION_TIMEOUT_S): is a worker of that model running and consuming {queue}?")


def _task_id(message) -> str:
    return bytes_to_str((message.headers or {}).get("id", "?"))
