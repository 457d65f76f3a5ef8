"""Throughput benchmark: messages per second and latency through real Redis and real workers,
side by side in one run, against the model's own batched forward pass in-process.

    python bench/throughput.py                       # KoELECTRA-small dimensions, random values, CPU
    python bench/throughput.py --messages 5000 --device cuda
    python bench/throughput.py --model exaone --device cuda   # the synthetic EXAONE-2.4B of bench/load.py

Modes, each against a fresh worker on its own Redis database, the producer keeping a fixed number
of messages in flight (a closed loop, so latency means something):

- ``a``: ``spam.classify`` on the default prefork worker: one forward pass per task;
- ``b``: ``spam.classify`` on threads-pool workers (one per core on CPU): dynamic batching across the
  concurrent tasks of each;
- ``c``: ``spam.classify_batch`` tasks of ``--chunk`` texts on the prefork worker;
- ``d``: the ceiling: the same model's batched forward in-process, no queue, the faster of one
  intra-op thread and one per core (and batch 1 beside it);
- ``e``: Celery's own cost: mode ``b``'s workers with a scorer that does no model work
  (``bench/null_model.py``).

From the CPU time per message of ``d`` (the model's forward, the cheaper of its thread settings)
and of ``e`` (the worker's Celery work, Redis and the producer), the report derives the bound
those costs allow on this machine's cores, ``cores / (model + celery)`` messages per second,
and how close ``b`` comes to it. On CPU the model and Celery share the same cores; on a GPU the
model's part leaves the CPU and the bound is Celery's alone.

Latency is from sending a message to its result arriving (for ``c``, the batch's). Results are
read the way Celery's ``get`` reads them, from the result backend's pub/sub channel. The producer,
Redis and the worker share this machine's cores, as they would on one host.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_process import RedisProcess  # noqa: E402

log = logging.getLogger("bench.throughput")

PIECES = ["무료 쿠폰 당첨!", "지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시입니다", "엄마 저녁 같이 먹어요",
          "[광고] 최저가 할인 이벤트", "대출 한도 조회 무료", "택배가 도착했습니다", "확인 부탁드립니다",
          "수신거부 080-123-4567", "고객님의 계좌가 정지되었습니다", "ㅋㅋㅋ 알겠어", "주말에 등산 갈래?"]


def messages(count: int, seed: int = 0) -> list[str]:
    """Korean SMS-like texts of 1-4 pieces (about 10-70 characters), the same for every mode."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(PIECES, k=rng.randint(1, 4))) + f" {i}" for i in range(count)]


# --- the ceiling, in a fresh process -----------------------------------------------------------------


def ceiling(env: dict[str, str], model: str, texts: list[str], batch: int) -> dict:
    """Load like a worker does, then time ``score`` on ``batch`` texts per call and on one text per call."""
    os.environ.update(env)
    import torch

    from worker.loading import get_loader
    from worker.serving.classifiers import SpamClassifier
    from worker.settings import Settings

    settings = Settings.from_env(dotenv=False)
    classifier = SpamClassifier(get_loader(settings).load_model(settings.source(model)), batch,
                                settings.exaone_max_tokens if model == "exaone" else None)
    lengths = classifier.tokenizer(texts, return_length=True)["length"]
    figures: dict = {"tokens_mean": round(sum(lengths) / len(lengths), 1)}
    # The ceiling is the best this process does, with one intra-op thread or one per core.
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        classifier.score(texts[:batch])
        for label, size, sample in (("batched", batch, texts), ("batch1", 1, texts[: max(len(texts) // 8, 50)])):
            latencies = []
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(sample), size):
                t = time.perf_counter()
                classifier.score(sample[i:i + size])
                latencies.extend([time.perf_counter() - t] * len(sample[i:i + size]))
            run = {**_figures(len(sample), time.perf_counter() - start, latencies), "threads": threads,
                   "cpu_ms_per_msg": {"model": round((time.process_time() - cpu) * 1000 / len(sample), 2)}}
            if label not in figures or run["msg_s"] > figures[label]["msg_s"]:
                figures[label] = run
            if label == "batched":  # the model's least CPU per message, for the bound
                figures["model_cpu_ms"] = min(figures.get("model_cpu_ms", 1e9), run["cpu_ms_per_msg"]["model"])
    return figures


# --- real workers --------------------------------------------------------------------------------


class Collector:
    """Sees every result the workers store (pub/sub, as ``AsyncResult.get`` does) and keeps a
    bounded number of messages in flight."""

    def __init__(self, backend_url: str, window: int) -> None:
        import redis

        self.sent: dict[str, tuple[float, int]] = {}
        self.latencies: list[float] = []
        self.failures = 0
        self.slots = threading.Semaphore(window)
        self.done = threading.Event()
        self.expected = 0
        self._pubsub = redis.Redis.from_url(backend_url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("celery-task-meta-*")
        self._lock = threading.Lock()
        threading.Thread(target=self._listen, daemon=True).start()

    def close(self) -> None:
        self._pubsub.punsubscribe()
        self._pubsub.close()

    def _listen(self) -> None:
        import redis

        try:
            for message in self._pubsub.listen():
                self._on_message(message)
        except (redis.ConnectionError, ValueError, AttributeError):  # closed
            return

    def _on_message(self, message: dict) -> None:
        if message["type"] == "pmessage":
            meta = json.loads(message["data"])
            if meta["status"] not in ("SUCCESS", "FAILURE"):
                return
            with self._lock:
                sent = self.sent.pop(meta["task_id"], None)
                if sent is None:
                    return
                start, count = sent
                self.latencies.extend([time.perf_counter() - start] * count)
                self.failures += meta["status"] == "FAILURE"
                finished = len(self.latencies) >= self.expected
            self.slots.release()
            if finished:
                self.done.set()

    def run(self, send, items: list, per_item: int) -> float:
        """Send every item through ``send`` (returns a task id), keeping the window full; seconds taken."""
        self.expected = len(items) * per_item
        start = time.perf_counter()
        for item in items:
            self.slots.acquire()
            with self._lock:
                task_id = send(item)
                self.sent[task_id] = (time.perf_counter(), per_item)
        if not self.done.wait(timeout=1800):
            raise RuntimeError(f"only {len(self.latencies)} of {self.expected} results arrived")
        return time.perf_counter() - start


def served(env: dict[str, str], pool: str, concurrency: int, redis: RedisProcess, db: int, send_kind: str,
           texts: list[str], model: str, window: int, chunk: int, logdir: Path, workers: int = 1,
           app_module: str = "worker") -> dict:
    """Start a worker, warm it up, drive ``texts`` through it, stop it; the figures."""
    from celery import Celery

    from producer.contract import CLASSIFY, CLASSIFY_BATCH, route

    broker, backend = redis.url(db), redis.url(db + 1)
    worker_env = {**os.environ, **env, "CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": backend}
    log_file = (logdir / f"worker-{send_kind}-{pool}-{app_module}.log").open("w")
    procs = [subprocess.Popen([sys.executable, "-m", "celery", "-A", app_module, "worker", f"--pool={pool}",
                               f"--concurrency={concurrency}", "--without-mingle", "--without-gossip", "-l", "WARNING",
                               "-n", f"bench{n}@%h"], cwd=ROOT, env=worker_env, stdout=log_file,
                              stderr=subprocess.STDOUT) for n in range(workers)]
    # A sender without a result backend: results are collected by the Collector, not per handle.
    app = Celery("bench", broker=broker)
    app.conf.update(task_serializer="json", accept_content=["json"], task_routes=(route,))
    try:
        def send_one(text: str) -> str:
            return app.send_task(CLASSIFY, args=[text], kwargs={"model": model}).id

        def send_batch(batch: list[str]) -> str:
            return app.send_task(CLASSIFY_BATCH, args=[batch], kwargs={"model": model}).id

        warm = Collector(backend, window)
        warm.run(send_one, texts[:window * 2], 1)  # waits in the queue until the worker has loaded
        warm.close()
        collector = Collector(backend, window)
        load_before = round(os.getloadavg()[0], 2)
        cpu_before = {"worker": sum(cpu_seconds(p.pid) for p in procs), "redis": cpu_seconds(redis.process.pid),
                      "producer": time.process_time()}
        if send_kind == "single":
            seconds = collector.run(send_one, texts, 1)
        else:
            seconds = collector.run(send_batch, [texts[i:i + chunk] for i in range(0, len(texts), chunk)], chunk)
        cpu = {"worker": sum(cpu_seconds(p.pid) for p in procs), "redis": cpu_seconds(redis.process.pid),
               "producer": time.process_time()}
        collector.close()
        if collector.failures:
            raise RuntimeError(f"{collector.failures} tasks failed; see {log_file.name}")
        figures = _figures(len(texts), seconds, collector.latencies)
        # Where the cores went, per message: the worker (model and Celery), Redis, this producer.
        figures["cpu_ms_per_msg"] = {k: round((cpu[k] - cpu_before[k]) * 1000 / len(texts), 2) for k in cpu}
        # The machine is shared: what else ran shows in the load average (ours adds about 2 here).
        figures["load_before"], figures["load_after"] = load_before, round(os.getloadavg()[0], 2)
        return figures
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        app.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (prefork children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # the process, or its child
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _figures(count: int, seconds: float, latencies: list[float]) -> dict:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"messages": count, "seconds": round(seconds, 2), "msg_s": round(count / seconds, 1),
            "p50_ms": round(cuts[49] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--model", choices=("koelectra", "exaone"), default="koelectra")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32, help="texts per forward pass (BATCH_SIZE)")
    parser.add_argument("--chunk", type=int, default=64, help="texts per batch task in mode c")
    parser.add_argument("--threads", type=int, default=32, help="threads-pool concurrency in mode b")
    parser.add_argument("--b-workers", type=int, default=0,
                        help="threads-pool worker processes in mode b (default: one per core on CPU, one on CUDA)")
    parser.add_argument("--modes", default="abce", help="which of the served modes a, b, c, e to run (d always runs)")
    parser.add_argument("--worker-env", default="", help="extra worker settings, e.g. TORCH_THREADS=1,BATCH_WAIT_MS=5")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip d (and the bound): a quicker A/B of the served modes' CPU per message")
    parser.add_argument("--ceiling", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    texts = messages(args.messages)
    cores = os.cpu_count() or 1

    if args.ceiling:  # the in-process ceiling, run as a child so the parent stays torch-free
        print(json.dumps(ceiling(json.loads(args.ceiling), args.model, texts, args.batch)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model == "koelectra":
        from bench.load import build_koelectra

        base, adapter = build_koelectra(args.workdir)
    else:
        from bench.load import build_exaone, build_exaone_adapter

        base, adapter = args.workdir / "exaone-2.4b", args.workdir / "exaone-lora"
        build_exaone(base)
        build_exaone_adapter(adapter, base)
    prefix = args.model.upper()
    env = {f"{prefix}_MODEL": str(base), f"{prefix}_ADAPTER_DIR": str(adapter), "PRELOAD_MODELS": args.model,
           "DEVICE": args.device, "TORCH_DTYPE": "auto", "SNAPSHOT_DIR": str(args.workdir / "snapshots"),
           "BATCH_SIZE": str(args.batch), "CASCADE_BAND": "", "HF_HUB_OFFLINE": "1", "TORCH_THREADS": "0",
           "MAX_BATCH_ITEMS": str(max(args.chunk, 1000)), "BATCH_CHUNK_ITEMS": str(max(args.chunk, 250))}
    env.update(dict(item.split("=", 1) for item in args.worker_env.split(",") if item))
    prefork = 1 if args.device == "cuda" else cores  # one GPU: one process owns it
    args.b_workers = args.b_workers or prefork  # as many serving processes as mode a and c have

    results: dict = {}
    if not args.no_ceiling:
        log.info("d: in-process ceiling")
        out = subprocess.run([sys.executable, __file__, "--ceiling", json.dumps(env), "--model", args.model,
                              "--messages", str(args.messages), "--batch", str(args.batch)],
                             capture_output=True, text=True, cwd=ROOT, check=False)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        results = json.loads(out.stdout.strip().splitlines()[-1])
    redis = RedisProcess(args.workdir / "redis").start()
    try:
        if "a" in args.modes:
            log.info("a: one forward pass per task (prefork, %d processes)", prefork)
            results["a"] = served(env, "prefork", prefork, redis, 0, "single", texts, args.model, 4 * prefork,
                                  args.chunk, args.workdir)
        if "b" in args.modes:
            log.info("b: dynamic batching (%d threads-pool worker(s), %d threads each)", args.b_workers, args.threads)
            results["b"] = served(env, "threads", args.threads, redis, 2, "single", texts, args.model,
                                  2 * args.threads * args.b_workers, args.chunk, args.workdir, args.b_workers)
        if "c" in args.modes:
            log.info("c: batch tasks of %d (prefork, %d processes)", args.chunk, prefork)
            results["c"] = served(env, "prefork", prefork, redis, 4, "batch", texts, args.model, 2 * prefork,
                                  args.chunk, args.workdir)
        if "e" in args.modes:
            log.info("e: Celery's own cost (mode b's workers, a scorer that does no model work)")
            results["e"] = served(env, "threads", args.threads, redis, 6, "single", texts, args.model,
                                  2 * args.threads * args.b_workers, args.chunk, args.workdir, args.b_workers,
                                  app_module="bench.null_model")
    finally:
        redis.stop()
    report(results, args)


def report(results: dict, args: argparse.Namespace) -> None:
    ceiling_rate = results["batched"]["msg_s"] if "batched" in results else float("nan")
    rows = [(label, results[key]) for key, label in (
        ("a", "a  classify, one forward per task"), ("b", "b  classify, dynamic batching"),
        ("c", "c  classify_batch tasks"), ("e", "e  b's workers, no model work (Celery's cost)"),
        ("batched", f"d  in-process, batch {args.batch}, {results.get('batched', {}).get('threads')} thread(s) "
                    "(ceiling)"),
        ("batch1", f"   in-process, batch 1, {results.get('batch1', {}).get('threads')} thread(s)")) if key in results]
    print(f"\n{args.model}, {args.device}, {args.messages} messages of {results.get('tokens_mean', '?')} tokens on "
          f"average, {os.cpu_count()} cores")
    print(f"{'mode':<48}{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'of d':>7}   CPU ms/msg: worker redis producer")
    for label, fig in rows:
        cpu = fig.get("cpu_ms_per_msg") or {}
        cells = f"   {cpu['worker']:>6} {cpu['redis']:>5} {cpu['producer']:>8}" if "worker" in cpu else \
            f"   model {cpu['model']}" if cpu else ""
        print(f"{label:<48}{fig['msg_s']:>9.1f}{fig['p50_ms']:>9.1f}{fig['p99_ms']:>9.1f}"
              f"{fig['msg_s'] / ceiling_rate:>7.0%}" + cells)
    if "a" in results and "b" in results:
        print(f"b/a = {results['b']['msg_s'] / results['a']['msg_s']:.2f}x")
    for key in ("a", "b", "c", "e"):
        if key in results:
            fig = results[key]
            used = sum(fig["cpu_ms_per_msg"].values()) * fig["msg_s"] / 1000 / (os.cpu_count() or 1)
            print(f"{key}: load average {fig['load_before']} -> {fig['load_after']} (1 min); worker + redis + producer "
                  f"used {used:.0%} of the cores' time, the rest went idle or to other processes")
    if "e" in results and "batched" in results:
        bound(results, args)
    if "batch1" in results:
        print(f"ceiling batched/batch-1 = {ceiling_rate / results['batch1']['msg_s']:.2f}x")
    print(json.dumps(results))


def bound(results: dict, args: argparse.Namespace) -> None:
    """The throughput the measured CPU costs allow on these cores, and (b) against it."""
    cores = os.cpu_count() or 1
    celery_ms = sum(results["e"]["cpu_ms_per_msg"].values())  # worker + redis + producer, no model
    model_ms = results["model_cpu_ms"] if args.device == "cpu" else 0.0  # on a GPU the forward leaves the CPU
    limit = cores * 1000 / (model_ms + celery_ms)
    results["bound"] = {"cores": cores, "model_cpu_ms": model_ms, "celery_cpu_ms": round(celery_ms, 2),
                        "msg_s": round(limit, 1)}
    print(f"bound = {cores} cores / ({model_ms:.2f} ms model (d) + {celery_ms:.2f} ms Celery (e: worker "
          f"{results['e']['cpu_ms_per_msg']['worker']}, redis {results['e']['cpu_ms_per_msg']['redis']}, producer "
          f"{results['e']['cpu_ms_per_msg']['producer']})) = {limit:.1f} msg/s")
    if "b" in results:
        results["bound"]["b_of_bound"] = round(results["b"]["msg_s"] / limit, 3)
        print(f"b/bound = {results['b']['msg_s'] / limit:.2f} (target >= 0.9); b/d = "
              f"{results['b']['msg_s'] / results['batched']['msg_s']:.2f}")
        # On a shared machine b may not get the cores the bound assumes; its CPU per message says
        # what it would reach with them to itself.
        b_ms = sum(results["b"]["cpu_ms_per_msg"].values())
        results["bound"]["b_cpu_of_bound"] = round((model_ms + celery_ms) / b_ms, 3)
        print(f"b's CPU per message {b_ms:.2f} ms against the bound's {model_ms + celery_ms:.2f} ms: "
              f"{(model_ms + celery_ms) / b_ms:.2f} of the bound with the cores to itself")


if __name__ == "__main__":
    main()
