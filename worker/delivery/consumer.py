"""The worker's consumer: delivery through Redis restarts, and what it checks before a task runs.

Celery forgets the tasks it received but had not handed to a pool process when the broker
connection drops, counting on the broker to requeue them, which kombu's Redis transport fails to do
while Redis is down. This consumer requeues exactly those after reconnecting (and none a pool
process will run anyway) and retries the transport's bookkeeping writes while Redis restarts.
Every message passes :mod:`worker.delivery.admission` first (size, redelivery count, already succeeded,
expired), and a worker that sends to a model queue it does not serve fails what expires there
(:mod:`worker.delivery.expiry`). Measured in ``docs/fault-figures.md``.
"""

from __future__ import annotations

import functools
import logging
import time

from celery.worker import state as worker_state
from celery.worker.consumer import Consumer

from producer.contract import queue_for
from worker.delivery import expiry
from worker.delivery.admission import Admission

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
        from worker.celery import settings  # this class is loaded by name once the app exists

        self._settings = settings
        self._lost_channels: list = []  # channels of lost connections with tasks still running
        self._forgotten: list = []  # requests dropped at a connection loss, to requeue
        self._admission = Admission(self.app, settings, self.hostname)
        self._expiry_watch = None

    def create_task_handler(self, *args, **kwargs):
        handle = super().create_task_handler(*args, **kwargs)
        admit = self._admission.admit

        def on_task_received(message):
            if admit(message):
                handle(message)

        return on_task_received

    def on_connection_error_after_connected(self, exc):
        channel = getattr(self.task_consumer, "channel", None)
        if hasattr(getattr(channel, "qos", None), "restore_by_tag"):  # the Redis transport
            channel.qos.restore_at_shutdown = False  # connect() requeues what needs it
            self._lost_channels.append(channel)
        super().on_connection_error_after_connected(exc)

    def on_close(self):
        # Each dropped request with the job the pool made of it, taken before the prefork pool's
        # flush drops every job a child has not acknowledged yet from its cache.
        held = [(r, r._apply_result() if r._apply_result is not None else None)
                for r in (*worker_state.reserved_requests, *worker_state.scheduled_requests)
                if r not in worker_state.active_requests]
        super().on_close()  # forgets them and empties the prefork pool's unsent buffer
        cache = getattr(getattr(self.pool, "_pool", None), "_cache", None)
        self._forgotten += [r for r, job in held if not _runs_anyway(r, job, cache) and r not in self._forgotten]

    def connect(self):
        connection = super().connect()
        if self._expiry_watch is None:  # after the pool started: no thread of ours crosses a fork
            served = set(self._settings.preload_models)
            self._expiry_watch = expiry.start(self.app, [queue_for(m) for m in ("koelectra", "exaone")
                                                         if m not in served],
                                              self._settings.escalation_timeout_s, self.hostname) or False
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


def _runs_anyway(request, job, pool_cache) -> bool:
    """Whether a request Celery dropped at a connection loss still runs, from what its pool holds:

    - never handed to the pool (reserved behind a rate limit, held for an ETA): no;
    - threads (and solo): anything handed over sits in the executor's queue, which runs it;
    - prefork: a job whose bytes went to a child (``_write_to``) runs in that child, although the
      flush dropped it from the pool's cache; it is put back there, so the child's acceptance and
      result reach the request and its message is acknowledged as usual. A job still in the
      unsent buffer was dropped with the buffer: no.
    """
    if request._apply_result is None:
        return False
    if pool_cache is None:
        return True
    child = getattr(job, "_write_to", None)
    if job is None or child is None or not child._is_alive():
        return False
    pool_cache.setdefault(job._job, job)
    return True


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
