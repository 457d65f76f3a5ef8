"""Delivery through Redis restarts: requeue what a lost broker connection made Celery drop.

Celery forgets the tasks it received but had not handed to a pool process when the broker
connection drops, counting on the broker to requeue them, which kombu's Redis transport fails to do
while Redis is down. This consumer requeues exactly those after reconnecting and retries the
transport's bookkeeping writes while Redis restarts. Measured in ``docs/fault-figures.md``.
"""

from __future__ import annotations

import functools
import logging
import time

from celery.worker import state as worker_state
from celery.worker.consumer import Consumer

_log = logging.getLogger(__name__)


class RedisRestoringConsumer(Consumer):
    """Celery's task consumer, made to lose nothing when the Redis broker restarts.

    - When the broker connection drops, Celery forgets every task it has received but not handed to
      a pool process (reserved, waiting for a free process, in the prefork pool's unsent buffer, or
      held for an ETA), counting on the broker to requeue a closed channel's unacknowledged messages.
      kombu's Redis transport requeues them from its ``unacked`` hash as the channel closes, but it
      closes because Redis went away: that fails, is not retried, and the tasks wait in ``unacked``
      for ``visibility_timeout`` (an hour). (When Redis is back already it requeues the running tasks
      too, which then run twice.) Here, once connected again, exactly the forgotten ones are requeued.
    - Recording a delivery in ``unacked`` (after BRPOP took the message off the list), an ack and a
      requeue are retried while Redis restarts instead of failing once: a failed record loses the
      message, a failed ack leaves it to run again an hour later.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lost_channels: list = []  # channels of lost connections with tasks still running
        self._forgotten: list = []  # requests dropped at a connection loss, to requeue

    def on_connection_error_after_connected(self, exc):
        channel = getattr(self.task_consumer, "channel", None)
        if hasattr(getattr(channel, "qos", None), "restore_by_tag"):  # the Redis transport
            channel.qos.restore_at_shutdown = False  # connect() requeues what needs it
            self._lost_channels.append(channel)
        super().on_connection_error_after_connected(exc)

    def on_close(self):
        held = [r for r in (*worker_state.reserved_requests, *worker_state.scheduled_requests)
                if r not in worker_state.active_requests]
        super().on_close()  # forgets them and empties the prefork pool's unsent buffer
        cache = getattr(getattr(self.pool, "_pool", None), "_cache", None)
        self._forgotten += [r for r in held if not _runs_anyway(r, cache) and r not in self._forgotten]

    def connect(self):
        connection = super().connect()
        qos = connection.default_channel.qos  # the task consumer's channel
        if not hasattr(qos, "restore_by_tag"):
            return connection
        self._lost_channels = [c for c in self._lost_channels
                               if any(not m.acknowledged for m in c.qos._delivered.values())]
        for channel in self._lost_channels:
            channel.connection = connection.transport  # closed channels cannot reach Redis to ack
        try:
            while self._forgotten:
                message = self._forgotten[0].message
                qos.restore_by_tag(message.delivery_tag)  # atomic; a no-op if already requeued
                message.channel.qos._delivered.pop(message.delivery_tag, None)
                _log.warning("requeued task %s: received before the broker connection was lost, never started",
                             self._forgotten.pop(0).id)
        except Exception:
            connection.release()  # the consumer reconnects and tries again
            raise
        for name in ("append", "ack", "reject"):
            setattr(qos, name, functools.partial(_retrying, getattr(qos, name), connection.connection_errors))
        return connection


def _runs_anyway(request, pool_cache) -> bool:
    """Whether a request Celery dropped still runs: a pool process has it (a job left in the prefork
    pool's cache after its flush; anything handed to a solo or threads pool)."""
    job = request._apply_result() if request._apply_result is not None else None
    return job is not None and (pool_cache is None or pool_cache.get(job._job) is job)


_RETRY_WAITS_S = (0.1, 0.2, 0.5, 1, 2, 3, 5, 5, 10, 10, 10, 10)


def _retrying(operation, errors, message_or_tag, *args, **kwargs):
    """Run a broker bookkeeping operation, retrying for about a minute while Redis is unreachable."""
    for wait in (*_RETRY_WAITS_S, None):
        try:
            return operation(message_or_tag, *args, **kwargs)
        except errors:
            if wait is None:
                _log.critical("Redis unreachable for a minute: %s(%s) failed", operation.__name__,
                              getattr(message_or_tag, "headers", {}).get("id", message_or_tag))
                raise
            time.sleep(wait)
