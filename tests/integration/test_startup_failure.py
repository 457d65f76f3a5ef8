"""A worker that cannot load its models exits non-zero with one clear line and consumes nothing."""

from __future__ import annotations

import shutil

import pytest
import redis

from producer.contract import CLASSIFY
from tests.integration.helpers import bare_app

pytestmark = pytest.mark.integration


def _queue_length(url: str) -> int:
    return redis.Redis.from_url(url).llen("celery")


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_missing_adapter_stops_the_worker_before_any_task(worker_factory, models, tmp_path, pool, redis_server):
    env = models.env(EXAONE_ADAPTER_DIR=str(tmp_path / "missing-adapter"))
    broker, _ = redis_server.fresh_pair()
    # Queue a task first, on the broker the worker will use.
    worker = worker_factory(env, pool=pool, name=f"broken-{pool}")
    bare_app(worker).send_task(CLASSIFY, args=["대기 중인 메시지"])
    code = worker.process.wait(timeout=180)
    log = worker.log()
    assert code == 1, log
    line = f"cannot load model 'exaone': adapter folder '{tmp_path / 'missing-adapter'}' does not exist"
    assert line in log
    assert "Traceback" not in log
    assert "Task spam.classify" not in log
    assert _queue_length(worker.broker_url) == 1, "the queued task must still be waiting"


def test_truncated_shard_stops_the_worker(worker_factory, models, tmp_path):
    base = tmp_path / "exaone"
    shutil.copytree(models.exaone, base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    worker = worker_factory(models.env(EXAONE_MODEL=str(base)), pool="prefork", name="truncated")
    assert worker.process.wait(timeout=180) == 1
    assert "cannot load model 'exaone': SafetensorError" in worker.log()


def test_bad_setting_names_the_variable(worker_factory, models):
    worker = worker_factory(models.env(TORCH_DTYPE="float8"), pool="solo", name="bad-setting")
    assert worker.process.wait(timeout=60) != 0
    expected = "worker: invalid setting TORCH_DTYPE: 'float8' is not one of auto, float32, bfloat16, float16"
    assert expected in worker.log()


def _corrupt_adapter(models, tmp_path):
    adapter = tmp_path / "corrupt-adapter"
    shutil.copytree(models.exaone_adapter, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 64)
    return {"EXAONE_ADAPTER_DIR": str(adapter)}, "cannot load model 'exaone': corrupt adapter weights"


@pytest.mark.parametrize(("case", "make"), [
    ("adapter-for-another-base", lambda m, t: ({"EXAONE_ADAPTER_DIR": str(m.koelectra_adapter)},
                                               "cannot load model 'exaone': adapter")),
    ("corrupt-adapter", _corrupt_adapter),
    ("missing-model", lambda m, t: ({"KOELECTRA_MODEL": str(t / "no-such-model")},
                                    "cannot load model 'koelectra': model")),
])
def test_each_broken_model_stops_a_prefork_worker_before_any_task(worker_factory, models, tmp_path, case, make):
    env, line = make(models, tmp_path)
    worker = worker_factory(models.env(**env), pool="prefork", name=case)
    bare_app(worker).send_task(CLASSIFY, args=["대기 중인 메시지"])
    code = worker.process.wait(timeout=180)
    log = worker.log()
    assert code == 1, log
    stop_lines = [x for x in log.splitlines() if "stopping the worker" in x]
    assert len(stop_lines) == 1 and line in stop_lines[0], log[-3000:]
    assert "Traceback" not in log and "Task spam.classify" not in log
    assert _queue_length(worker.broker_url) == 1, "the queued task must still be waiting"
