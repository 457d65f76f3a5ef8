"""Per-model queues and the cascade across a fleet: a KoELECTRA-only and an EXAONE-only worker share
one broker, as CPU and GPU workers would."""

from __future__ import annotations

import re

import pytest

from producer.contract import CLASSIFY, CLASSIFY_BATCH
from tests.integration.helpers import bare_app, client_for, wait_until_serving

pytestmark = pytest.mark.integration

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다",
         "엄마 오늘 저녁 같이 먹어요"]


@pytest.fixture
def fleet(worker_factory, models):
    # Every KoELECTRA score escalates; chunks of 4 make a batch of 10 a chord of three tasks.
    ko = worker_factory(models.env(PRELOAD_MODELS="koelectra", CASCADE_BAND="0,1", BATCH_CHUNK_ITEMS="4"),
                        pool="prefork", concurrency=1, name="ko-fleet")
    ex = worker_factory(models.env(PRELOAD_MODELS="exaone", BATCH_CHUNK_ITEMS="4"), pool="prefork", concurrency=1,
                        name="ex-fleet", urls=(ko.broker_url, ko.backend_url))
    client = client_for(ko, timeout=120)
    for worker, model in ((ko, "koelectra"), (ex, "exaone")):  # each waits in its queue until loaded
        handle = client.submit("준비 확인", model)
        wait_until_serving(worker, client, handle=handle)
    yield ko, ex, client
    client.close()


def _received(worker, task_id: str) -> int:
    return len(re.findall(rf"Task spam\.\w+\[{task_id}\] received", worker.log()))


def test_each_model_runs_only_on_its_own_queue(fleet):
    ko, ex, client = fleet
    handles = {model: [client.submit(t, model) for t in TEXTS] for model in ("koelectra", "exaone")}
    for model, worker, other in (("koelectra", ko, ex), ("exaone", ex, ko)):
        for handle in handles[model]:
            assert handle.get(timeout=120)["model"] == model
            assert (_received(worker, handle.id), _received(other, handle.id)) == (1, 0)


def test_a_task_on_the_wrong_queue_is_forwarded_under_the_same_id(fleet):
    ko, ex, client = fleet
    app = bare_app(ko)  # knows no routes: sends where it is told
    wrong = app.send_task(CLASSIFY, args=[TEXTS[0], "exaone"], queue="spam.koelectra")
    default = app.send_task(CLASSIFY_BATCH, args=[TEXTS, "exaone"])  # the default queue, which both serve
    assert wrong.get(timeout=120) == client.classify(TEXTS[0], "exaone")
    assert (_received(ko, wrong.id), _received(ex, wrong.id)) == (1, 1)
    assert [r["model"] for r in default.get(timeout=120)] == ["exaone"] * len(TEXTS)


def test_cascade_escalates_from_a_koelectra_worker_to_the_exaone_queue(fleet):
    ko, ex, client = fleet
    app = bare_app(ko)
    result = app.send_task(CLASSIFY, args=[TEXTS[1]], queue="spam.koelectra").get(timeout=120)
    assert result["model"] == "exaone" and result["escalated"] is True
    first, final = client.classify(TEXTS[1], "koelectra"), client.classify(TEXTS[1], "exaone")
    assert result["koelectra_score"] == pytest.approx(first["spam_score"], abs=1e-6)
    assert result["spam_score"] == pytest.approx(final["spam_score"], abs=1e-6)
    versions = {"model_version": final["model_version"], "koelectra_version": first["model_version"]}
    assert {k: result[k] for k in versions} == versions and len(set(versions.values())) == 2
    assert result["precision"] == result["koelectra_precision"] == "float32"  # carried by spam.escalate

    texts = [f"{TEXTS[i % 3]} {i}" for i in range(10)]
    texts[6] = "   "
    batch = app.send_task(CLASSIFY_BATCH, args=[texts], queue="spam.koelectra").get(timeout=120)
    direct = client.submit_batch(texts, "exaone").get(timeout=120)
    assert batch[6] == direct[6] == {"error": "text is empty", "index": 6}
    for got, want in zip(batch[:6] + batch[7:], direct[:6] + direct[7:], strict=True):
        assert got["escalated"] is True and got["model"] == "exaone"
        assert got["spam_score"] == pytest.approx(want["spam_score"], abs=1e-5)
        assert {k: got[k] for k in versions} == versions
        assert got["koelectra_precision"] == "float32"  # carried by spam.escalate_batch
    assert "spam.classify_chunk" in ko.log() and "spam.escalate_batch" in ex.log()
