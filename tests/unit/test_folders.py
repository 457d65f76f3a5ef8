"""Per-worker folders: removed at every exit of their process, swept by a later start only when their
owner is gone. (Through a real worker and SIGTERM: tests/integration/test_worker_folders.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker.telemetry import folders

ROOT = Path(__file__).resolve().parents[2]

_OWNER = """
import sys, time
from worker.telemetry import folders
folder = folders.make("spam-test-", sys.argv[1])
print(folder, flush=True)
if sys.argv[2] == "exit":
    sys.exit(3)
if sys.argv[2] == "raise":
    raise RuntimeError("a start that fails")
time.sleep(60)
"""


def _owner(base: Path, how: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", _OWNER, str(base), how], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    return process, Path(process.stdout.readline().strip())


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("how", ["exit", "raise", "SIGTERM", "SIGINT"])
def test_a_folder_is_removed_however_its_process_ends(tmp_path, how):
    process, folder = _owner(tmp_path, how)
    assert folder.parent == tmp_path and folder.name.startswith(f"spam-test-{process.pid}-")
    if how.startswith("SIG"):
        assert folder.is_dir()
        process.send_signal(getattr(signal, how))  # SIGTERM: before Celery's handlers, the default kills on the spot
    process.wait(timeout=30)
    assert not folder.exists(), f"{how}: left behind"


def test_a_start_sweeps_only_the_folders_of_owners_that_are_gone(tmp_path):
    dead = tmp_path / f"spam-test-{_dead_pid()}-abc"  # a worker killed with SIGKILL, or from before this fix
    (dead / "sub").mkdir(parents=True)
    live, live_folder = _owner(tmp_path, "sleep")  # alive and holding its lock
    locked = tmp_path / f"spam-test-{_dead_pid()}-xyz"  # a pid not ours, whose owner still holds the lock
    locked.mkdir()                                      # (a live worker seen from another PID namespace)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(60)", str(locked)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = tmp_path / "someone-elses-folder"
        other.mkdir()
        mine = folders.make("spam-test-", tmp_path)
        assert not dead.exists()
        assert live_folder.is_dir() and locked.is_dir() and other.is_dir() and mine.is_dir()
        folders.remove(mine)
        assert not mine.exists()
    finally:
        for process in (live, holder):
            process.kill()
            process.wait()
    assert live_folder.is_dir()  # SIGKILL leaves it, for the next start to sweep
    assert sorted(folders.sweep("spam-test-", tmp_path)) == sorted([locked, live_folder])
    assert [p.name for p in tmp_path.iterdir()] == ["someone-elses-folder"]
