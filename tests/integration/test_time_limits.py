"""TASK_TIME_LIMIT_S on the threads pool, which Celery itself does not enforce: a task past its
limit fails with a clear error, and the same process serves the next task."""

from __future__ import annotations

import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration


def test_a_threads_pool_task_over_its_limit_fails_and_the_next_succeeds(worker_factory, models):
    # One text per forward pass, so a long batch takes many seconds on the tiny model.
    env = models.env(PRELOAD_MODELS="exaone", BATCH_SIZE="1", TASK_TIME_LIMIT_S="1", BATCH_CHUNK_ITEMS="1000")
    worker = worker_factory(env, pool="threads", concurrency=4, name="limits")
    client = client_for(worker, timeout=60)
    wait_until_serving(worker, client)
    texts = [f"무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요 {i} " * 20 for i in range(1000)]
    start = time.monotonic()
    slow = client.submit_batch(texts, "exaone")
    with pytest.raises(SoftTimeLimitExceeded, match=r"ran past its time limit \(TASK_TIME_LIMIT_S\) waiting for "
                                                    r"exaone to score 1000 text\(s\)"):
        slow.get(timeout=60)
    assert time.monotonic() - start < 20
    result = client.classify("내일 회의는 3시입니다", "exaone", timeout=30)  # limit 1 s: the dropped texts were skipped
    assert result["model"] == "exaone" and 0.0 <= result["spam_score"] <= 1.0
    assert worker.process.poll() is None
    client.close()
