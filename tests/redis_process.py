"""A ``redis-server`` of one's own on a free loopback port, that can be shut down and started again
on the same port and data folder (the fault tests and ``bench/soak.py`` restart Redis mid-stream)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """With ``durable``, every write is in the append-only file before Redis replies to it."""

    def __init__(self, folder: Path, durable: bool = False, extra: tuple[str, ...] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.folder = folder
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        self.command = [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                        "--bind", "127.0.0.1", "--save", "", *persistence, *extra, "--dir", str(folder)]
        # No retries: redis-py would send SHUTDOWN again, to the restarted server.
        self.client = redis.Redis(port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        self.process: subprocess.Popen | None = None

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisProcess:
        self.process = subprocess.Popen(self.command, stdout=(self.folder / "redis.log").open("a"),
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def shutdown(self) -> None:
        """Graceful: SHUTDOWN writes the append-only file out and closes every client connection."""
        try:
            self.client.shutdown()
        except redis.ConnectionError:
            pass
        self.process.wait(timeout=30)

    def restart(self, down_s: float = 0.0) -> None:
        self.shutdown()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
