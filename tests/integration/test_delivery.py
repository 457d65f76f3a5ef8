"""Delivery on a fleet split by model: what reaches a worker is checked, and every task ends, also
when the worker its next step needs is not there. Real Redis, real workers (docs/operations.md,
"Delivery and failures"; the faults themselves are in test_faults.py)."""

from __future__ import annotations

import json
import re
import time

import pytest
import redis
from celery.exceptions import ChordError

from producer.contract import (
    CLASSIFY_BATCH,
    CLASSIFY_CHUNK,
    DEAD_LETTER_LIST,
    ESCALATE,
    ESCALATE_BATCH,
    JOIN_CHUNKS,
    InvalidInput,
    ModelUnavailable,
)
from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다",
         "엄마 오늘 저녁 같이 먹어요"]


@pytest.fixture(scope="module")
def gpu_only(redis_server, models, tmp_path_factory):
    """An EXAONE-only threads worker consuming only `spam.exaone`, as the GPU worker of
    docker-compose.yml: no worker serves the default queue."""
    from tests.conftest import start_worker

    broker, backend = redis_server.fresh_pair()
    env = models.env(PRELOAD_MODELS="exaone", BATCH_CHUNK_ITEMS="4", BATCH_WAIT_MS="200")
    worker = start_worker(env, broker, backend, tmp_path_factory.mktemp("workers") / "gpu-only.log", "threads", 8,
                          ("--queues=spam.exaone",))
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client, handle=client.submit("준비 확인", "exaone"))
    yield worker, client
    client.close()
    worker.stop()


def test_a_split_batch_returns_on_a_gpu_only_fleet_and_its_chunks_results_are_deleted(gpu_only):
    worker, client = gpu_only
    texts = [f"{TEXTS[i % 3]} {i}" for i in range(10)]
    texts[6] = "   "
    batch = client.submit_batch(texts, "exaone")
    results = batch.get(timeout=120)
    assert results[6] == {"error": "text is empty", "index": 6}
    alone = [client.classify(t, "exaone") for t in texts[:6] + texts[7:]]
    assert [r["spam_score"] for r in results[:6] + results[7:]] == pytest.approx([r["spam_score"] for r in alone],
                                                                                  abs=1e-5)
    deadline = time.monotonic() + 15  # a result is stored before its `succeeded` line is written
    while True:
        log = worker.log()
        chunks = re.findall(r"Task spam\.classify_chunk\[([0-9a-f-]{36})\] succeeded", log)
        joined = f"Task spam.join_chunks[{batch.id}] succeeded" in log
        if len(chunks) == 3 and joined or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(chunks) == 3 and joined
    backend = redis.Redis.from_url(worker.backend_url)
    assert [c for c in chunks if backend.exists(f"celery-task-meta-{c}")] == [], "chunk results deleted once joined"
    assert backend.exists(f"celery-task-meta-{batch.id}")


@pytest.mark.parametrize(("task", "args", "message"), [
    (ESCALATE, ["텍스트", 1.5], "koelectra_score must be a number from 0 to 1"),
    (ESCALATE, ["텍스트", 0.5, 7], "koelectra_version must be a string"),
    (ESCALATE_BATCH, [[None], [[3, "텍스트", 0.5, ""]], 0], "index 3 does not name an open slot"),
    (ESCALATE_BATCH, [[None], [[0, "텍스트", 0.5, ""]], -1], "offset must be a whole number"),
    (ESCALATE_BATCH, ["results", [[0, "텍스트", 0.5]], 0], "results must be a list"),
    (CLASSIFY_CHUNK, ["텍스트", "exaone", 0], "texts must be a list of strings"),
    (CLASSIFY_CHUNK, [["텍스트"], "gpt", 0], "model must be one of"),
    (JOIN_CHUNKS, [[["not a result"]]], "a chunk must hold result objects"),
])
def test_every_internal_task_checks_its_arguments(gpu_only, task, args, message):
    _, client = gpu_only
    with pytest.raises(InvalidInput, match=message):
        client.app.send_task(task, args=args, queue="spam.exaone").get(timeout=60)


def test_an_invalid_escalation_fails_alone(gpu_only):
    """Eight escalations at once on the batching worker (200 ms to gather a forward pass), one with
    a text that is not a string: that one fails with InvalidInput, the seven others are scored."""
    _, client = gpu_only
    texts = [f"{TEXTS[i % 3]} {i}" for i in range(7)]
    handles = [client.app.send_task(ESCALATE, args=[t, 0.5, "k"], queue="spam.exaone") for t in texts[:3]]
    bad = client.app.send_task(ESCALATE, args=[12345, 0.5, "k"], queue="spam.exaone")
    handles += [client.app.send_task(ESCALATE, args=[t, 0.5, "k"], queue="spam.exaone") for t in texts[3:]]
    with pytest.raises(InvalidInput, match="text must be a string, not int"):
        bad.get(timeout=60)
    results = [h.get(timeout=60) for h in handles]
    assert [(r["model"], r["escalated"], r["koelectra_score"]) for r in results] == [("exaone", True, 0.5)] * 7
    assert [r["spam_score"] for r in results] == pytest.approx(
        [client.classify(t, "exaone")["spam_score"] for t in texts], abs=1e-5)


def test_escalations_nobody_takes_expire_and_oversized_messages_are_refused(worker_factory, models):
    """A KoELECTRA-only worker escalating every `auto` message, and no EXAONE worker: the caller
    hears ModelUnavailable once ESCALATION_TIMEOUT_S has passed, a split batch fails as a whole, and
    nothing waits in `spam.exaone`. A message over MAX_MESSAGE_BYTES is refused before decoding.
    Each is dead-lettered; the worker goes on serving."""
    worker = worker_factory(models.env(PRELOAD_MODELS="koelectra", CASCADE_BAND="0,1", BATCH_CHUNK_ITEMS="4",
                                       ESCALATION_TIMEOUT_S="2", MAX_MESSAGE_BYTES="20000"),
                            pool="prefork", concurrency=2, name="no-exaone")
    client = client_for(worker, timeout=60)
    wait_until_serving(worker, client, handle=client.submit("준비 확인", "koelectra"))
    single = client.submit(TEXTS[1])
    batch = client.submit_batch([f"{TEXTS[i % 3]} {i}" for i in range(6)])
    with pytest.raises(ModelUnavailable, match=rf"no worker took task {single.id} \(spam.escalate\) from spam.exaone "
                                               r"before it expired \(ESCALATION_TIMEOUT_S\)"):
        single.get(timeout=30)
    with pytest.raises(ChordError, match="ModelUnavailable"):
        batch.get(timeout=30)

    big = client.app.send_task(CLASSIFY_BATCH, args=[["무료 쿠폰 당첨 " * 300] * 2], queue="spam.koelectra")
    with pytest.raises(InvalidInput, match=r"the task message is \d+ bytes; the limit is 20000 \(MAX_MESSAGE_BYTES\)"):
        big.get(timeout=30)
    assert client.classify(TEXTS[1], "koelectra")["model"] == "koelectra"

    broker = redis.Redis.from_url(worker.broker_url)
    assert broker.llen("spam.exaone") == 0
    records = [json.loads(r) for r in broker.lrange(DEAD_LETTER_LIST, 0, -1)]
    by_task = {r["task_id"]: r for r in records}
    assert by_task[single.id]["task"] == "spam.escalate" and by_task[single.id]["message"]["body"]
    assert by_task[big.id]["message"] is None and by_task[big.id]["body_bytes"] > 20000
    assert sum(r["task"] == ESCALATE_BATCH for r in records) == 2, "the batch's two chunks escalated, and expired"
    client.close()
