"""JSON only, clear errors for malformed calls, and credentials kept out of logs and stats."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
import redis
from kombu import Connection, Exchange, Producer

from producer.contract import CLASSIFY
from tests.conftest import free_port, start_worker
from tests.integration.helpers import bare_app, client_for, wait_until_serving

pytestmark = pytest.mark.integration


def test_a_pickled_message_is_refused_and_logged(served):
    worker, client = served
    task_id = str(uuid.uuid4())
    with Connection(worker.broker_url) as conn:
        Producer(conn).publish(
            ((["무료 쿠폰"], {}, {}),), exchange=Exchange("celery", type="direct"), routing_key="celery",
            serializer="pickle", headers={"task": CLASSIFY, "id": task_id, "lang": "py"},
        )
    deadline = time.monotonic() + 30
    while "Refusing to deserialize untrusted content of type pickle" not in worker.log():
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    assert f"Task {CLASSIFY}[{task_id}]" not in worker.log()  # never executed
    assert redis.Redis.from_url(worker.broker_url).llen("celery") == 0  # and not left to loop
    assert client.classify("여전히 동작합니다")["model"] == "koelectra"


def test_wrong_argument_count_is_a_clear_failure(served):
    worker, _ = served
    with pytest.raises(TypeError, match="positional argument"):
        bare_app(worker).send_task(CLASSIFY, args=["a", "koelectra", "extra"]).get(timeout=30)
    assert worker.process.poll() is None


def test_redis_password_works_and_never_shows(models, tmp_path):
    password = "pw-" + uuid.uuid4().hex
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--requirepass", password], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        url = f"redis://:{password}@127.0.0.1:{port}"
        worker = start_worker(models.env(PRELOAD_MODELS="koelectra"), f"{url}/0", f"{url}/1",
                              tmp_path / "auth.log", "solo", 1)
        try:
            client = client_for(worker)
            assert wait_until_serving(worker, client)["model"] == "koelectra"
            stats = client.app.control.inspect(timeout=2).stats()
            assert stats and password not in json.dumps(stats)
            client.close()
        finally:
            worker.stop()
        assert password not in worker.log()
        assert ":**@127.0.0.1" in worker.log()  # Celery masks it in its banner
    finally:
        server.terminate()
        server.wait(timeout=10)
