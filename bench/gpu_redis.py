"""Start the ``redis-server`` on PATH the way the tests do (tests/redis_process.py) and ping it; on the
lent GPU machine that is the kit's (bench/gpu_kit.sh). Prints one line: ``redis-server ready: ...`` or
``no redis-server: <why>`` (exit 1), e.g. the loader's words when that machine's glibc is too old."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.redis_process import RedisProcess  # noqa: E402 (after the path above)


def main() -> int:
    path = shutil.which("redis-server")
    if path is None:
        print("no redis-server: none on PATH (bench/gpu_kit.sh carries one in .gpukit/bin)")
        return 1
    with tempfile.TemporaryDirectory() as folder:
        server = RedisProcess(Path(folder))
        try:
            server.start()
        except RuntimeError:
            server.stop()
            lines = (Path(folder) / "redis.log").read_text(errors="replace").strip().splitlines()
            print(f"no redis-server: {path} did not start: {lines[-1] if lines else 'it printed nothing'}")
            return 1
        version = server.client.info()["redis_version"]
        server.stop()
    print(f"redis-server ready: {version}, {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
