"""Dynamic batching in a threads-pool worker, the cascade inside one worker, and split batches.

The session's prefork worker (one forward pass per task, no cascade) gives the reference scores.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import start_worker
from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration

WORDS = [
    "무료 쿠폰 당첨! 지금 클릭", "내일 회의는 3시", "[광고] 최저가 할인 이벤트 진행중", "엄마 저녁 같이 먹어요",
    "Congratulations you won a free prize", "대출 한도 조회 무료", "택배가 도착했습니다 링크 확인", "ㅋㅋㅋ 알겠어",
]
TEXTS = [f"{word} {i}" for i, word in enumerate(WORDS * 3)]


@pytest.fixture(scope="module")
def reference(served):
    """KoELECTRA and EXAONE scores of TEXTS from the prefork worker, one task per text."""
    _, client = served
    return {m: [client.classify(t, m)["spam_score"] for t in TEXTS] for m in ("koelectra", "exaone")}


@pytest.fixture(scope="module")
def band(reference):
    """A cascade band over the upper half of TEXTS' KoELECTRA scores. The tiny model's scores lie
    within about 1e-5 of each other, so the test checks each decision against the worker's own score."""
    ranked = sorted(reference["koelectra"])
    return ranked[len(ranked) // 2]


@pytest.fixture(scope="module")
def threads_worker(redis_server, models, band, tmp_path_factory):
    broker, backend = redis_server.fresh_pair()
    env = models.env(CASCADE_BAND=f"{band},1", BATCH_CHUNK_ITEMS="4", BATCH_WAIT_MS="20")
    worker = start_worker(env, broker, backend, tmp_path_factory.mktemp("workers") / "threads.log", "threads", 8)
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)
    yield worker, client
    client.close()
    worker.stop()


def test_concurrent_tasks_share_forward_passes_and_keep_their_scores(threads_worker, reference):
    worker, client = threads_worker
    handles = {m: [client.submit(t, m) for t in TEXTS] for m in ("koelectra", "exaone")}
    for model, expected in reference.items():
        got = [h.get(timeout=120) for h in handles[model]]
        assert [r["model"] for r in got] == [model] * len(TEXTS)
        assert [r["spam_score"] for r in got] == pytest.approx(expected, abs=1e-5)
    assert "dynamic batching on" in worker.log()
    deadline = time.monotonic() + 10
    while True:  # the figures are published every half second
        stats = next(iter((client.app.control.inspect(timeout=2).stats() or {}).values()), {})
        sizes = [v for k, v in stats.items() if k.endswith(".forward_batch_max")]
        if sizes and max(sizes) > 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sizes and max(sizes) > 1, stats


def test_cascade_in_one_worker_escalates_only_the_uncertain(threads_worker, reference, band):
    _, client = threads_worker
    handles = [client.submit(t) for t in TEXTS]
    escalated = 0
    for i, handle in enumerate(handles):
        result = handle.get(timeout=120)
        if result["escalated"]:
            escalated += 1
            assert result["model"] == "exaone" and result["koelectra_score"] >= band
            assert len(result["koelectra_version"]) == 12 and result["koelectra_version"] != result["model_version"]
            assert result["precision"] == result["koelectra_precision"] == "float32"
            assert result["koelectra_score"] == pytest.approx(reference["koelectra"][i], abs=1e-5)
            assert result["spam_score"] == pytest.approx(reference["exaone"][i], abs=1e-5)
        else:
            assert result["model"] == "koelectra" and "koelectra_score" not in result
            assert "koelectra_version" not in result
            assert result["spam_score"] < band
            assert result["spam_score"] == pytest.approx(reference["koelectra"][i], abs=1e-5)
    assert 0 < escalated < len(TEXTS), "the band splits the texts"
    batch = client.submit_batch(TEXTS).get(timeout=120)  # split into chunks of 4, cascaded per item
    for result in batch:
        first = result["koelectra_score"] if result["escalated"] else result["spam_score"]
        assert result["model"] == ("exaone" if first >= band else "koelectra")
    assert sum(r["escalated"] for r in batch) == pytest.approx(escalated, abs=1)


def test_large_batch_is_split_into_chunks_and_joined_in_input_order(threads_worker, reference):
    worker, client = threads_worker
    texts = list(TEXTS[:10])
    texts[6] = ""
    batch = client.submit_batch(texts, "koelectra").get(timeout=120)
    assert batch[6] == {"error": "text is empty", "index": 6}
    kept = [i for i in range(10) if i != 6]
    assert [batch[i]["spam_score"] for i in kept] == pytest.approx([reference["koelectra"][i] for i in kept], abs=1e-5)
    assert worker.log().count("Task spam.classify_chunk[") >= 3 * 2  # three chunks, received and succeeded


def test_the_null_model_worker_of_the_throughput_bench_serves(worker_factory, models):
    """bench/throughput.py mode (e): the real worker with a scorer that does no model work."""
    worker = worker_factory(models.env(), pool="threads", concurrency=4, name="null", app="bench.null_model")
    client = client_for(worker)
    result = wait_until_serving(worker, client)
    assert result["spam_score"] == 0.5 and result["model_version"] == "null"
    client.close()
