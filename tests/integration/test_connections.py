"""A Redis that stops answering without closing its connections (a frozen host, a failover behind a NAT:
here a real redis-server paused with SIGSTOP) fails a publish and a result read within the socket timeout,
instead of blocking them for minutes; once it answers again the same app goes on."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from producer.client import make_app
from producer.contract import CLASSIFY, DEFAULT_QUEUE
from producer.settings import ProducerSettings
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
BOUND_S = 30.0
"""A publish takes about 5.6 s here (Celery's publish retries, each waiting out the socket timeout: the
paused server's kernel still accepts connections), a result read 1 s; without the timeouts both block
until Redis answers again (the result backend: up to Celery's 120 s default per command)."""


def _timed(caller: ThreadPoolExecutor, call) -> tuple[float | None, BaseException | None]:
    """Run ``call`` on ``caller``'s thread; (seconds it took, what it raised), or (None, None) while it
    still blocks after ``BOUND_S``. One thread for every call: Celery keeps a result backend per thread,
    and that thread's was connected before Redis was paused."""
    def timed() -> tuple[float, BaseException | None]:
        start = time.monotonic()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return time.monotonic() - start, exc
        return time.monotonic() - start, None

    try:
        return caller.submit(timed).result(timeout=BOUND_S)
    except FutureTimeout:
        return None, None


def test_a_paused_redis_fails_a_publish_and_a_result_read_within_the_socket_timeout(tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    app = make_app(ProducerSettings(redis.url(0), redis.url(1), redis_socket_timeout_s=TIMEOUT_S))
    caller = ThreadPoolExecutor(1)
    try:
        first = caller.submit(app.send_task, CLASSIFY, args=["연결 확인"]).result()  # connections are open
        assert caller.submit(lambda: first.state).result() == "PENDING"
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            publish_s, publish_error = _timed(caller, lambda: app.send_task(CLASSIFY, args=["멈춘 서버"]))
            read_s, read_error = _timed(caller, lambda: app.AsyncResult(first.id).state)
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        assert publish_s is not None, f"a publish to a paused Redis still blocks after {BOUND_S:g} s"
        assert read_s is not None, f"a result read from a paused Redis still blocks after {BOUND_S:g} s"
        assert publish_error is not None and read_error is not None
        assert "timeout" in f"{type(publish_error).__name__} {publish_error}".lower(), repr(publish_error)
        assert "timeout" in f"{type(read_error).__name__} {read_error}".lower(), repr(read_error)
        print(f"\npaused Redis, socket timeout {TIMEOUT_S:g} s: publish failed after {publish_s:.1f} s "
              f"({type(publish_error).__name__}), result read after {read_s:.1f} s ({type(read_error).__name__})")

        again = caller.submit(app.send_task, CLASSIFY, args=["다시 연결"]).result(timeout=BOUND_S)
        assert caller.submit(lambda: again.state).result(timeout=BOUND_S) == "PENDING"  # reconnected
        queued = redis.client.lrange(DEFAULT_QUEUE, 0, -1)
        assert any(again.id.encode() in message for message in queued)
        for handle in (first, again):  # stop listening while Redis is there (else __del__ retries later)
            caller.submit(handle.forget).result(timeout=BOUND_S)
    finally:
        caller.shutdown(wait=False)
        app.close()
        redis.stop()
