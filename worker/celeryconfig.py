"""Celery settings, derived from the worker settings. JSON only; built for long GPU tasks."""

from __future__ import annotations

import math

from kombu import Exchange, Queue

from producer import connection
from producer.contract import DEFAULT_QUEUE, queue_for, route
from worker.settings import Settings


def worker_queues(settings: Settings) -> list[Queue]:
    """The default queue (so clients that know only task names are served) and one queue per
    preloaded model. ``celery worker -Q`` narrows it, e.g. GPU workers taking ``spam.exaone`` only."""
    names = [DEFAULT_QUEUE, *(queue_for(m) for m in settings.preload_models)]
    exchange = Exchange(DEFAULT_QUEUE)  # what Celery clients bind queues they do not declare to
    return [Queue(name, exchange, routing_key=name) for name in names]


def publish_retry_policy(budget_s: float) -> dict:
    """Retry a publish while the broker is unreachable, waiting 0, 0.5, 1, 1.5 then 2 s between
    tries, for about ``budget_s`` in all (a Redis restart or failover takes seconds to a minute).
    Celery's default gives up after 3 tries, 0.7 s here, and the task then failed for good."""
    ramp = (0.0, 0.5, 1.0, 1.5)
    extra = max(0.0, budget_s - sum(ramp))
    return {"max_retries": len(ramp) + math.ceil(extra / 2.0), "interval_start": 0.0, "interval_step": 0.5,
            "interval_max": 2.0}


def celery_config(settings: Settings) -> dict:
    publish_policy = publish_retry_policy(settings.publish_retry_s)
    return {
        "broker_url": settings.celery_broker_url,
        "result_backend": settings.celery_result_backend,  # the class: worker.celery (worker.delivery.results)
        # JSON on the wire, never pickle: a pickled message is refused by the consumer.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acknowledged after it ran; a process that dies mid-task gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A redelivered task whose result is already SUCCESS is acknowledged, not run again.
        "worker_deduplicate_successful_tasks": True,
        "worker_prefetch_multiplier": 1,
        # Keep reconnecting to the broker, at start-up and while running.
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        # A dead worker's unacknowledged tasks go back to their queue after visibility_timeout; kombu
        # looks for them every 10th 10-s tick (~100 s). Look every visibility_timeout/60, 1 s to 10 s.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout_s // 60))),
            "unacked_restore_throttle": 1,
            # A dead or half-open connection fails a publish or ack within the socket timeout.
            **connection.broker_transport_options(settings.redis_socket_timeout_s,
                                                  settings.redis_health_check_interval_s),
        },
        **connection.backend_options(settings.redis_socket_timeout_s, settings.redis_health_check_interval_s),
        # Requeue what a lost broker connection made Celery drop (see RedisRestoringConsumer).
        "worker_consumer": "worker.delivery.consumer:RedisRestoringConsumer",
        "task_soft_time_limit": settings.task_time_limit_s,
        "task_time_limit": settings.task_time_limit_s + 30,
        "result_expires": 24 * 3600,
        # Worker-side publishes (forwards, escalations, chunks, a chord's join) ride out a broker
        # outage of PUBLISH_RETRY_S; past it, the task's message is requeued (tasks.spam), not failed.
        "task_publish_retry": True,
        "task_publish_retry_policy": publish_policy,
        # Every result-backend command is retried for PUBLISH_RETRY_S at the connection
        # (worker.delivery.results), Celery's chord bookkeeping included; Celery's own retries around it
        # (storing a result, its `ensure`) add a try or two rather than multiplying that wait.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 2,
        "result_backend_transport_options": {"retry_policy": {"max_retries": 1, "interval_start": 0,
                                                              "interval_step": 0, "interval_max": 0},
                                             "connection_retries": publish_policy["max_retries"]},
        "result_extended": False,
        # Per-model queues: a fleet scales KoELECTRA and EXAONE workers separately.
        "task_default_queue": DEFAULT_QUEUE,
        "task_queues": worker_queues(settings),
        "task_routes": (route,),
        # Flower shows tasks from these events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": False,
        # Loading a model in a process-start hook takes longer than Celery's default 4 s.
        "worker_proc_alive_timeout": settings.load_timeout_s,
        "worker_hijack_root_logger": True,
    }
