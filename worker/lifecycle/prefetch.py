"""Read the weight files into the page cache while the heavy libraries are being imported.

Importing torch, transformers and PEFT costs seconds of CPU; reading a multi-GB snapshot costs
seconds of disk. Started in a thread before the imports, the read overlaps them, and the loader
then maps pages that are already in memory. This module is torch-free and only guesses which files
the loader will want (the newest complete snapshot of each model with the configured quantization,
else the checkpoint's safetensors files); a wrong guess costs a read, never correctness.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from worker.settings import Settings

log = logging.getLogger(__name__)

_CHUNK = 16 << 20
_MANIFEST = "snapshot.json"  # worker.loading.snapshot_loader.MANIFEST, named here to stay torch-free


def weight_files(settings: Settings) -> list[Path]:
    """The files the next load will most likely read, for every preloaded model."""
    files: list[Path] = []
    for name in settings.preload_models:
        quantization = settings.quantization_for(name)
        snapshots = []
        for manifest in settings.snapshot_path.glob(f"{name}-*/{_MANIFEST}"):
            try:
                content = json.loads(manifest.read_text())
                if content.get("quantization") == quantization:
                    snapshots.append((manifest.stat().st_mtime, [manifest.parent / f for f in content["files"]]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        if settings.model_loader == "snapshot" and snapshots:
            files += max(snapshots)[1]
            continue
        model = Path(settings.source(name).model)
        if model.is_dir():
            files += sorted(model.glob("*.safetensors"))
    return [f for f in files if f.is_file()]


def start(settings: Settings) -> threading.Thread | None:
    """Begin reading in a daemon thread; skipped when the files would not fit in free memory."""
    files = weight_files(settings)
    if not files or sum(f.stat().st_size for f in files) > 0.8 * _available_bytes():
        return None
    # One reader, to leave the disk to the imports' own reads: with 16 readers, bench/load.py measured
    # cold imports of 11.6 s against 8.8 s without prefetch (docs/bench-load-2026-11-28b.txt); with
    # one, 10.4 s against 10.2 s (docs/bench-load-2026-11-28.txt). The loader, which waits, uses 16.
    return read_in_background(files, threads=1)


def read_in_background(files: list[Path], threads: int = 16) -> threading.Thread:
    """:func:`read_into_cache` in a daemon thread; join it to wait for the bytes."""
    thread = threading.Thread(target=_read, args=(files, threads), name="read-weights", daemon=True)
    thread.start()
    return thread


def _read(files: list[Path], threads: int) -> None:
    start = time.perf_counter()
    try:
        read_into_cache(files, threads)
    except OSError as exc:  # the loader will report a real problem with these files
        log.debug("read-ahead stopped: %s", exc)
        return
    log.debug("read %.2f GB of weights into the page cache in %.2fs", sum(f.stat().st_size for f in files) / 1e9,
              time.perf_counter() - start)


def read_into_cache(files: list[Path], threads: int = 16) -> None:
    """Bring whole files into the page cache as fast as the disk allows.

    Each file is mapped and populated with ``MADV_POPULATE_READ`` (Linux 5.14+): the kernel reads
    straight into the page cache and nothing is copied to user memory; ``threads`` populate 64 MB
    slices so the disk sees many requests at once. On this project's VM, reading a 4.8 GB snapshot
    cold took 2.0-3.7 s with 16 threads against 2.5-5.8 s with one (alternating runs, the disk's
    speed drifting), 5.5-6.3 s with ``read()`` into a buffer and ~11 s through the page faults of a
    first forward pass; Run:ai's streamer took 2.3-6.4 s, into private memory.
    The calls go through ctypes, which releases the GIL, so imports and model construction go on
    meanwhile. Where mapping is not possible it falls back to plain reads.
    """
    with ThreadPoolExecutor(threads, thread_name_prefix="read-weights") as pool:
        for file in files:
            if not _populate(file, pool):
                _read_through(file)


_PROT_READ, _MAP_SHARED, _MADV_POPULATE_READ = 1, 1, 22
_SLICE = 64 << 20
_libc = None


def _populate(file: Path, pool: ThreadPoolExecutor) -> bool:
    libc = _load_libc()
    size = file.stat().st_size
    if libc is None or size == 0:
        return size == 0
    fd = os.open(file, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return False
        try:
            slices = [(addr + offset, min(_SLICE, size - offset)) for offset in range(0, size, _SLICE)]
            return all(pool.map(lambda piece: _advise(libc, *piece), slices))
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _advise(libc, addr: int, length: int) -> bool:
    while libc.madvise(addr, length, _MADV_POPULATE_READ) != 0:
        if ctypes.get_errno() != errno.EINTR:  # a signal repeats the slice; anything else gives up
            return False
    return True


def _load_libc():
    global _libc
    if _libc is None and sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def _read_through(file: Path) -> None:
    buffer = memoryview(bytearray(_CHUNK))
    with file.open("rb", buffering=0) as fh:
        while fh.readinto(buffer):
            pass


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
