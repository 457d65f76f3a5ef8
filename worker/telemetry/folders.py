"""Per-worker scratch folders (the stats folder on tmpfs, the Prometheus multiprocess folder): private
to one worker, removed whenever its main process exits, swept by a later start when it never did.

Celery's worker blueprint never calls a bootstep's ``shutdown``, and a start that fails skips every
step's ``stop``, so removal hangs on the main process's own exit (``atexit``): a warm shutdown,
SIGTERM, SIGINT and a failed start all end in one. SIGTERM would not, while Celery has not yet
installed its handlers (a threads-pool worker loads its models before): until then a SIGTERM exits
through ``SystemExit``. What still escapes (SIGKILL, a power cut) is swept by the next start.

A folder's name carries its owner's pid (``spam-worker-4242-abcd``) and the owner holds an exclusive
``flock`` on it for its lifetime (prefork children share it). A sweep removes a folder only when both
say its owner is gone: a live owner in another PID namespace still holds the lock, and one that is
between creating its folder and locking it still has a live pid. A folder of this very pid is a
leftover of the process image this one replaced (Celery's SIGHUP restart execs in place).
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_owned: dict[Path, int] = {}  # folder -> the fd holding its lock
_owner_pid = 0


def make(prefix: str, base: str | Path | None = None) -> Path:
    """A new private folder ``<base>/<prefix><pid>-<random>``, after sweeping dead workers' ones."""
    global _owner_pid
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    swept = sweep(prefix, base)
    if swept:
        log.info("removed %d folder(s) of workers that are gone: %s", len(swept), ", ".join(map(str, swept)))
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if _owner_pid != os.getpid():
        _owner_pid = os.getpid()
        atexit.register(remove_all)
        _exit_cleanly_on_sigterm()
    _owned[folder] = fd
    log.info("using %s (removed when this worker exits)", folder)
    return folder


def remove(folder: Path) -> None:
    fd = _owned.pop(folder, None)
    if fd is not None:
        os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)


def remove_all() -> None:
    """Remove every folder this process made; only in that process (a forked child inherits the hook)."""
    if os.getpid() != _owner_pid:
        return
    for folder in list(_owned):
        remove(folder)


def sweep(prefix: str, base: str | Path | None = None) -> list[Path]:
    """Remove the ``<prefix><pid>-*`` folders in ``base`` whose owner is gone; the ones removed."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    removed = []
    for folder in Path(base or tempfile.gettempdir()).glob(f"{prefix}*"):
        match = pattern.match(folder.name)
        if not match or not folder.is_dir() or folder in _owned:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner holds it: alive, seen from another PID namespace
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exit_cleanly_on_sigterm() -> None:
    """Until Celery installs its own handler, SIGTERM exits through ``SystemExit`` (so ``atexit``
    runs) instead of the default, which ends the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
