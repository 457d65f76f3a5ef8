"""Every pool preloads once per process, and separate worker starts give identical results."""

from __future__ import annotations

import re

import pytest

from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "택배가 도착했습니다"]


def _results(client) -> list[dict]:
    return [client.classify(t, m) for m in ("koelectra", "exaone") for t in TEXTS]


@pytest.fixture(scope="module")
def prefork_results(prefork_worker):
    client = client_for(prefork_worker)
    wait_until_serving(prefork_worker, client)
    yield _results(client)
    client.close()


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_pool_preloads_once_and_matches_another_worker_start(worker_factory, models, prefork_results, pool):
    worker = worker_factory(models.env(), pool=pool, concurrency=2, name=pool)
    client = client_for(worker)
    wait_until_serving(worker, client)
    # The same across separate worker starts (a first start serves its adapter unmerged until its
    # snapshot is built, which moves float32 scores in the last bits only).
    results = _results(client)
    assert [r["spam_score"] for r in results] == pytest.approx([r["spam_score"] for r in prefork_results], abs=1e-6)
    rest = [[{k: v for k, v in r.items() if k != "spam_score"} for r in rs] for rs in (results, prefork_results)]
    assert rest[0] == rest[1]
    client.close()
    log = worker.log()
    # Loaded in the main process, once per model, before the first task.
    assert len(re.findall(r"MainProcess\] loaded exaone", log)) == 1, log
    assert len(re.findall(r"loaded koelectra", log)) == 1, log
    assert log.index("exaone ready") < log.index("Task spam.classify")


def test_each_prefork_child_loads_each_model_once(prefork_worker, prefork_results):
    log = prefork_worker.log()
    loads = re.findall(r"(ForkPoolWorker-\d+)\] loaded (\w+)", log)
    # A load again is only the switch of a first start to the snapshot it built after serving.
    switches = re.findall(r"(ForkPoolWorker-\d+)\] (\w+) now serves from its snapshot", log)
    assert all(loads.count(pair) - switches.count(pair) == 1 for pair in set(loads)), "a model loaded twice"
    children = {child for child, _ in loads}
    assert len(children) == 2 and all((c, m) in loads for c in children for m in ("koelectra", "exaone"))
    assert "MainProcess] loaded" not in log  # the main process only imports the libraries
