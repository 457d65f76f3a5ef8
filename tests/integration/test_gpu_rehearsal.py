"""The kit for the lent GPU machine and the rehearsal of bench/gpu_check.sh's offline path (docs/gpu.md):
the kit fits the 64 MiB a device run carries, and on a stand-in for that machine's Python, inside a
network namespace with no network, the kit installs, every import resolves, the kit's redis-server
starts and a worker answers through it, and the CUDA steps say they were skipped.

Needs the package registries (the kit is downloaded; pip's cache and .cache/gpu-rehearsal/ keep it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REHEARSAL = ROOT / ".cache" / "gpu-rehearsal"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rehearsal_kit() -> Path:
    """The stand-in Python and the kit built for it (rebuilt only when bench/gpu_standin.txt changes)."""
    built = _run(["bash", "bench/gpu_kit.sh", "--rehearse"], timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    return REHEARSAL


@pytest.mark.timeout(300)
def test_the_kit_for_the_gpu_machine_fits_what_a_device_run_carries(tmp_path):
    kit = tmp_path / "kit"
    built = _run(["bash", "bench/gpu_kit.sh"], timeout=280, GPUKIT_DIR=str(kit))
    assert built.returncode == 0, built.stdout + built.stderr
    sizes = dict(re.findall(r"gpu_kit: (kit|tree|total) +([\d.]+) MiB", built.stdout))
    assert float(sizes["total"]) <= 64 and float(sizes["kit"]) > 20, built.stdout
    wheels = {p.name.split("-")[0]: p for p in (kit / "wheels").glob("*.whl")}
    assert "-cp312-" in wheels["hiredis"].name and "transformers" in wheels and "celery" in wheels
    libraries = [n for n in zipfile.ZipFile(wheels["bitsandbytes"]).namelist() if n.endswith(".so")]
    assert sorted(libraries) == [f"bitsandbytes/libbitsandbytes_{v}.so" for v in ("cpu", "cuda130", "cuda132")]
    assert "every requirement met" in built.stdout
    version = subprocess.run([kit / "bin" / "redis-server", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "v=7." in version.stdout, version.stderr


@pytest.mark.timeout(900)
def test_the_rehearsal_runs_offline_and_a_worker_answers_through_the_kits_redis(rehearsal_kit, tmp_path):
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not permitted here (CI runs as root, where it is)")
    run = _run(["unshare", "-n", "bash", "-c", "ip link set lo up && bash bench/gpu_check.sh --rehearse"],
               timeout=880, GPU_CHECK_LOG_DIR=str(tmp_path))
    summary = run.stdout.split("=== summary", 1)[-1]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr
    rows = {line[:38].strip(): line[39:] for line in summary.splitlines()[2:]}
    assert rows["install the kit (offline)"].startswith("ok")
    assert rows["imports of workers, tests, benches"].startswith("ok")
    assert re.search(r"redis-server ready: 7\.\S+ \S*\.cache/gpu-rehearsal/kit/bin/redis-server",
                     rows["redis-server"]), summary
    assert re.search(r"^ok .* 2 passed", rows["a CPU worker answers via Redis"]), summary
    for name in ("CUDA tests + CUDA workers via Redis", "bench/load.py --device cuda"):
        assert rows[name].startswith("skipped: no GPU"), summary
    assert "transformers 5.24.0 (kit)" in run.stdout and "huggingface_hub 1.33.0," in run.stdout
    assert list(tmp_path.glob("rehearsal-*.txt")), "the log was not written"


def test_an_import_that_does_not_resolve_is_named_with_its_importer(rehearsal_kit):
    """The stand-in without the kit lacks celery and the rest: the check names them, it does not pass."""
    run = _run([str(rehearsal_kit / "python" / "bin" / "python"), "bench/gpu_imports.py"], timeout=280,
               PYTHONPATH="")
    assert run.returncode == 1
    assert re.search(r"FAILED celery \(imported by \S+\.py:\d+\): ModuleNotFoundError", run.stderr), run.stderr
    assert "FAILED hiredis (redis-py's reply parser)" in run.stderr


def test_a_redis_server_that_cannot_run_there_is_one_clear_line(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text('#!/bin/sh\necho "$0: /lib/x86_64-linux-gnu/libc.so.6: version \\`GLIBC_2.99\' not found" >&2\n'
                    "exit 1\n")
    fake.chmod(0o755)
    run = _run([sys.executable, "bench/gpu_redis.py"], timeout=60, PATH=f"{tmp_path}:{os.environ['PATH']}")
    assert run.returncode == 1
    assert run.stdout.strip() == (f"no redis-server: {fake} did not start: {fake}: /lib/x86_64-linux-gnu/libc.so.6: "
                                  "version `GLIBC_2.99' not found")
