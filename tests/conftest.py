"""Shared fixtures: tiny models on disk, a real ``redis-server``, real ``celery`` worker processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import factories
from tests.redis_process import RedisProcess, free_port  # noqa: F401 (free_port: for the tests)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Models:
    koelectra: Path
    koelectra_adapter: Path
    exaone: Path
    exaone_adapter: Path
    exaone_cls_adapter: Path
    snapshots: Path

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "KOELECTRA_MODEL": str(self.koelectra),
            "KOELECTRA_ADAPTER_DIR": str(self.koelectra_adapter),
            "EXAONE_MODEL": str(self.exaone),
            "EXAONE_ADAPTER_DIR": str(self.exaone_adapter),
            "PRELOAD_MODELS": "koelectra,exaone",
            "DEVICE": "cpu",
            "TORCH_DTYPE": "float32",
            "HF_HUB_OFFLINE": "1",
            "SNAPSHOT_DIR": str(self.snapshots),
            "CASCADE_BAND": "",  # auto = KoELECTRA alone; the cascade tests set their band
        }
        env.update(overrides)
        return env


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    koelectra = factories.build_koelectra(root / "koelectra")
    exaone = factories.build_exaone(root / "exaone")
    return Models(
        koelectra=koelectra,
        koelectra_adapter=factories.build_koelectra_adapter(root / "koelectra-spam-lora", koelectra),
        exaone=exaone,
        exaone_adapter=factories.build_exaone_adapter(root / "exaone-spam-lora", exaone),
        exaone_cls_adapter=factories.build_exaone_adapter(root / "exaone-spam-cls", exaone, "SEQ_CLS"),
        snapshots=root / "snapshots",
    )


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo of ``scripts/run --demo``: tiny models with adapters trained on the synthetic set."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_models

    root = tmp_path_factory.mktemp("demo")
    assert demo_models.ensure(root)
    return root


# --- Redis ----------------------------------------------------------------------------------------


DATABASES = 512
"""Every worker a test starts gets two databases of the session's redis-server."""


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    _next_db: int = 0

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def fresh_pair(self) -> tuple[str, str]:
        """A broker and a result backend database no other test uses."""
        broker, backend = self._next_db, self._next_db + 1
        self._next_db += 2
        if backend >= DATABASES:
            raise RuntimeError("out of Redis databases for this session")
        return self.url(broker), self.url(backend)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (the README's test command installs it)")
    server = RedisProcess(tmp_path_factory.mktemp("redis"), extra=("--databases", str(DATABASES))).start()
    yield RedisServer(server.port, server.process)
    server.stop()


# --- Celery workers -------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log_path: Path
    broker_url: str
    backend_url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_worker(env_vars: dict[str, str], broker_url: str, backend_url: str, log_path: Path,
                 pool: str = "prefork", concurrency: int = 2, args: tuple[str, ...] = (),
                 app: str = "worker", cwd: Path = ROOT) -> WorkerProcess:
    """``cwd``: where the worker runs (and reads ``.env``); the project stays importable from there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "KOELECTRA_", "EXAONE_"))}
    if cwd != ROOT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(env_vars)
    env.update({"CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": backend_url, "TORCH_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "celery", "-A", app, "worker", f"--pool={pool}", f"--concurrency={concurrency}",
           "--loglevel=INFO", "--without-mingle", "--without-gossip", "-n", f"{pool}-{log_path.stem}@%h", *args]
    log = log_path.open("w")
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return WorkerProcess(process, log_path, broker_url, backend_url)


@pytest.fixture
def worker_factory(redis_server: RedisServer, tmp_path: Path) -> Iterator:
    """Start real worker processes on their own Redis databases; stops them at teardown."""
    started: list[WorkerProcess] = []

    def start(env_vars: dict[str, str], pool: str = "prefork", concurrency: int = 2, name: str = "worker",
              urls: tuple[str, str] | None = None, args: tuple[str, ...] = (), app: str = "worker",
              cwd: Path = ROOT) -> WorkerProcess:
        """``urls``: the broker and backend of another worker, to run a fleet on one broker."""
        broker, backend = urls or redis_server.fresh_pair()
        worker = start_worker(env_vars, broker, backend, tmp_path / f"{name}-{len(started)}.log", pool, concurrency,
                              args, app, cwd)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def prefork_worker(redis_server: RedisServer, models: Models, tmp_path_factory) -> Iterator[WorkerProcess]:
    """One prefork worker with two children and both models, shared by the read-only tests."""
    broker, backend = redis_server.fresh_pair()
    log_path = tmp_path_factory.mktemp("workers") / "prefork.log"
    worker = start_worker(models.env(), broker, backend, log_path, "prefork", 2)
    yield worker
    worker.stop()
