"""The whole path against real processes: Redis -> preloaded Celery worker -> results in Redis."""

from __future__ import annotations

import math

import pytest

from producer.contract import CLASSIFY, CLASSIFY_BATCH, InvalidInput, ModelUnavailable
from tests.integration.helpers import bare_app, client_for, wait_until_serving

pytestmark = pytest.mark.integration

TEXTS = [
    "무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요",
    "내일 회의는 오후 3시에 시작합니다",
    "[광고] 최저가 할인 이벤트 진행중 " * 20,
    "엄마 오늘 저녁 같이 먹어요",
    "Congratulations you won a free prize",
]


def _check_result(result: dict, model: str, truncated: bool | None = False) -> None:
    assert set(result) == {"label", "spam_score", "model", "model_version", "precision", "escalated", "truncated"}
    assert result["precision"] == "float32"
    assert len(result["model_version"]) == 12
    assert result["escalated"] is False
    assert result["model"] == model
    assert 0.0 <= result["spam_score"] <= 1.0 and math.isfinite(result["spam_score"])
    assert result["label"] == ("spam" if result["spam_score"] >= 0.5 else "ham")
    if truncated is not None:
        assert result["truncated"] is truncated


def test_producer_client_classifies_with_each_model(served):
    _, client = served
    auto = client.classify(TEXTS[0])
    _check_result(auto, "koelectra")
    for model in ("koelectra", "exaone"):
        _check_result(client.classify(TEXTS[0], model=model), model)
    assert client.classify(TEXTS[0], model="koelectra") == auto


def test_bare_celery_client_needs_only_the_task_names(served):
    worker, client = served
    app = bare_app(worker)
    result = app.send_task(CLASSIFY, args=[TEXTS[1]], kwargs={"model": "exaone"}).get(timeout=60)
    _check_result(result, "exaone")
    assert result == client.classify(TEXTS[1], model="exaone")
    batch = app.send_task(CLASSIFY_BATCH, args=[TEXTS[:2]]).get(timeout=60)
    assert [r["model"] for r in batch] == ["koelectra", "koelectra"]


@pytest.mark.parametrize("model", ["koelectra", "exaone"])
def test_batch_keeps_input_order_and_matches_single_calls(served, model):
    _, client = served
    batch = client.submit_batch(TEXTS, model).get(timeout=60)
    singles = [client.classify(t, model) for t in TEXTS]
    assert len(batch) == len(TEXTS)
    for got, single in zip(batch, singles, strict=True):
        _check_result(got, model, truncated=None)
        assert got["label"] == single["label"] and got["truncated"] == single["truncated"]
        assert got["spam_score"] == pytest.approx(single["spam_score"], abs=1e-5)
    # The tiny models have 128- and 256-token windows: the repeated advert is cut, and says so.
    assert [r["truncated"] for r in batch] == [False, False, True, False, False]
    # Different texts get different scores: the order is the input order, not the sorted one.
    assert len({round(r["spam_score"], 9) for r in batch}) == len(TEXTS)


def test_classify_many_streams_results_in_order(served):
    _, client = served
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(23)]
    texts[17] = ""
    streamed = list(client.classify_many(texts, "koelectra", chunk_size=5, window=2))
    singles = client.submit_batch(texts, "koelectra").get(timeout=60)
    assert streamed[17] == singles[17] == {"error": "text is empty", "index": 17}  # not 2, its place in its chunk
    kept = [r["spam_score"] for i, r in enumerate(singles) if i != 17]
    assert [r["spam_score"] for i, r in enumerate(streamed) if i != 17] == pytest.approx(kept, abs=1e-6)


def test_bad_input_gets_a_clear_error_and_the_worker_stays_up(served):
    worker, client = served
    with pytest.raises(InvalidInput, match="text is empty"):
        client.classify("   ")
    with pytest.raises(InvalidInput, match="must be a string"):
        client.app.send_task(CLASSIFY, args=[42]).get(timeout=30)
    with pytest.raises(InvalidInput, match="model must be one of"):
        client.classify("hello", model="gpt")
    batch = client.submit_batch(["정상 메시지", "", None, "x" * 30_000]).get(timeout=30)
    assert "label" in batch[0]
    assert batch[1] == {"error": "text is empty", "index": 1}
    assert batch[2]["index"] == 2 and "must be a string" in batch[2]["error"]
    assert "limit is 20000" in batch[3]["error"]
    assert worker.process.poll() is None
    _check_result(client.classify(TEXTS[0]), "koelectra")


def test_a_worker_serving_a_queue_without_its_model_reports_it(worker_factory, models):
    # Misconfigured: told to serve spam.exaone without loading EXAONE. The task fails clearly
    # instead of being forwarded back to the queue it came from.
    worker = worker_factory(models.env(PRELOAD_MODELS="koelectra"), pool="solo", concurrency=1, name="ko-only",
                            args=("--queues=celery,spam.exaone",))
    client = client_for(worker)
    wait_until_serving(worker, client)
    with pytest.raises(ModelUnavailable, match="'exaone' is not loaded in this worker, which serves queue 'spam.exa"):
        client.classify("hello", model="exaone")
    client.close()
