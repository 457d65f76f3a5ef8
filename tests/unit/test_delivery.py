"""The delivery settings and helpers that need no Redis: publish retries, expiry, dead-letter lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from producer.stats_table import render_dead_letters
from worker.celeryconfig import celery_config, publish_retry_policy
from worker.delivery.admission import expired
from worker.delivery.results import backend_url
from worker.settings import Settings


@pytest.mark.parametrize("budget", [1.0, 30.0, 60.0, 300.0])
def test_the_publish_retries_wait_about_the_budget(budget):
    policy = publish_retry_policy(budget)
    waits = [min(policy["interval_start"] + policy["interval_step"] * n, policy["interval_max"])
             for n in range(policy["max_retries"])]
    assert budget <= sum(waits) < budget + 3.0


def test_worker_side_publishes_and_the_backend_use_the_publish_budget():
    from celery import Celery

    from worker.delivery.results import MarkingRedisBackend

    config = celery_config(Settings.from_env({"PUBLISH_RETRY_S": "30"}, dotenv=False))
    assert config["task_publish_retry"] is True
    assert config["task_publish_retry_policy"] == publish_retry_policy(30.0)
    app = Celery("t", set_as_current=False)
    app.conf.update(config)
    backend = MarkingRedisBackend(app=app, url="redis://127.0.0.1:1/1")  # never connects here
    retry = backend.client.connection_pool.connection_kwargs["retry"]
    waits = [retry._backoff.compute(n) for n in range(1, retry._retries + 1)]
    assert 30.0 <= sum(waits) < 36.0, waits


def test_message_size_limit_defaults_to_room_for_any_valid_batch():
    s = Settings.from_env({"MAX_BATCH_ITEMS": "10", "MAX_TEXT_CHARS": "100"}, dotenv=False)
    assert s.message_bytes_limit == 12 * 10 * 100 + (1 << 20)
    assert Settings.from_env({"MAX_MESSAGE_BYTES": "5000"}, dotenv=False).message_bytes_limit == 5000


def test_only_a_replaced_task_past_its_expiry_has_expired():
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    past, future = (now - timedelta(seconds=1)).isoformat(), (now + timedelta(seconds=1)).isoformat()
    assert expired({"expires": past, "replaced_task_nesting": 1}, now)
    assert not expired({"expires": future, "replaced_task_nesting": 1}, now)
    assert not expired({"expires": past, "replaced_task_nesting": 0}, now), "a client's own expiry is Celery's"
    assert not expired({"expires": None, "replaced_task_nesting": 2}, now)
    assert not expired({"expires": "soon", "replaced_task_nesting": 1}, now)
    assert expired({"expires": "2026-11-29T11:59:00", "replaced_task_nesting": 1}, now), "naive times are UTC"


def test_redis_results_go_through_the_marking_backend():
    assert backend_url("redis://:pw@host:6379/1") == "worker.delivery.results:MarkingRedisBackend+redis://:pw@host:6379/1"
    assert backend_url("rediss://host:6380/1?ssl_cert_reqs=required").startswith("worker.delivery.results:")
    assert backend_url("sentinel://h1:26379/1") == "sentinel://h1:26379/1"


def test_dead_letters_render_one_line_each_newest_first():
    records = [{"at": "2026-11-29T12:00:00+00:00", "task_id": "abc", "task": "spam.classify", "queue": "celery",
                "worker": "w1", "reason": "given up"}, {"reason": "(unreadable record)"}]
    assert render_dead_letters(0, []) == "dead-lettered messages: none (spam.dead_letter)"
    lines = render_dead_letters(12, records).splitlines()
    assert lines[0] == "dead-lettered messages: 12 in the Redis list spam.dead_letter, the newest 2:"
    assert lines[1] == "  2026-11-29T12:00:00+00:00  abc  spam.classify  from celery on w1: given up"
    assert lines[2].endswith("(unreadable record)")
