"""Roll a new model version onto a running worker: no restart, nothing lost, a bad version refused.

Like Triton's explicit model control. The remote control command ``reload_models`` (``python -m
producer reload``, or ``celery -A worker control reload_models``) makes the worker read its model,
adapter and prompt-file settings again, as a start would (the environment, then ``.env``), and:

- answers at once with a reload id; ``reload_status`` gives the outcome per model when it is done:
  ``unchanged`` (same ``model_version``, no work), ``switched`` (old → new version, seconds to
  prepare, seconds until every serving process used it) or ``refused`` (one line: the new version
  cannot load, and the old one keeps serving);
- prepares each changed model in a thread of the main process while the old version serves. A
  threads or solo worker loads it as a start does (the snapshot built once per host under its lock
  in ``SNAPSHOT_DIR``, every adapter tensor verified, the warm-up pass). A prefork worker's main
  process only builds what its children will load and checks what it can without materialising the
  model (the adapter, the tokenizer, the prompt's labels), on the CPU: it never touches CUDA, and
  holds no copy of the model;
- switches every serving process between tasks: a threads or solo worker swaps the prepared model
  in; each prefork child, watching a counter shared at fork, loads the new version in a thread while
  it keeps serving, then swaps. A task that started scoring finishes on the model it started with.
  A child forked later loads the new version.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from celery.worker.control import control_command

from worker.errors import ModelLoadError, first_line
from worker.lifecycle import builds
from worker.lifecycle.registry import LOAD_LOCK, load_classifier, registry
from worker.settings import MODEL_FIELDS, Settings
from worker.telemetry.stats import process_stats, read_figures

log = logging.getLogger(__name__)

_POLL_S = 0.2
_UNMERGED = {"serve_unmerged": True}
"""How a reload loads (where the strategy can): the new adapter over the converted base until its
merged snapshot is built, then the snapshot (:func:`worker.lifecycle.builds.finish`)."""
_SOURCES = "reload-sources"  # not *.json: those are the processes' figures


@dataclass
class _Worker:
    """The main process's view, set up by :func:`install` before any fork."""

    settings: Settings | None = None
    forks: bool = False
    folder: Path = Path()
    live_pids: Callable[[], set[int]] = set
    generation: Any = None  # multiprocessing.Value shared with the children
    reloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_worker = _Worker()


def install(settings: Settings, forks: bool, folder: Path, live_pids: Callable[[], set[int]]) -> None:
    """Called by the start-up bootstep in the main process; ``folder`` is the stats folder (tmpfs)."""
    _worker.settings, _worker.forks, _worker.folder, _worker.live_pids = settings, forks, folder, live_pids
    if forks:
        _worker.generation = multiprocessing.get_context("fork").Value(ctypes.c_int, 0)


def current_settings(settings: Settings) -> Settings:
    """The settings a process loads with now: the start's, or those of the last reload."""
    return _worker.settings or settings


# --- the commands ------------------------------------------------------------------------------------


@control_command(args=[("model", str)], signature="[model=all]")
def reload_models(state, model: str = "all") -> dict:
    """Start a reload of ``model`` (koelectra, exaone or all); answers at once with its id."""
    names = _requested(model)
    if isinstance(names, str):
        return {"error": names}
    if not _worker.lock.acquire(blocking=False):
        running = next((k for k, v in _worker.reloads.items() if not v["done"]), "?")
        return {"error": f"reload {running} is still running"}
    reload_id = uuid.uuid4().hex[:8]
    _worker.reloads[reload_id] = {"done": False, "models": {}, "started": time.time()}
    threading.Thread(target=_run, args=(reload_id, names), name=f"reload-{reload_id}", daemon=True).start()
    return {"reload": reload_id, "models": names}


@control_command(args=[("reload_id", str)], signature="<reload_id>")
def reload_status(state, reload_id: str) -> dict:
    """The outcome of reload ``reload_id`` so far (``done`` once every model has one)."""
    return _worker.reloads.get(reload_id) or {"error": f"no reload {reload_id!r} on this worker"}


def _requested(model: str) -> list[str] | str:
    loaded = list(_worker.settings.preload_models) if _worker.settings else []
    if model == "all":
        return loaded
    if model not in loaded:
        return f"model {model!r} is not loaded by this worker (loaded: {', '.join(loaded) or 'none'})"
    return [model]


# --- the main process ----------------------------------------------------------------------------------


def _run(reload_id: str, names: list[str]) -> None:
    record = _worker.reloads[reload_id]
    try:
        try:
            fresh = _worker.settings.with_models_reread()
        except ValueError as exc:
            record["models"] = {n: {"outcome": "refused", "error": f"invalid setting {exc}"} for n in names}
            return
        served = _served_versions()
        prepared: dict[str, Any] = {}  # name -> the prepared classifier (None where the children load it)
        for name in names:
            record["models"][name], classifier = _prepare(name, fresh, served.get(name, set()))
            if record["models"][name]["outcome"] == "prepared":
                prepared[name] = classifier
        gc.collect()  # a prefork worker's main process drops what it prepared
        if prepared:
            _switch(fresh, prepared, record["models"])
    except Exception as exc:  # noqa: BLE001 - the command must answer, whatever went wrong
        log.exception("reload %s failed", reload_id)
        for outcome in record["models"].values():
            if outcome.get("outcome") in ("prepared", None):
                outcome.update(outcome="failed", error=f"{type(exc).__name__}: {first_line(exc)}")
    finally:
        record["done"] = True
        _worker.lock.release()
        for name, outcome in record["models"].items():
            outcome["line"] = _describe(name, outcome)
            log.info("reload %s: %s", reload_id, outcome["line"])


def _prepare(name: str, fresh: Settings, served: set[str]) -> tuple[dict[str, Any], Any]:
    """Build and check ``name``'s new version (or find it unchanged) while the old one serves: the
    outcome so far, and the classifier to swap in (None in a prefork worker)."""
    old = ", ".join(sorted(served)) or "?"
    start = time.perf_counter()
    settings = replace(_worker.settings, **{f: getattr(fresh, f) for f in MODEL_FIELDS if f.startswith(name)})
    try:
        version = _version_of(name, settings)
        if served == {version}:
            return {"outcome": "unchanged", "old": version, "new": version}, None
        if _worker.forks:  # build and check on the CPU (no CUDA before a fork); each child then loads it
            from worker.loading import get_loader

            prepare = replace(settings, device="cpu", torch_dtype=_served_dtype(name))
            with LOAD_LOCK:
                classifier, version = None, get_loader(prepare, **_UNMERGED).prepare(settings.source(name))
        else:
            classifier = load_classifier(name, settings, **_UNMERGED)
            version = classifier.version
    except ModelLoadError as exc:
        return {"outcome": "refused", "old": old, "error": str(exc)}, None
    except Exception as exc:  # noqa: BLE001 - any failure to prepare is a refusal, never a crash
        return {"outcome": "refused", "old": old, "error": f"cannot load model {name!r}: {type(exc).__name__}: "
                f"{first_line(exc)}"}, None
    outcome = {"outcome": "prepared", "old": old, "new": version, "prepare_s": round(time.perf_counter() - start, 3)}
    return outcome, classifier


def _switch(fresh: Settings, prepared: dict[str, Any], outcomes: dict[str, dict[str, Any]]) -> None:
    """Make every serving process serve the prepared versions, then fill in their outcomes."""
    fields = {f: getattr(fresh, f) for f in MODEL_FIELDS if any(f.startswith(n) for n in prepared)}
    _worker.settings = replace(_worker.settings, **fields)  # what a child forked from now on loads
    start = time.perf_counter()
    if _worker.forks:
        generation = _worker.generation.value + 1
        payload = {"generation": generation, "fields": {f: getattr(_worker.settings, f) for f in MODEL_FIELDS},
                   "versions": {n: outcomes[n]["new"] for n in prepared}}
        tmp = _worker.folder / f".{_SOURCES}.tmp"
        tmp.write_text(json.dumps(payload))
        tmp.replace(_worker.folder / _SOURCES)
        _worker.generation.value = generation
        failures = _wait_for_children(generation, payload["versions"], _worker.settings.load_timeout_s)
    else:
        for name, classifier in prepared.items():
            registry.swap(name, classifier)
        process_stats.record_reload(0, "switched", time.perf_counter() - start)
        builds.finish(_worker.settings)
        failures = {}
    seconds = round(time.perf_counter() - start, 3)
    for outcome in (outcomes[n] for n in prepared):
        if failures:
            outcome.update(outcome="failed", error="; ".join(sorted(set(failures.values()))))
        else:
            outcome.update(outcome="switched", switch_s=seconds)


def _wait_for_children(generation: int, versions: dict[str, str], timeout: float) -> dict[int, str]:
    """Wait until every live child serves ``versions``; returns {pid: error} of children that could not."""
    deadline = time.monotonic() + timeout
    while True:
        figures = _process_figures()
        failures = {pid: f.get("reload_error", "failed") for pid, f in figures.items()
                    if f.get("reload_generation") == generation and f.get("reload_outcome") == "failed"}
        pending = [pid for pid, f in figures.items()
                   if any(f.get("models", {}).get(name, {}).get("version") != version
                          for name, version in versions.items())]
        if failures or (figures and not pending):
            return failures
        if time.monotonic() > deadline:
            return {pid: f"still on the old version after {timeout:.0f}s (LOAD_TIMEOUT_S)" for pid in pending}
        time.sleep(_POLL_S)


def _process_figures() -> dict[int, dict[str, Any]]:
    """{pid: figures} of the live serving processes, from the files they publish."""
    return read_figures(_worker.folder, _worker.live_pids())


def _served_versions() -> dict[str, set[str]]:
    served: dict[str, set[str]] = {}
    for figures in _process_figures().values():
        for name, model in figures.get("models", {}).items():
            served.setdefault(name, set()).add(model.get("version"))
    return served


def _served_dtype(name: str) -> str:
    dtypes = {f["models"][name]["dtype"] for f in _process_figures().values() if name in f.get("models", {})}
    return dtypes.pop() if len(dtypes) == 1 else _worker.settings.torch_dtype


def _version_of(name: str, settings: Settings) -> str:
    """The ``model_version`` a load with ``settings`` would give, from its small files alone."""
    from worker.lifecycle.versions import model_version
    from worker.loading import plan as planning

    return model_version(planning.resolve(settings.source(name), settings), settings)


def _describe(name: str, outcome: dict[str, Any]) -> str:
    """The outcome as one line, the one ``python -m producer reload`` prints."""
    kind = outcome.get("outcome")
    if kind == "switched":
        return f"{name} {outcome['old']} -> {outcome['new']} (prepared in {outcome['prepare_s']:.1f} s, " \
               f"every process {outcome['switch_s']:.1f} s later)"
    if kind == "unchanged":
        return f"{name} unchanged ({outcome['new']})"
    return f"{name} {kind}, still serving {outcome.get('old', '?')}: {outcome.get('error', '')}"


# --- a prefork child ------------------------------------------------------------------------------------


def watch(settings: Settings) -> None:
    """In a prefork child after its load: switch to each new version the main process publishes."""
    if _worker.generation is None:
        return
    threading.Thread(target=_follow, args=(settings, _worker.generation.value), name="reload-watch",
                     daemon=True).start()


def _follow(settings: Settings, seen: int) -> None:
    while True:
        time.sleep(_POLL_S)
        generation = _worker.generation.value
        if generation == seen:
            continue
        seen = generation
        start = time.perf_counter()
        try:
            payload = json.loads((_worker.folder / _SOURCES).read_text())
            settings = replace(settings, **payload["fields"])
            for name, version in payload["versions"].items():
                if registry.has(name) and registry.get(name).version != version:
                    registry.swap(name, load_classifier(name, settings, **_UNMERGED))
        except Exception as exc:  # noqa: BLE001 - report it and keep serving the old version
            line = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {first_line(exc)}"
            log.error("reload: this process keeps its old version: %s", line)
            process_stats.record_reload(generation, "failed", time.perf_counter() - start, line)
            continue
        process_stats.record_reload(generation, "switched", time.perf_counter() - start)
        builds.finish(settings)
