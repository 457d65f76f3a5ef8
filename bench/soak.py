"""Soak: thousands of tasks through a real prefork worker whose children are killed at random.

    python bench/soak.py                          # 2000 tasks, a child killed every 1-4 s
    python bench/soak.py --tasks 5000 --kill-every 0.5 3 --seed 7
    python bench/soak.py --redis-restarts 3       # and restart Redis (SHUTDOWN, start) 3 times

It builds the tiny test models (``tests/factories.py``) in a temporary folder, starts its own
``redis-server`` and a ``celery -A worker worker --pool=prefork`` on them, and sends a stream of
``spam.classify`` (KoELECTRA) and ``spam.classify_batch`` (EXAONE) tasks while a killer sends
SIGKILL to a random pool child at random intervals; with ``--redis-restarts`` Redis (append-only
file, fsync at every write) is also shut down and started again at random moments while tasks are
sent. When every task has a final state (or
``--timeout`` passed) it reports, per task id, from the result backend and the worker's log:

- submitted, completed (SUCCESS), failed (FAILURE), lost (no final state);
- redelivered: received more than once; ran twice: succeeded more than once;
- left in Redis: messages still in a queue or in kombu's ``unacked`` hash.

Progress goes to the log (stderr); the report table to stdout. The exit code is 1 when a task was
lost or failed, or ran twice, or a message was left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_process import RedisProcess  # noqa: E402

log = logging.getLogger("bench.soak")

PIECES = ["무료 쿠폰 당첨!", "지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시입니다", "엄마 저녁 같이 먹어요",
          "[광고] 최저가 할인 이벤트", "대출 한도 조회 무료", "택배가 도착했습니다", "고객님의 계좌가 정지되었습니다"]
FINAL = {"SUCCESS", "FAILURE", "REVOKED"}
EVENT = re.compile(r"Task spam\.\w+\[([0-9a-f-]{36})\] (received|succeeded|raised)")


def build_models(folder: Path):
    import warnings

    import transformers

    from tests import factories
    from tests.conftest import Models

    transformers.logging.set_verbosity_error()  # the tiny models' load reports are expected
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)

    koelectra = factories.build_koelectra(folder / "koelectra")
    exaone = factories.build_exaone(folder / "exaone")
    return Models(koelectra=koelectra,
                  koelectra_adapter=factories.build_koelectra_adapter(folder / "koelectra-spam-lora", koelectra),
                  exaone=exaone, exaone_adapter=factories.build_exaone_adapter(folder / "exaone-spam-lora", exaone),
                  exaone_cls_adapter=factories.build_exaone_adapter(folder / "exaone-spam-cls", exaone, "SEQ_CLS"),
                  snapshots=folder / "snapshots")


class Killer(threading.Thread):
    """SIGKILL a random pool child of the worker every ``low``..``high`` seconds until stopped."""

    def __init__(self, main_pid: int, low: float, high: float, rng: random.Random) -> None:
        super().__init__(name="killer", daemon=True)
        self.main_pid, self.low, self.high, self.rng = main_pid, low, high, rng
        self.kills: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.wait(self.rng.uniform(self.low, self.high)):
            try:
                children = psutil.Process(self.main_pid).children()
            except psutil.NoSuchProcess:
                log.error("the worker's main process is gone")
                return
            if not children:
                continue
            victim = self.rng.choice(children)
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
            self.kills.append(time.monotonic())
            log.info("kill -9 child %d (kill %d)", victim.pid, len(self.kills))


class Restarter(threading.Thread):
    """Restart Redis ``count`` times at random moments in the first ``within_s`` seconds."""

    def __init__(self, server: RedisProcess, count: int, within_s: float, down_s: float, rng: random.Random) -> None:
        super().__init__(name="restarter", daemon=True)
        self.server, self.down_s = server, down_s
        self.moments = sorted(rng.uniform(0.1, 0.9) * within_s for _ in range(count))
        self.restarts: list[float] = []

    def run(self) -> None:
        started = time.monotonic()
        for moment in self.moments:
            time.sleep(max(0.0, started + moment - time.monotonic()))
            self.server.restart(self.down_s)
            self.restarts.append(time.monotonic())
            log.info("redis restarted (restart %d)", len(self.restarts))


def states(backend, ids: list[str]) -> dict[str, str]:
    """Every task's state, read straight from the result backend (MGET)."""
    found: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for task_id, raw in zip(chunk, backend.client.mget([backend.get_key_for_task(i) for i in chunk]),
                                strict=True):
            found[task_id] = json.loads(raw)["status"] if raw else "PENDING"
    return found


def run(args: argparse.Namespace, workdir: Path) -> dict:
    import redis

    from producer.client import SpamClient, make_app
    from producer.settings import ProducerSettings
    from tests.conftest import start_worker

    rng = random.Random(args.seed)
    log.info("building the tiny test models in %s", workdir)
    models = build_models(workdir / "models")
    server = RedisProcess(workdir, durable=args.redis_restarts > 0).start()
    port = server.port
    broker, backend_url = f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1"
    worker = start_worker(models.env(BATCH_CHUNK_ITEMS="1000"), broker, backend_url, workdir / "worker.log",
                          "prefork", args.concurrency)
    client = SpamClient(make_app(ProducerSettings(broker_url=broker, result_backend=backend_url)))
    # A publish while Redis restarts is retried (kombu reconnects) rather than raised.
    client.app.conf.task_publish_retry_policy = {"max_retries": 60, "interval_start": 0.1, "interval_step": 0.2,
                                                 "interval_max": 1.0}
    killer = restarter = None
    try:
        ready = client.submit("준비 확인", "koelectra")
        deadline = time.monotonic() + 300
        while not ready.ready():
            if worker.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start serving:\n{worker.log()[-3000:]}")
            time.sleep(0.2)
        log.info("worker serving; sending %d tasks, a batch of %d every %d", args.tasks, args.batch_size,
                 args.batch_every)

        killer = Killer(worker.process.pid, *args.kill_every, rng)
        killer.start()
        restarter = Restarter(server, args.redis_restarts, args.tasks / args.rate if args.rate else 5.0,
                              args.redis_down, rng)
        restarter.start()
        started = time.monotonic()
        ids: list[str] = []
        kinds: Counter = Counter()
        for i in range(args.tasks):
            if i % args.batch_every == 0:
                texts = [" ".join(rng.choices(PIECES, k=rng.randint(1, 4))) + f" {i}.{j}"
                         for j in range(args.batch_size)]
                ids.append(client.submit_batch(texts, "exaone").id)
                kinds["batch"] += 1
            else:
                ids.append(client.submit(" ".join(rng.choices(PIECES, k=rng.randint(1, 4))) + f" {i}", "koelectra").id)
                kinds["single"] += 1
            if args.rate:
                time.sleep(1 / args.rate)
        log.info("sent %d tasks in %.1fs", len(ids), time.monotonic() - started)

        backend = client.app.backend
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                found = states(backend, ids)
            except redis.ConnectionError:  # Redis restarting
                time.sleep(1)
                continue
            final = sum(s in FINAL for s in found.values())
            if final == len(ids) or time.monotonic() > deadline:
                break
            log.info("%d of %d tasks final", final, len(ids))
            time.sleep(2)
        drained = time.monotonic() - started
        killer.stopped.set()
        killer.join()
        restarter.join()
        time.sleep(2)  # the last acknowledgements follow the last results

        events: dict[str, Counter] = {"received": Counter(), "succeeded": Counter(), "raised": Counter()}
        for task_id, event in EVENT.findall(worker.log()):
            events[event][task_id] += 1
        outcome = Counter(found.values())
        for label, bad in (("no final state", [i for i in ids if found[i] not in FINAL]),
                           ("FAILURE", [i for i in ids if found[i] == "FAILURE"]),
                           ("ran to success twice", [i for i in ids if events["succeeded"][i] > 1])):
            if bad:
                log.warning("%d tasks %s, e.g. %s", len(bad), label, ", ".join(bad[:5]))
        broker_client = redis.Redis(port=port)
        left = broker_client.hlen("unacked") + sum(broker_client.llen(q) for q in ("celery", "spam.koelectra",
                                                                                    "spam.exaone"))
        return {
            "submitted": len(ids), "single": kinds["single"], "batch": kinds["batch"],
            "completed": outcome["SUCCESS"], "failed": outcome["FAILURE"],
            "lost": sum(s not in FINAL for s in found.values()),
            "redelivered": sum(n > 1 for n in events["received"].values()),
            "ran twice": sum(n > 1 for n in events["succeeded"].values()),
            "left in Redis": left, "children killed": len(killer.kills), "redis restarts": len(restarter.restarts),
            "seconds": round(drained, 1), "worker alive": worker.process.poll() is None,
        }
    finally:
        if killer is not None:
            killer.stopped.set()
        client.close()
        worker.stop()
        server.stop()


def report(figures: dict, args: argparse.Namespace) -> None:
    print(f"\nsoak: {args.tasks} tasks (a batch of {args.batch_size} EXAONE texts every {args.batch_every}, "
          f"the rest single KoELECTRA texts), prefork x{args.concurrency}, SIGKILL to a random child every "
          f"{args.kill_every[0]:g}-{args.kill_every[1]:g} s, {args.redis_restarts} Redis restarts, seed {args.seed}")
    print(f"{'figure':<18}{'count':>8}")
    for key in ("submitted", "single", "batch", "completed", "failed", "lost", "redelivered", "ran twice",
                "left in Redis", "children killed", "redis restarts", "seconds"):
        print(f"{key:<18}{figures[key]:>8}")
    print(json.dumps(figures, ensure_ascii=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks to send (default 2000)")
    parser.add_argument("--batch-every", type=int, default=10, help="every Nth task is a batch (default 10)")
    parser.add_argument("--batch-size", type=int, default=20, help="texts per batch task (default 20)")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork children (default 2)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                        help="seconds between kills, drawn uniformly (default 1 4)")
    parser.add_argument("--redis-restarts", type=int, default=0, help="Redis restarts while sending (default 0)")
    parser.add_argument("--redis-down", type=float, default=0.5, help="seconds Redis stays down (default 0.5)")
    parser.add_argument("--rate", type=float, default=50.0, help="tasks sent per second; 0 = all at once")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for final states")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, logs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    workdir = Path(tempfile.mkdtemp(prefix="spam-soak-"))
    try:
        figures = run(args, workdir)
    finally:
        if args.keep:
            log.info("work folder kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(figures, args)
    bad = figures["lost"] or figures["failed"] or figures["ran twice"] or figures["left in Redis"]
    return 1 if bad or not figures["worker alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
