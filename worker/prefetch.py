"""Read the weight files into the page cache while the heavy libraries are being imported.

Importing torch, transformers and PEFT costs seconds of CPU; reading a multi-GB snapshot costs
seconds of disk. Started in a thread before the imports, the read overlaps them, and the loader
then maps pages that are already in memory. This module is torch-free and only guesses which files
the loader will want (the newest complete snapshot of each model, else the checkpoint's safetensors
files); a wrong guess costs a read, never correctness.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from worker.settings import Settings

log = logging.getLogger(__name__)

_CHUNK = 16 << 20
_MANIFEST = "snapshot.json"  # worker.loading.snapshot_loader.MANIFEST, named here to stay torch-free


def weight_files(settings: Settings) -> list[Path]:
    """The files the next load will most likely read, for every preloaded model."""
    files: list[Path] = []
    for name in settings.preload_models:
        snapshots = [m.parent for m in settings.snapshot_path.glob(f"{name}-*/{_MANIFEST}")]
        if settings.model_loader == "snapshot" and snapshots:
            newest = max(snapshots, key=lambda folder: (folder / _MANIFEST).stat().st_mtime)
            try:
                files += [newest / f for f in json.loads((newest / _MANIFEST).read_text())["files"]]
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pass
        model = Path(settings.source(name).model)
        if model.is_dir():
            files += sorted(model.glob("*.safetensors"))
    return [f for f in files if f.is_file()]


def start(settings: Settings) -> threading.Thread | None:
    """Begin reading in a daemon thread; skipped when the files would not fit in free memory."""
    files = weight_files(settings)
    total = sum(f.stat().st_size for f in files)
    if not files or total > 0.8 * _available_bytes():
        return None
    thread = threading.Thread(target=_read, args=(files, total), name="prefetch-weights", daemon=True)
    thread.start()
    return thread


def _read(files: list[Path], total: int) -> None:
    start = time.perf_counter()
    buffer = memoryview(bytearray(_CHUNK))
    try:
        for file in files:
            with file.open("rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass
    except OSError as exc:  # the loader will report a real problem with these files
        log.debug("prefetch stopped: %s", exc)
        return
    log.info("prefetched %.2f GB of weights in %.2fs", total / 1e9, time.perf_counter() - start)


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
