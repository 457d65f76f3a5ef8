"""Rollout benchmark: a retrained adapter onto a running worker, measured side by side in one run.

    python bench/rollout.py                 # EXAONE-2.4B layout of bench/load.py (builds it once)
    python bench/rollout.py --children 2

On the synthetic EXAONE-3.5-2.4B checkpoint of ``bench/load.py`` (published layout, two fp32 shards,
random values, r=16 LoRA on all seven projections), bf16, CPU:

1. the first start of our loader (no snapshot at all: converts the base, merges, writes both) against
   the guide's path (``from_pretrained`` + ``PeftModel``), each cold in a fresh process;
2. a real prefork worker with KoELECTRA and EXAONE and a closed-loop stream of KoELECTRA tasks
   (EXAONE's forward is tens of seconds per prompt on this CPU, so the stream measures the serving
   impact on the host; EXAONE answers a probe task after each switch);
3. ``reload`` to a second adapter with the base already converted, then to a third with the converted
   base deleted: seconds from the command to every process on the new version, the stream's p50/p99
   latency before and during each rollout, tasks failed, and the worker tree's peak PSS and RSS.

It prints a table and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import load as load_bench  # noqa: E402

from producer.client import make_app  # noqa: E402
from producer.reload import exit_code, reload_fleet  # noqa: E402
from producer.settings import ProducerSettings  # noqa: E402
from tests.redis_process import RedisProcess  # noqa: E402

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "대출 한도 조회 무료",
         "엄마 저녁 같이 먹어요"]


class Stream:
    """A closed loop of ``in_flight`` KoELECTRA tasks; latencies tagged with the phase they ran in."""

    def __init__(self, app, in_flight: int = 4) -> None:
        self.app, self.in_flight = app, in_flight
        self.phase = "before"
        self.latencies: dict[str, list[float]] = {}
        self.failed = 0
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(in_flight)]

    def start(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _loop(self, i: int) -> None:
        while not self._stop.is_set():
            phase, start = self.phase, time.perf_counter()
            self.sent += 1
            try:
                self.app.send_task("spam.classify", args=[TEXTS[i % len(TEXTS)]], kwargs={"model": "koelectra"}
                                   ).get(timeout=120)
                self.latencies.setdefault(phase, []).append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - counted: the figure that must be 0
                self.failed += 1


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"n": len(values)}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"n": len(values), "p50_ms": round(cuts[49] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1)}


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """Summed PSS and RSS of a process and its children."""
    pss = rss = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += info.pss / 2**20
        rss += info.rss / 2**20
    return pss, rss


class MemoryWatch:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pss, rss = tree_memory_mb(self.pid)
            self.peak = (max(self.peak[0], pss), max(self.peak[1], rss))


def flip(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--skip-first-start", action="store_true", help="skip part 1 (about two minutes)")
    args = parser.parse_args()
    work = args.workdir
    base = work / "exaone-2.4b"
    load_bench.build_exaone(base)
    adapters = {n: work / f"exaone-lora{'' if n == 1 else n}" for n in (1, 2, 3)}
    for folder in adapters.values():
        load_bench.build_exaone_adapter(folder, base)
    ko_base, ko_adapter = load_bench.build_koelectra(work)
    snapshots = work / "rollout-snapshots"
    results: dict = {"children": args.children}

    if not args.skip_first_start:  # 1. first start against the guide's path, both cold
        os.environ["BENCH_DEVICE"] = "cpu"
        for key, mode in (("guide cold", "guide"), ("ours first start cold", "first")):
            shutil.rmtree(snapshots, ignore_errors=True)
            load_bench.evict([work])
            results[key] = load_bench.run_child(mode, "exaone", str(base), str(adapters[1]), snapshots, classify=False)
            print(f"  {key}: {results[key]}", file=sys.stderr)

    current = work / "exaone-lora-current"
    flip(current, adapters[1])
    redis = RedisProcess(work / "rollout-redis").start()
    env = {**os.environ, "CELERY_BROKER_URL": redis.url(0), "CELERY_RESULT_BACKEND": redis.url(1),
           "PRELOAD_MODELS": "koelectra,exaone", "EXAONE_MODEL": str(base), "EXAONE_ADAPTER_DIR": str(current),
           "KOELECTRA_MODEL": str(ko_base), "KOELECTRA_ADAPTER_DIR": str(ko_adapter), "DEVICE": "cpu",
           "TORCH_DTYPE": "bfloat16", "MODEL_LOADER": "snapshot", "SNAPSHOT_DIR": str(snapshots),
           "CASCADE_BAND": ""}
    log = (work / "rollout-worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", f"-c{args.children}",
                               "--without-mingle", "--without-gossip", "-l", "INFO"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    app = make_app(ProducerSettings(redis.url(0), redis.url(1)))
    try:
        app.send_task("spam.classify", args=["준비"], kwargs={"model": "koelectra"}).get(timeout=900)
        results["worker memory before"] = dict(zip(("pss_mb", "rss_mb"), tree_memory_mb(worker.pid), strict=True))
        stream = Stream(app).start()
        time.sleep(10)
        for n, label, drop_base in ((2, "reload, base converted", False), (3, "reload, base not converted", True)):
            if drop_base:
                for folder in snapshots.glob("exaone-base-*"):
                    if folder.is_dir():
                        shutil.rmtree(folder)
            flip(current, adapters[n])
            stream.phase = label
            start = time.perf_counter()
            with MemoryWatch(worker.pid) as watch:
                outcomes = reload_fleet(app, model="exaone", timeout=900)
            seconds = time.perf_counter() - start
            stream.phase = f"after {label}"
            probe = app.send_task("spam.classify", args=["."], kwargs={"model": "exaone"}).get(timeout=900)
            results[label] = {"seconds": round(seconds, 2), "exit": exit_code(outcomes),
                              "line": outcomes[0].line if outcomes else "", "probe_version": probe["model_version"],
                              "peak_pss_mb": round(watch.peak[0]), "peak_rss_mb": round(watch.peak[1])}
            print(f"  {label}: {results[label]}", file=sys.stderr)
            time.sleep(10)
        stream.stop()
        results["stream"] = {phase: percentiles(v) for phase, v in stream.latencies.items()}
        results["tasks failed"] = stream.failed
        results["tasks sent"] = stream.sent
        results["worker memory after"] = dict(zip(("pss_mb", "rss_mb"), tree_memory_mb(worker.pid), strict=True))
    finally:
        worker.terminate()
        worker.wait(timeout=120)
        redis.stop()
    report(results)


def report(results: dict) -> None:
    print()
    if "guide cold" in results:
        guide, ours = results["guide cold"], results["ours first start cold"]
        print(f"first start, cold: guide {guide['ready_s']:.1f} s ready (load stage {guide['load_s']:.1f} s), "
              f"ours {ours['ready_s']:.1f} s (load stage {ours['load_s']:.1f} s); ours / guide = "
              f"{ours['ready_s'] / guide['ready_s']:.2f} (target <= 1)")
    for label in ("reload, base converted", "reload, base not converted"):
        r = results[label]
        print(f"{label}: {r['seconds']:.1f} s from the command to every process on the new version "
              f"(exit {r['exit']}); peak PSS {r['peak_pss_mb']} MB, RSS {r['peak_rss_mb']} MB; {r['line']}")
    print(f"worker PSS before {results['worker memory before']['pss_mb']:.0f} MB, after "
          f"{results['worker memory after']['pss_mb']:.0f} MB")
    print(f"\n{'stream phase':36} {'tasks':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for phase, p in results["stream"].items():
        print(f"{phase:36} {p['n']:>6} {p.get('p50_ms', 0):>8} {p.get('p99_ms', 0):>8}")
    print(f"tasks failed: {results['tasks failed']} of {results['tasks sent']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
