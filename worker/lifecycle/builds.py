"""Snapshot builds a serving process runs in the background: a first start serves from the checkpoint
(or a reload from the unmerged adapter) while its snapshot is built, then switches to it."""

from __future__ import annotations

import logging
import threading
import time

from worker.errors import first_line
from worker.lifecycle.registry import LOAD_LOCK, load_classifier, registry
from worker.settings import Settings

log = logging.getLogger(__name__)


def finish(settings: Settings) -> None:
    """In a serving process after its load: build the snapshots its first start deferred (it serves
    from the checkpoint meanwhile), then switch to them, memory-mapped and shared. A reload that
    switched the model in the meantime wins: its version is not replaced."""
    for name in settings.preload_models:
        if registry.has(name) and registry.get(name).loaded.finish is not None:
            threading.Thread(target=_finish, args=(name, settings), name=f"snapshot-{name}", daemon=True).start()


def _finish(name: str, settings: Settings) -> None:
    started = registry.get(name)
    start = time.perf_counter()
    try:
        with LOAD_LOCK:
            started.loaded.finish()
        classifier = load_classifier(name, settings)
    except Exception as exc:  # noqa: BLE001 - it keeps serving from the checkpoint
        log.error("%s: the snapshot could not be built; serving from the checkpoint: %s", name, first_line(exc))
        return
    if registry.get(name) is started:
        registry.swap(name, classifier)
        log.info("%s now serves from its snapshot, built in %.1fs", name, time.perf_counter() - start)
