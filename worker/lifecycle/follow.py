"""A prefork child's side of a rollout: reconcile itself with what the main process publishes.

Each child runs one thread that polls the published generation (:mod:`worker.lifecycle.desired`);
on a new one it makes itself match the newest state, whatever generations it missed:

- a ``candidate`` it does not serve yet: load it beside the version it serves, keep it, report
  ``ready`` (or ``failed`` with one line); serving goes on meanwhile;
- ``serve`` versions it does not serve: swap the prepared candidate in (or load it first);
- no candidate any more: drop what it prepared (the reload was refused elsewhere);
- ``built``: a model it serves before its snapshot existed switches to the snapshot.

A child starts following from the generation whose settings it loaded at fork, so a child that
finishes loading after a switch still switches.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from worker.errors import ModelLoadError, first_line
from worker.lifecycle.registry import load_classifier, registry, release_memory
from worker.telemetry.stats import process_stats

if TYPE_CHECKING:
    from worker.lifecycle.desired import Board, Desired
    from worker.serving.classifiers import SpamClassifier
    from worker.settings import Settings

log = logging.getLogger(__name__)

_POLL_S = 0.2


def start(board: Board, settings: Settings, seen: int) -> None:
    """Follow ``board`` from generation ``seen`` on; ``settings``: what this child loaded."""
    threading.Thread(target=_follow, args=(board, settings, seen), name="reload-follow", daemon=True).start()


def _follow(board: Board, settings: Settings, seen: int) -> None:
    pending: dict[str, SpamClassifier] = {}
    started: dict[str, float] = {}  # reload id -> when this child first saw it
    while True:
        time.sleep(_POLL_S)
        if board.generation == seen:
            continue
        desired = board.read()
        if desired is None or desired.generation == seen:
            continue
        seen = desired.generation
        begin = started.setdefault(desired.reload, time.perf_counter())
        try:
            outcome = reconcile(settings, desired, pending)
        except Exception as exc:  # noqa: BLE001 - report it and keep serving what this process serves
            line = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {first_line(exc)}"
            log.error("reload: this process keeps the version it serves: %s", line)
            pending.clear()
            release_memory()
            process_stats.record_reload(seen, "failed", time.perf_counter() - begin, line)
            continue
        if outcome:
            process_stats.record_reload(seen, outcome, time.perf_counter() - begin)


def reconcile(base: Settings, desired: Desired, pending: dict[str, SpamClassifier]) -> str:
    """Make this process match ``desired``; the outcome to report (``ready``, ``switched``), or ''."""
    outcome = ""
    if desired.candidate is not None:
        candidate = replace(base, **desired.candidate.fields)
        for name, version in desired.candidate.versions.items():
            if not registry.has(name) or not version or registry.get(name).version == version:
                continue
            if name not in pending or pending[name].version != version:
                pending[name] = _load(name, candidate, version)
        outcome = "ready"
    serve = replace(base, **desired.serve.fields)
    for name, version in desired.serve.versions.items():
        if not registry.has(name) or not version or registry.get(name).version == version:
            continue
        prepared = pending.pop(name, None)
        registry.swap(name, prepared if prepared is not None and prepared.version == version else
                      _load(name, serve, version))
        outcome = "switched"
    if desired.candidate is None and pending:
        pending.clear()  # a reload refused elsewhere: drop what this process prepared
        release_memory()
    for name in desired.built:
        current = registry.get(name) if registry.has(name) else None
        if current is not None and current.loaded.finish is not None:
            registry.swap(name, load_classifier(name, serve), replacing=current)
            log.info("%s now serves from its snapshot", name)
    return outcome


def _load(name: str, settings: Settings, version: str) -> SpamClassifier:
    classifier = load_classifier(name, settings, serve_unmerged=True)
    if classifier.version != version:
        raise ModelLoadError(name, f"its files changed after the reload checked them: loaded {classifier.version}, "
                             f"expected {version}")
    return classifier
