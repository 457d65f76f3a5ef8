"""Faults against real processes: no submitted task is lost, each reaches exactly one final state."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration


def test_child_killed_during_a_task_is_redelivered(worker_factory, models):
    worker = worker_factory(models.env(), pool="prefork", concurrency=2, name="kill-child")
    client = client_for(worker, timeout=180)
    wait_until_serving(worker, client)
    texts = [f"무료 쿠폰 당첨 {i}! 지금 바로 링크를 클릭하세요 " * 3 for i in range(600)]
    batch = client.submit_batch(texts, "exaone")
    singles = [client.submit(f"내일 회의 {i}", "koelectra") for i in range(20)]

    deadline = time.monotonic() + 60
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "the batch task never showed as active"
        for tasks in (client.app.control.inspect(timeout=1).active() or {}).values():
            victim = next((t["worker_pid"] for t in tasks if t["id"] == batch.id), None)
    os.kill(victim, signal.SIGKILL)

    results = batch.get(timeout=180)
    assert len(results) == len(texts) and all(r["model"] == "exaone" for r in results)
    assert [s.get(timeout=60)["model"] for s in singles] == ["koelectra"] * 20
    assert batch.state == "SUCCESS"
    log = worker.log()
    assert len(re.findall(rf"Task spam.classify_batch\[{batch.id}\] received", log)) == 2, "redelivered once"
    assert len(re.findall(rf"Task spam.classify_batch\[{batch.id}\] succeeded", log)) == 1
    assert worker.process.poll() is None
    client.close()
