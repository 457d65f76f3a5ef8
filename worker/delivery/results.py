"""The result backend: Celery's Redis backend, plus a record that a task id succeeded which does
not go away with its result.

Celery acknowledges a redelivered message without running it when its task's result is SUCCESS
(``worker_deduplicate_successful_tasks``). A client that read the result and deleted it (the
producer's ``forget()``, which frees Redis) makes that lookup miss, and a late redelivery (an ack
lost to a Redis restart, a process that died after storing its result) runs the task again. So
every SUCCESS also writes ``spam-done-<task id>``, in the same round trip, kept as long as a
redelivery can come late (the visibility timeout, plus a minute for the restore sweep); the
consumer checks it (:mod:`worker.delivery.admission`). A task's final result also ends its attempt count.
Every command of this backend rides out a Redis outage of ``PUBLISH_RETRY_S``.
"""

from __future__ import annotations

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DONE_PREFIX = "spam-done-"
"""``spam-done-<task id>``: the task succeeded (its result may be gone)."""
ATTEMPTS_PREFIX = "spam-attempts-"
"""``spam-attempts-<task id>``: how often its message was delivered again without the task finishing."""
_REDIS_SCHEMES = ("redis", "rediss", "socket")


def backend_url(url: str) -> str:
    """``result_backend`` naming this backend for a Redis URL (Celery's ``class+url`` form);
    another scheme keeps Celery's backend and its result-based deduplication only."""
    return f"{__name__}:MarkingRedisBackend+{url}" if url.partition("://")[0] in _REDIS_SCHEMES else url


class MarkingRedisBackend(RedisBackend):
    """Writes ``spam-done-<id>`` with a task's SUCCESS, and drops its attempt count with any final
    state; every command is retried while Redis is away (``PUBLISH_RETRY_S``)."""

    def _create_client(self, **params):
        """A client whose commands retry a lost connection for about ``PUBLISH_RETRY_S`` (waits of
        0.5, 1, then 2 s) instead of redis-py's 3 tries. Celery does not retry its chord bookkeeping
        after a chunk stored its result (the part count, the claim, the join's lookup): a restart
        caught between the two failed the whole split batch. Sending a step again is safe when Redis
        never ran it (refused, or writes paused for a restart), and a part is recorded once per task
        id; a claim whose reply alone was lost (Redis killed mid-reply) would leave the join unsent."""
        retries = self._transport_options.get("connection_retries", 3)
        return super()._create_client(**{**params, "retry": Retry(ExponentialBackoff(cap=2.0, base=0.25), retries)})

    @property
    def done_ttl_s(self) -> int:
        visibility = (self.app.conf.broker_transport_options or {}).get("visibility_timeout", 3600)
        return int(visibility) + 60

    def _set_with_state(self, key, value, state):
        if state not in states.READY_STATES or not key.startswith(self.task_keyprefix):
            return super()._set_with_state(key, value, state)  # progress states, group results
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        task_id = bytes_to_str(key[len(self.task_keyprefix):])
        return self.ensure(self._set_final, (key, value, state, task_id))

    def _set_final(self, key, value, state, task_id) -> None:
        expires = self.failure_expires if state == states.FAILURE else self.expires
        with self.client.pipeline() as pipe:
            if expires:
                pipe.setex(key, expires, value)
            else:
                pipe.set(key, value)
            if state == states.SUCCESS:
                pipe.setex(DONE_PREFIX + task_id, self.done_ttl_s, 1)
            pipe.delete(ATTEMPTS_PREFIX + task_id)
            pipe.publish(key, value)
            pipe.execute()
