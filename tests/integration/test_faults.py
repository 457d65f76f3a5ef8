"""Faults against real processes: no submitted task is lost, each reaches exactly one final state.

Every test catches the tasks it needs in the state it needs by construction: the workers run
:mod:`tests.integration.fault_app`, where a task holding a marked text waits at a gate the test
opens (or kills its own process), so a kill, a Redis restart or a connection loss never races a
task that finished early on a fast machine or started late on a busy one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import redis

from producer.contract import CLASSIFY, DEAD_LETTER_LIST, TaskDeadLettered
from tests.integration.gates import FAULT_APP, Gates
from tests.integration.helpers import client_for, pool_children, wait_until_serving
from tests.redis_process import RedisProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
_EVENT = re.compile(r"Task (spam\.\w+)\[([0-9a-f-]{36})\] (received|succeeded|raised|ignored|reject)\b")
_FINAL = ("SUCCESS", "FAILURE", "REVOKED")
_SPAM = "무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요"


@pytest.fixture
def gates(tmp_path: Path) -> Gates:
    return Gates(tmp_path / "gates")


@pytest.fixture
def own_redis(tmp_path: Path):
    """A Redis of the test's own (append-only file, fsync always), to restart mid-stream."""
    server = RedisProcess(tmp_path / "redis-aof", durable=True).start()
    yield server
    server.stop()


def _counts(*logs: str) -> dict[str, Counter]:
    """How often each task id was received, succeeded, raised, ignored or rejected, over the worker logs."""
    counts: dict[str, Counter] = {}
    for log in logs:
        for _, task_id, event in _EVENT.findall(log):
            counts.setdefault(event, Counter())[task_id] += 1
    return counts


def _settle(handles, timeout: float) -> tuple[dict[str, str], dict[str, float]]:
    """Wait until every task has a final state (or ``timeout``): the states by task id, and when
    (``time.monotonic()``, to the poll's half second) each was first seen final."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    settled: dict[str, float] = {}
    while True:
        for handle in handles:
            if handle.id in settled:
                continue
            try:
                states[handle.id] = handle.state
            except redis.ConnectionError:  # the client's own connection, after a Redis restart
                states[handle.id] = "UNKNOWN"
            if states[handle.id] in _FINAL:
                settled[handle.id] = time.monotonic()
        if len(settled) == len(handles) or time.monotonic() > deadline:
            return states, settled
        time.sleep(0.5)


def _assert_exactly_once(handles, states: dict[str, str], *workers) -> tuple[str, ...]:
    """Every task SUCCESS, with one `succeeded` in the workers' logs; the logs read. A worker stores a
    result before it writes that line, and a busy machine can hold it back between the two: the
    logs are read again until each task has its line, for up to 15 s."""
    failed = {i: s for i, s in states.items() if s != "SUCCESS"}
    deadline = time.monotonic() + 15
    while True:
        logs = tuple(worker.log() for worker in workers)
        counts = _counts(*logs)
        if failed or all(counts.get("succeeded", {}).get(h.id) for h in handles) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not failed, (failed, [line for log in logs for line in log.splitlines() if any(i in line for i in failed)])
    assert len(states) == len(handles)
    not_once = {h.id: counts.get("succeeded", {}).get(h.id, 0) for h in handles
                if counts.get("succeeded", {}).get(h.id, 0) != 1}
    assert not not_once, f"task ids not run to success exactly once (id: times): {not_once}"
    assert not counts.get("raised"), counts.get("raised")
    return logs


def _assert_nothing_left(client: redis.Redis, queues: tuple[str, ...] = ("celery", "spam.koelectra", "spam.exaone")):
    """No message waits in a queue or in kombu's ``unacked`` hash, where it would run again later."""
    deadline = time.monotonic() + 10  # the last acks follow the last results
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.hkeys("unacked") == []
    assert {q: client.llen(q) for q in queues} == dict.fromkeys(queues, 0)


def _restart(server: RedisProcess, down_s: float, during=lambda: None) -> float:
    """Stop Redis as an operator would (writes paused first, so no command is applied with its reply
    lost: see docs/fault-figures.md), call ``during`` while it is down, start it again after
    ``down_s``; how long it was down."""
    server.client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    stopped = time.monotonic()
    server.shutdown()
    during()
    time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))
    server.start()
    return time.monotonic() - stopped


# --- A pool child killed --------------------------------------------------------------------------


def test_child_killed_during_a_task_is_redelivered(worker_factory, models, gates):
    # One batch task (not split into a chord of chunks), held running at a gate when its child is killed.
    worker = worker_factory({**models.env(BATCH_CHUNK_ITEMS="1000"), **gates.env}, pool="prefork", concurrency=2,
                            name="kill-child", app=FAULT_APP)
    client = client_for(worker, timeout=180)
    wait_until_serving(worker, client)
    texts = [f"HOLD:batch {_SPAM}"] + [f"{_SPAM} {i} " * 3 for i in range(1, 600)]
    batch = client.submit_batch(texts, "exaone")
    singles = [client.submit(f"내일 회의 {i}", "koelectra") for i in range(20)]

    (victim,) = gates.held("batch", workers=[worker]).values()
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    gates.open("batch")

    results = batch.get(timeout=180)
    recovered = time.monotonic() - killed
    assert len(results) == len(texts) and all(r["model"] == "exaone" for r in results)
    assert [s.get(timeout=60)["model"] for s in singles] == ["koelectra"] * 20
    (log,) = _assert_exactly_once([batch, *singles], _settle([batch, *singles], 10)[0], worker)
    assert len(re.findall(rf"Task spam.classify_batch\[{batch.id}\] received", log)) == 2, "redelivered once"
    assert worker.process.poll() is None
    print(f"\nkill -9 child: 1 batch of {len(texts)} + 20 singles, all SUCCESS once; batch result {recovered:.1f}s "
          "after the kill")
    client.close()


def test_poison_message_is_dead_lettered_while_the_worker_serves(worker_factory, models, gates, own_redis):
    """A message that kills the process running it, every time, is given up after MAX_TASK_ATTEMPTS
    deliveries: its caller gets TaskDeadLettered, `producer stats` lists it, and the tasks around it
    are served. A task whose process died after it stored its result, and whose caller already read
    and deleted that result, is not run again when its message comes back."""
    env = {**models.env(MAX_TASK_ATTEMPTS="2"), **gates.env}
    worker = worker_factory(env, pool="prefork", concurrency=2, name="poison", app=FAULT_APP,
                            urls=(own_redis.url(0), own_redis.url(1)))
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)

    sent = time.monotonic()
    poison = client.submit(f"POISON {_SPAM}", "koelectra")
    others = [client.submit(f"내일 회의는 {i}시입니다", "koelectra") for i in range(30)]
    with pytest.raises(TaskDeadLettered, match=rf"task {poison.id} was delivered 3 times and never finished"):
        poison.get(timeout=120)
    given_up = time.monotonic() - sent
    assert [h.get(timeout=60)["model"] for h in others] == ["koelectra"] * 30
    log = worker.log()
    assert log.count(f"Task spam.classify[{poison.id}] received") == 2, "run twice, then given up on delivery"
    assert f"task {poison.id} (spam.classify) delivered again, attempt 2 of at most 2" in log
    assert f"dead-lettered task {poison.id} (spam.classify)" in log
    stats = subprocess.run([sys.executable, "-m", "producer", "stats"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "CELERY_BROKER_URL": worker.broker_url,
                                            "CELERY_RESULT_BACKEND": worker.backend_url})
    assert stats.returncode == 0, stats.stderr
    assert f"dead-lettered messages: 1 in the Redis list {DEAD_LETTER_LIST}" in stats.stdout
    assert poison.id in stats.stdout and "MAX_TASK_ATTEMPTS=2" in stats.stdout

    # Lost after success: the result is stored, the caller reads and forgets it, then the process dies.
    done = client.submit("DIE-AFTER:done 내일 회의는 3시입니다", "koelectra")
    gates.held("done", workers=[worker])
    first = done.get(timeout=30)
    done.forget()
    gates.open("done")
    deadline = time.monotonic() + 60
    while f"task {done.id} (spam.classify) delivered again but already succeeded" not in worker.log():
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    counts = _counts(worker.log())  # the second delivery is acknowledged before Celery sees it
    assert (counts["succeeded"][done.id], counts["received"][done.id]) == (1, 1)
    assert first["model"] == "koelectra" and done.state == "PENDING", "forgotten, and not stored again"
    _assert_nothing_left(own_redis.client)
    assert worker.process.poll() is None
    print(f"\npoison: dead-lettered after 2 deliveries, its caller told {given_up:.1f}s after sending; 30 others "
          "served; a task lost after success ran once")
    client.close()


def test_poison_message_that_kills_a_threads_worker_is_dead_lettered_by_the_next(worker_factory, models, gates):
    """On the threads pool a poison message kills the whole worker; its message comes back a
    visibility timeout later to whichever worker runs then, which counts the delivery and, past
    MAX_TASK_ATTEMPTS, gives up on it instead of dying too."""
    env = {**models.env(MAX_TASK_ATTEMPTS="1", TASK_TIME_LIMIT_S="1", VISIBILITY_TIMEOUT_S="32",
                        PRELOAD_MODELS="koelectra"), **gates.env}
    first = worker_factory(env, pool="threads", concurrency=2, name="poison-threads", app=FAULT_APP)
    client = client_for(first, timeout=120)
    wait_until_serving(first, client, handle=client.submit("준비 확인", "koelectra"))
    sent = time.monotonic()
    poison = client.submit(f"POISON {_SPAM}", "koelectra")
    assert first.process.wait(timeout=60) == -signal.SIGKILL, "the poison kills the whole threads worker"
    second = worker_factory(env, pool="threads", concurrency=2, name="poison-threads-next", app=FAULT_APP,
                            urls=(first.broker_url, first.backend_url))
    with pytest.raises(TaskDeadLettered, match=rf"task {poison.id} was delivered 2 times and never finished"):
        poison.get(timeout=120)
    given_up = time.monotonic() - sent
    assert f"dead-lettered task {poison.id} (spam.classify)" in second.log()
    assert client.classify("내일 회의는 3시입니다", "koelectra")["model"] == "koelectra"
    assert second.process.poll() is None
    _assert_nothing_left(redis.Redis.from_url(first.broker_url))
    print(f"\npoison, threads: the first worker killed, the message dead-lettered by the next {given_up:.1f}s after "
          "sending (VISIBILITY_TIMEOUT_S=32)")
    client.close()


# --- Redis restarts -------------------------------------------------------------------------------


def test_split_fleet_rides_out_redis_restarts_of_5_and_30_s(worker_factory, models, own_redis, gates):
    """A KoELECTRA-only worker escalating every `auto` message and an EXAONE-only worker (as in
    docker-compose.yml), a stream of singles and batches, through two Redis restarts (5 s, then 30 s
    down) with countdown tasks held by the worker. At each, the tasks held at a gate are let go while
    Redis is down, so they publish then: an escalation, the chunks of an `auto` batch (which escalate
    in turn), the chunks of an EXAONE batch and their joins; and a chunk that stored its result
    records its part of the chord then. The EXAONE worker retries for the default PUBLISH_RETRY_S
    (60 s) and gets through both; the KoELECTRA worker's 10 s get it through the first, and past
    them at the second its tasks' messages go back to their queue and run again. Each task ends
    SUCCESS, exactly once."""
    urls = (own_redis.url(0), own_redis.url(1))
    ko = worker_factory({**models.env(PRELOAD_MODELS="koelectra", CASCADE_BAND="0,1", BATCH_CHUNK_ITEMS="4",
                                      PUBLISH_RETRY_S="10"), **gates.env},
                        pool="prefork", concurrency=2, name="ko-restart", urls=urls, app=FAULT_APP)
    ex = worker_factory({**models.env(PRELOAD_MODELS="exaone", BATCH_CHUNK_ITEMS="4"), **gates.env},
                        pool="threads", concurrency=4, name="ex-restart", urls=urls, app=FAULT_APP,
                        args=("--queues=spam.exaone",))  # as the GPU worker of docker-compose.yml
    client = client_for(ko, timeout=240)
    for worker, model in ((ko, "koelectra"), (ex, "exaone")):  # each waits in its queue until loaded
        wait_until_serving(worker, client, handle=client.submit("준비 확인", model))

    handles: list = []
    pause = threading.Lock()
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            with pause:
                if i % 10 == 3:
                    handles.append(client.submit_batch([f"{_SPAM} {i}.{j}" for j in range(10)], "exaone"))
                elif i % 10 == 7:
                    handles.append(client.submit_batch([f"내일 회의 {i}.{j}" for j in range(10)]))
                else:
                    handles.append(client.submit(f"엄마 오늘 저녁 {i}"))
            i += 1
            time.sleep(0.1)

    producer = threading.Thread(target=stream)
    producer.start()
    outages, recovered = [], []
    for gate, down_s in (("r5", 5.0), ("r30", 30.0)):
        time.sleep(3)
        with pause:
            # Two countdown tasks the KoELECTRA worker holds through the outage (taken before its
            # processes fill up), then a running task of each kind, held at the gate.
            held = [client.app.send_task(CLASSIFY, args=[f"예약 {gate} {j}"], countdown=8) for j in range(2)]
            deadline = time.monotonic() + 30
            while not all(f"[{h.id}] received" in ko.log() for h in held):
                assert time.monotonic() < deadline, "the worker did not receive the countdown tasks"
                time.sleep(0.05)
            held += [client.submit(f"HOLD:{gate} 엄마 오늘 저녁"),
                     client.submit_batch([f"HOLD:{gate} 내일 회의"] + [f"내일 회의 {j}" for j in range(9)]),
                     client.submit_batch([f"HOLD:{gate} {_SPAM}"] + [f"{_SPAM} {j}" for j in range(9)], "exaone"),
                     client.submit_batch([f"HOLD-PART:{gate} {_SPAM}"] + [f"{_SPAM} {j}" for j in range(9)],
                                         "exaone")]
            handles.extend(held)
            gates.held(gate, count=4, workers=[ko, ex])
            outages.append(_restart(own_redis, down_s, during=lambda gate=gate: gates.open(gate)))
            back = time.monotonic()
        _, settled_at = _settle(held, timeout=240)
        recovered.append(max(settled_at.values(), default=float("nan")) - back)
    time.sleep(3)
    stop.set()
    producer.join()

    states, _ = _settle(handles, timeout=240)
    logs = _assert_exactly_once(handles, states, ko, ex)
    results = {h.id: h.get(timeout=5) for h in handles}
    singles = [r for r in results.values() if isinstance(r, dict)]
    assert [r for r in singles if r["model"] != "exaone" or not r["escalated"]] == []
    for result in results.values():
        if isinstance(result, list):
            assert len(result) == 10 and all(r["model"] == "exaone" for r in result), result
    requeued = _counts(*logs).get("reject", Counter())
    assert requeued, "past PUBLISH_RETRY_S the KoELECTRA worker requeued its tasks' messages"
    _assert_nothing_left(own_redis.client)
    assert ko.process.poll() is None and ex.process.poll() is None
    print(f"\nsplit fleet: {len(handles)} tasks ({len(singles)} escalated singles), all SUCCESS once; Redis down "
          f"{outages[0]:.1f}s and {outages[1]:.1f}s; the tasks let go during each outage final "
          f"{recovered[0]:.1f}s and {recovered[1]:.1f}s after Redis was back; messages requeued past "
          f"PUBLISH_RETRY_S: {sum(requeued.values())}; requeued at reconnection: "
          f"{sum(log.count('requeued task ') for log in logs)}")
    client.close()


# --- What a pool holds at a connection loss -------------------------------------------------------


def _node_stats(client) -> dict:
    return next(iter((client.app.control.inspect(timeout=2, limit=1).stats() or {}).values()), {})


def _listed(client, kind: str) -> set[str]:
    """Task ids the worker lists as ``reserved`` or ``scheduled``."""
    replies = getattr(client.app.control.inspect(timeout=1, limit=1), kind)() or {}
    return {(t.get("request") or t)["id"] for tasks in replies.values() for t in tasks}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_requests_a_pool_holds_run_once_across_a_connection_loss(worker_factory, models, own_redis, gates, pool):
    """At a broker connection loss Celery forgets the requests it had not started. One the pool
    already holds runs anyway (prefork: written to a child that has not taken it yet; threads:
    queued in the executor) and must not be requeued too; one it does not hold (prefork: in the
    unsent buffer; both: waiting for its countdown) must be requeued. Each runs once. A prefetch
    of two per process lets the worker take more messages than it runs; with one, these states
    last only microseconds, but they exist all the same."""
    worker = worker_factory({**models.env(), **gates.env}, pool=pool, concurrency=2, name=f"holds-{pool}",
                            urls=(own_redis.url(0), own_redis.url(1)), app=FAULT_APP,
                            args=("--prefetch-multiplier=2",))
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)
    send = client.app.send_task
    busy = [client.submit(f"HOLD:busy 회의 {i}", "koelectra") for i in range(1 if pool == "prefork" else 2)]
    pids = set(gates.held("busy", count=len(busy), workers=[worker]).values())
    stopped = None
    if pool == "prefork":  # the idle child is stopped: a job written to it waits in its pipe, not taken
        stopped = next(p for p in pool_children(worker) if p.pid not in pids)
        stopped.send_signal(signal.SIGSTOP)
        writes = _node_stats(client)["pool"]["writes"]["total"]
        in_child = send(CLASSIFY, args=["파이프 안"], kwargs={"model": "koelectra"})
        deadline = time.monotonic() + 30
        while _node_stats(client)["pool"]["writes"]["total"] == writes:
            assert time.monotonic() < deadline, "the job was never written to the stopped child"
            time.sleep(0.1)
    handed = send(CLASSIFY, args=["대기열"], kwargs={"model": "koelectra"})  # no free process: handed to the pool
    waiting = send(CLASSIFY, args=["예약"], kwargs={"model": "koelectra"}, countdown=15)  # held for its ETA
    deadline = time.monotonic() + 10  # well inside the countdown: `waiting` is still held at the restart
    while (reserved := _listed(client, "reserved")) is not None:
        scheduled = _listed(client, "scheduled")
        if handed.id in reserved and waiting.id in scheduled:
            break
        assert time.monotonic() < deadline, (reserved, scheduled, worker.log()[-3000:])
        time.sleep(0.2)

    down = _restart(own_redis, 0.5)
    if stopped is not None:
        stopped.send_signal(signal.SIGCONT)
    gates.open("busy")
    runs_anyway = [handed] if pool == "threads" else [in_child]  # prefork: `handed` sits in the unsent buffer
    requeued = [waiting] if pool == "threads" else [handed, waiting]
    handles = [*busy, *runs_anyway, *requeued]
    states, _ = _settle(handles, timeout=90)
    (log,) = _assert_exactly_once(handles, states, worker)
    assert [h.id for h in runs_anyway if f"requeued task {h.id}" in log] == [], "held by the pool, and requeued too"
    assert [h.id for h in requeued if f"requeued task {h.id}" not in log] == []
    _assert_nothing_left(own_redis.client)
    assert worker.process.poll() is None
    print(f"\n{pool}: Redis down {down:.2f}s; {len(runs_anyway)} held by the pool ran once, not requeued; "
          f"{len(requeued)} requeued, ran once")
    client.close()


# --- The whole worker killed ----------------------------------------------------------------------


def _kill_worker(worker) -> list[int]:
    """kill -9 the worker's main process and all its children at once."""
    main = psutil.Process(worker.process.pid)
    victims = [main, *main.children(recursive=True)]
    for process in victims:
        process.send_signal(signal.SIGKILL)
    worker.process.wait(timeout=10)
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


def test_whole_worker_killed_and_replaced_loses_nothing(worker_factory, models, gates):
    """kill -9 the main process and children while tasks run and wait in the queue; a new worker on the
    same broker finishes them: queued ones at once, the unacknowledged ones after the visibility timeout."""
    # VISIBILITY_TIMEOUT_S must exceed TASK_TIME_LIMIT_S + 30; the restore sweep runs every second at
    # this visibility timeout (celeryconfig), so the dead worker's tasks return ~45 s after delivery.
    env = {**models.env(TASK_TIME_LIMIT_S="10", VISIBILITY_TIMEOUT_S="45", BATCH_CHUNK_ITEMS="1000"), **gates.env}
    first = worker_factory(env, pool="prefork", concurrency=2, name="killed", app=FAULT_APP)
    client = client_for(first, timeout=120)
    wait_until_serving(first, client)
    texts = [f"{_SPAM} {i} " * 10 for i in range(300)]
    running = [client.submit_batch([f"HOLD:running {i}", *texts[1:]], "exaone") for i in range(2)]
    gates.held("running", count=2, workers=[first])  # both children hold one: the rest stays queued
    queued = [client.submit(f"내일 회의는 {i}시입니다", "koelectra") for i in range(30)]
    _kill_worker(first)
    killed = time.monotonic()
    assert first.process.returncode == -signal.SIGKILL
    gates.open("running")

    second = worker_factory(env, pool="prefork", concurrency=2, name="replacement", app=FAULT_APP,
                            urls=(first.broker_url, first.backend_url))
    states, settled_at = _settle(running + queued, timeout=100)
    queued_done = max(settled_at.get(h.id, float("nan")) for h in queued) - killed
    recovered = max(settled_at.values()) - killed
    _assert_exactly_once(running + queued, states, first, second)
    for handle in running:
        assert [r["model"] for r in handle.get(timeout=5)] == ["exaone"] * len(texts)
        assert f"[{handle.id}] received" in second.log(), "the replacement ran the dead worker's task"
    _assert_nothing_left(redis.Redis.from_url(first.broker_url))
    print(f"\nkill -9 whole worker: 2 running batches + 30 queued, all SUCCESS once; last result {recovered:.1f}s "
          f"after the kill, the queued ones {queued_done:.1f}s after")
    client.close()
