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

Memory is read against issue 17's targets, each a ratio within this run: the first start's peak RSS
over the guide path's; each reload's peak PSS over the worker's PSS at rest just before it; the PSS
at rest after both reloads over the PSS at rest before them. *At rest* means every process serves
the version from its merged snapshot (the background build done and switched to), read from
``inspect stats``. It prints a table and one JSON line with every figure.
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
    parts = process_memory_mb(pid)
    return sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values())


def process_memory_mb(pid: int) -> dict[str, tuple[float, float, float]]:
    """PSS, RSS and USS of a process (``main``) and each of its children (``child <pid>``)."""
    parts = {}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        parts["main" if proc.pid == pid else f"child {proc.pid}"] = (info.pss / 2**20, info.rss / 2**20,
                                                                     info.uss / 2**20)
    return parts


class MemoryWatch:
    """The worker tree's PSS and RSS sampled every 0.2 s; ``peak(until)``: the peaks up to a moment."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, dict[str, tuple[float, float, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, until: float = float("inf")) -> tuple[float, float]:
        kept = [(sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values()))
                for at, parts in self.samples if at <= until] or [(0.0, 0.0)]
        return max(p for p, _ in kept), max(r for _, r in kept)

    def at_peak(self) -> dict[str, dict[str, int]]:
        """Each process's PSS and USS in the sample of peak PSS: where the peak comes from. USS counts
        the pages no other process maps, file pages included (printed as "private")."""
        if not self.samples:
            return {}
        _, parts = max(self.samples, key=lambda sample: sum(p[0] for p in sample[1].values()))
        return {name: {"pss_mb": round(pss), "uss_mb": round(uss)} for name, (pss, _, uss) in parts.items()}

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append((time.perf_counter(), process_memory_mb(self.pid)))


def at_rest(app, worker_pid: int, version: str | None = None, timeout: float = 900) -> dict:
    """Wait until every serving process serves EXAONE from its merged snapshot (of ``version``, when
    given), then read the worker tree's PSS and RSS: the median of three readings a second apart."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        replies = app.control.inspect(timeout=2).stats() or {}
        figures = {k: v for reply in replies.values() for k, v in reply.items()}
        sources = [v for k, v in figures.items() if k.endswith(".exaone.source")]
        versions = [v for k, v in figures.items() if k.endswith(".exaone.version")]
        if sources and all(v == "snapshot" for v in sources) and (version is None or set(versions) == {version}):
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"EXAONE not at rest on its snapshot after {timeout:.0f} s")
    waited = time.perf_counter() - start
    readings = []
    for _ in range(3):
        time.sleep(1)
        readings.append(tree_memory_mb(worker_pid))
    pss, rss = (statistics.median(r[i] for r in readings) for i in (0, 1))
    return {"pss_mb": round(pss), "rss_mb": round(rss), "waited_s": round(waited, 1)}


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
        stream = Stream(app).start()
        time.sleep(10)
        for n, label, drop_base in ((2, "reload, base converted", False), (3, "reload, base not converted", True)):
            rest = at_rest(app, worker.pid)
            results.setdefault("worker memory before", rest)
            if drop_base:
                for folder in snapshots.glob("exaone-base-*"):
                    if folder.is_dir():
                        shutil.rmtree(folder)
            flip(current, adapters[n])
            stream.phase = label
            with MemoryWatch(worker.pid) as watch:
                start = time.perf_counter()
                outcomes = reload_fleet(app, model="exaone", timeout=900)
                switched = time.perf_counter()
                stream.phase = f"after {label}"
                probe = app.send_task("spam.classify", args=["."], kwargs={"model": "exaone"}).get(timeout=900)
                at_rest(app, worker.pid, probe["model_version"])  # the merged snapshot built and switched to
                settled = time.perf_counter()
            results[label] = {"seconds": round(switched - start, 2), "exit": exit_code(outcomes),
                              "line": outcomes[0].line if outcomes else "", "probe_version": probe["model_version"],
                              "rest_pss_mb": rest["pss_mb"], "peak_pss_mb": round(watch.peak()[0]),
                              "peak_rss_mb": round(watch.peak()[1]),
                              "peak_pss_mb_until_every_process_switched": round(watch.peak(switched)[0]),
                              "at_peak": watch.at_peak(),
                              "merged_snapshot_served_after_s": round(settled - start, 1)}
            print(f"  {label}: {results[label]}", file=sys.stderr)
            time.sleep(10)
        results["worker memory after"] = at_rest(app, worker.pid)
        stream.stop()
        results["stream"] = {phase: percentiles(v) for phase, v in stream.latencies.items()}
        results["tasks failed"] = stream.failed
        results["tasks sent"] = stream.sent
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
        print(f"first start, peak RSS (snapshot built after ready included): guide {guide['peak_rss_mb']:.0f} MB, "
              f"ours {ours['peak_rss_mb']:.0f} MB; ours / guide = {ours['peak_rss_mb'] / guide['peak_rss_mb']:.2f} "
              f"(target <= 1)")
    for label in ("reload, base converted", "reload, base not converted"):
        r = results[label]
        print(f"{label}: {r['seconds']:.1f} s from the command to every process on the new version "
              f"(exit {r['exit']}); {r['line']}")
        print(f"  peak PSS {r['peak_pss_mb']} MB (until every process switched: "
              f"{r['peak_pss_mb_until_every_process_switched']} MB; merged snapshot served "
              f"{r['merged_snapshot_served_after_s']:.0f} s after the command), PSS at rest before "
              f"{r['rest_pss_mb']} MB: {r['peak_pss_mb'] / r['rest_pss_mb']:.2f}x (target <= 2); peak RSS "
              f"{r['peak_rss_mb']} MB")
        parts = [f"{name} {v['pss_mb']} MB ({v['uss_mb']} private)" for name, v in r["at_peak"].items()]
        print(f"  at the peak: {', '.join(parts)}")
    before, after = results["worker memory before"]["pss_mb"], results["worker memory after"]["pss_mb"]
    print(f"worker PSS at rest: before the reloads {before:.0f} MB, after both {after:.0f} MB: "
          f"{after / before:.2f}x (target <= 1.1)")
    print(f"\n{'stream phase':36} {'tasks':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for phase, p in results["stream"].items():
        print(f"{phase:36} {p['n']:>6} {p.get('p50_ms', 0):>8} {p.get('p99_ms', 0):>8}")
    print(f"tasks failed: {results['tasks failed']} of {results['tasks sent']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
