"""What ``appendfsync always`` costs against ``everysec``, side by side in one run, on this disk.

    python bench/fsync.py                          # 3000 messages per run, 2 rounds of both
    python bench/fsync.py --messages 5000 --rounds 3 --workdir /mnt/redis-disk/bench

With ``everysec`` (Redis's default, and compose's before) a Redis crash or power cut loses up to
about a second of writes: enqueued tasks, acks (those tasks run again), stored results. With
``always`` every write is on disk before Redis replies. Two figures per policy, each from a fresh
``redis-server --appendonly yes`` whose append-only file is in ``--workdir`` (a real disk: on tmpfs
an fsync costs nothing and the comparison means nothing):

- **tasks/s through a real worker**: ``spam.classify`` through a threads-pool worker, with a fixed
  number of messages in flight. ``--scorer null`` (default): ``bench/null_model.py``, the whole
  Celery path with no model work, the worst case for Redis's share of the time; ``--scorer
  koelectra``: KoELECTRA-small's dimensions (random values) on the CPU, whose forward passes
  dilute it;
- **Redis writes/s from one client**: ``SET`` after ``SET``, each waiting for its reply, so each
  ``always`` write waits for its own fsync (the latency a single publish or ack sees).

The policies alternate round by round, so a neighbour's load on this shared machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.throughput import messages, served  # noqa: E402
from tests.redis_process import RedisProcess  # noqa: E402

log = logging.getLogger("bench.fsync")
POLICIES = ("everysec", "always")


def redis_for(folder: Path, policy: str) -> RedisProcess:
    """A fresh redis-server writing its append-only file in ``folder`` with ``policy``."""
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    redis = RedisProcess(folder, extra=("--appendonly", "yes", "--appendfsync", policy)).start()
    config = redis.client.config_get("append*")
    assert config["appendonly"] == "yes" and config["appendfsync"] == policy, config
    return redis


def writes(redis: RedisProcess, count: int) -> dict:
    """``count`` SETs of a 200-byte value from one client, one at a time: writes/s and latency."""
    value = b"x" * 200
    latencies = []
    start = time.perf_counter()
    for i in range(count):
        sent = time.perf_counter()
        redis.client.set(f"bench:{i % 1000}", value)
        latencies.append(time.perf_counter() - sent)
    seconds = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"writes": count, "writes_s": round(count / seconds, 1), "p50_ms": round(cuts[49] * 1000, 3),
            "p99_ms": round(cuts[98] * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-fsync",
                        help="where the append-only files go: put it on the disk Redis would use")
    parser.add_argument("--messages", type=int, default=3000, help="spam.classify tasks per worker run")
    parser.add_argument("--writes", type=int, default=3000, help="SETs per Redis run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each policy, alternating")
    parser.add_argument("--threads", type=int, default=32, help="threads-pool concurrency of the worker")
    parser.add_argument("--scorer", choices=("null", "koelectra"), default="null",
                        help="the worker's model: none (Celery's own path) or KoELECTRA-small on the CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    filesystem = subprocess.run(["df", "-T", str(args.workdir)], capture_output=True, text=True).stdout.split("\n")[1]
    if filesystem.split()[1] in ("tmpfs", "ramfs"):
        raise SystemExit(f"{args.workdir} is on {filesystem.split()[1]}: fsync costs nothing there; use --workdir "
                         "on a disk")
    texts = messages(args.messages)
    env = {"PRELOAD_MODELS": "koelectra", "DEVICE": "cpu", "PREFETCH_WEIGHTS": "false", "CASCADE_BAND": "",
           "HF_HUB_OFFLINE": "1", "TORCH_THREADS": "1"}
    app_module = "bench.null_model"
    if args.scorer == "koelectra":
        from bench.load import build_koelectra

        base, adapter = build_koelectra(args.workdir)
        env.update(KOELECTRA_MODEL=str(base), KOELECTRA_ADAPTER_DIR=str(adapter), TORCH_THREADS="0",
                   SNAPSHOT_DIR=str(args.workdir / "snapshots"), BATCH_SIZE="32")
        app_module = "worker"
    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for round_ in range(args.rounds):
        for policy in POLICIES if round_ % 2 == 0 else reversed(POLICIES):
            redis = redis_for(args.workdir / policy, policy)
            try:
                log.info("round %d, appendfsync %s: %d writes, then %d tasks", round_ + 1, policy, args.writes,
                         args.messages)
                figures = {"policy": policy, "round": round_ + 1, "redis": writes(redis, args.writes)}
                figures["worker"] = served(env, "threads", args.threads, redis, 0, "single", texts, "koelectra",
                                           2 * args.threads, 64, args.workdir, app_module=app_module)
                figures["aof_mb"] = _size_mb(args.workdir / policy)
            finally:
                redis.stop()
            print(json.dumps(figures), flush=True)
            runs[policy].append(figures)
    report(runs, filesystem, args)


def _size_mb(folder: Path) -> float:
    """The append-only file's size (Redis 7 keeps it as several files in ``appendonlydir``)."""
    return round(sum(f.stat().st_size for f in folder.rglob("*.aof*") if f.is_file()) / 2**20, 2)


def report(runs: dict[str, list[dict]], filesystem: str, args: argparse.Namespace) -> None:
    def median(policy: str, part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in runs[policy])

    print(f"\n{args.rounds} rounds, {args.messages} tasks ({args.scorer} scorer) and {args.writes} writes per run, "
          f"{os.cpu_count()} cores, append-only file on: {' '.join(filesystem.split()[:2])}; medians")
    print(f"{'appendfsync':<13}{'tasks/s':>9}{'task p50 ms':>13}{'task p99 ms':>13}{'writes/s':>10}"
          f"{'write p50 ms':>14}{'write p99 ms':>14}")
    for policy in POLICIES:
        print(f"{policy:<13}{median(policy, 'worker', 'msg_s'):>9.1f}{median(policy, 'worker', 'p50_ms'):>13.1f}"
              f"{median(policy, 'worker', 'p99_ms'):>13.1f}{median(policy, 'redis', 'writes_s'):>10.1f}"
              f"{median(policy, 'redis', 'p50_ms'):>14.3f}{median(policy, 'redis', 'p99_ms'):>14.3f}")
    tasks = median("always", "worker", "msg_s") / median("everysec", "worker", "msg_s")
    writes_ratio = median("always", "redis", "writes_s") / median("everysec", "redis", "writes_s")
    print(f"always / everysec: tasks/s {tasks:.2f}, single-client writes/s {writes_ratio:.2f}")


if __name__ == "__main__":
    main()
