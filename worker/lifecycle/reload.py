"""Roll a new model version onto a running worker: no restart, nothing lost, a bad version refused
and left nowhere.

Like Triton's explicit model control. The remote control command ``reload_models`` (``python -m
producer reload``, or ``celery -A worker control reload_models``) makes the worker read its model,
adapter and prompt-file settings again, as a start would (the environment, then ``.env``), resolve
them to real paths once (:mod:`worker.lifecycle.pinning`), and:

- answers at once with a reload id (or ``skipped`` when it does not load the model asked for);
  ``reload_status`` gives the outcome per model when it is done: ``unchanged`` (same
  ``model_version``, no work), ``switched`` (old -> new version, seconds to prepare, seconds until
  every serving process used it) or ``refused`` (one line: why, and that every process still serves
  the old version);
- builds what the new version is served from when it is missing (the converted base a new plain
  LoRA adapter is served over at first, or the merged snapshot of any other adapter), in a builder
  process on the CPU (:mod:`worker.lifecycle.builder`): the main process of a prefork worker does no
  model work while it can fork;
- checks the new version in every serving process before any switches: a threads or solo worker
  loads it in a thread, as a start does (warm-up pass included), while the old one serves; each
  child of a prefork worker prepares it the same way beside the version it serves and reports ready;
- switches only when every serving process is ready, between tasks (a task that started scoring
  finishes on the model it started with); if one is not, none switches: each drops what it prepared,
  and the reload is refused. The accepted version, which a process forked later loads, changes only
  once every process serves the new one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from celery.worker.control import control_command

from worker.errors import ModelLoadError, first_line
from worker.lifecycle import builds
from worker.lifecycle.fleet import fleet
from worker.lifecycle.pinning import describe, model_fields, pinned_fields
from worker.settings import MODEL_NAMES, Settings
from worker.telemetry.stats import process_stats

log = logging.getLogger(__name__)

_POLL_S = 0.2
_reloads: dict[str, dict[str, Any]] = {}


# --- the commands ------------------------------------------------------------------------------------


@control_command(args=[("model", str)], signature="[model=all]")
def reload_models(state, model: str = "all") -> dict:
    """Start a reload of ``model`` (koelectra, exaone or all); answers at once with its id."""
    loaded = fleet.loaded_models()
    if model != "all" and model not in MODEL_NAMES:
        return {"error": f"unknown model {model!r} (choose all, {', '.join(MODEL_NAMES)})"}
    if model != "all" and model not in loaded:
        return {"skipped": f"this worker does not load {model} (it loads {', '.join(loaded) or 'nothing'})"}
    names = loaded if model == "all" else [model]
    if not fleet.reload_lock.acquire(blocking=False):
        running = next((k for k, v in _reloads.items() if not v["done"]), "?")
        return {"error": f"reload {running} is still running"}
    reload_id = uuid.uuid4().hex[:8]
    _reloads[reload_id] = {"done": False, "models": {}, "started": time.time()}
    threading.Thread(target=_run, args=(reload_id, names), name=f"reload-{reload_id}", daemon=True).start()
    return {"reload": reload_id, "models": names}


@control_command(args=[("reload_id", str)], signature="<reload_id>")
def reload_status(state, reload_id: str) -> dict:
    """The outcome of reload ``reload_id`` so far (``done`` once every model has one)."""
    return _reloads.get(reload_id) or {"error": f"no reload {reload_id!r} on this worker"}


# --- the main process ----------------------------------------------------------------------------------


def _run(reload_id: str, names: list[str]) -> None:
    outcomes = _reloads[reload_id]["models"]
    configured: Settings | None = None
    try:
        configured = fleet.settings.with_models_reread()
        served = fleet.served_versions()
        candidate = replace(fleet.accepted_settings, **pinned_fields(configured, tuple(names)))
        changed: dict[str, str] = {}  # name -> its new version
        for name in names:
            old = ", ".join(sorted(served.get(name, set()))) or "?"
            try:
                version = _version_of(name, candidate)
            except ModelLoadError as exc:
                outcomes[name] = {"outcome": "refused", "old": old, "error": str(exc)}
                continue
            if served.get(name) == {version}:
                outcomes[name] = {"outcome": "unchanged", "old": version, "new": version}
            else:
                outcomes[name] = {"outcome": "checking", "old": old}
                changed[name] = version
        if changed:
            _reload(reload_id, candidate, changed, outcomes)
    except ValueError as exc:  # a setting that does not parse
        for name in names:
            outcomes.setdefault(name, {}).update(outcome="refused", error=f"invalid setting {exc}")
    except Exception as exc:  # noqa: BLE001 - the command must answer, whatever went wrong
        log.exception("reload %s failed", reload_id)
        for name in names:
            if outcomes.get(name, {}).get("outcome") not in ("unchanged", "switched", "refused"):
                outcomes.setdefault(name, {}).update(outcome="refused",
                                                     error=f"{type(exc).__name__}: {first_line(exc)}")
    finally:
        for name, outcome in outcomes.items():
            if outcome.get("outcome") == "refused" and configured is not None:
                outcome["revert"] = _revert_hint(configured, name)
            outcome["line"] = _describe(name, outcome)
            log.info("reload %s: %s", reload_id, outcome["line"])
        _reloads[reload_id]["done"] = True
        fleet.reload_lock.release()


def _reload(reload_id: str, candidate: Settings, changed: dict[str, str], outcomes: dict[str, dict[str, Any]]) -> None:
    """Build what each changed model's new version is served from, if anything, then switch every
    serving process to those versions that loaded (each process loads and checks it before any
    switches)."""
    start = time.perf_counter()
    prepared: dict[str, Any] = {}  # name -> the classifier to swap in (threads/solo)
    versions: dict[str, str] = {}
    for name, version in changed.items():
        try:
            versions[name] = _build_first(name, candidate, version)
            if not fleet.forks:  # this process serves: load it here, as a start would
                from worker.lifecycle.registry import load_classifier

                prepared[name] = load_classifier(name, candidate, serve_unmerged=True)
                versions[name] = prepared[name].version
        except ModelLoadError as exc:
            outcomes[name].update(outcome="refused", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure to prepare is a refusal, never a crash
            outcomes[name].update(outcome="refused", error=f"cannot load model {name!r}: {type(exc).__name__}: "
                                  f"{first_line(exc)}")
        else:
            outcomes[name].update(new=versions[name], prepare_s=round(time.perf_counter() - start, 3))
    passed = [n for n in changed if n in versions]
    if not passed:
        return
    # Only the models that passed change; the others keep their accepted files.
    settings = replace(fleet.accepted_settings, **{f: getattr(candidate, f) for f in model_fields(passed)})
    switch_start = time.perf_counter()
    error = _switch_children(reload_id, settings, passed, versions) if fleet.forks else \
        _switch_in_process(settings, passed, versions, prepared)
    seconds = round(time.perf_counter() - switch_start, 3)
    for name in passed:
        if error:
            outcomes[name].update(outcome="refused", error=error)
        else:
            outcomes[name].update(outcome="switched", switch_s=seconds)


def _build_first(name: str, candidate: Settings, version: str) -> str:
    """The new version's ``model_version`` (``version``, already computed from its files), once what
    its load reads exists: the converted base a plain LoRA adapter is served over (or the merged
    snapshot of any other), built by a builder process when it is missing, on the CPU in the dtype
    the model is served in. Deciding reads small files and headers only: nothing here touches a
    model or CUDA."""
    from worker.loading import get_loader

    cpu = replace(candidate, torch_dtype=fleet.served_dtype(name), device="cpu")
    if get_loader(cpu, serve_unmerged=True).prepared(cpu.source(name)):
        return version
    return builds.run(name, cpu, fleet.settings.load_timeout_s, unmerged=True)


def _switch_in_process(settings: Settings, names: list[str], versions: dict[str, str],
                       prepared: dict[str, Any]) -> str:
    from worker.lifecycle.registry import registry

    start = time.perf_counter()
    with fleet.lock:
        for name in names:
            registry.swap(name, prepared.pop(name))
        fleet.accept(settings, versions, names)
    process_stats.record_reload(0, "switched", time.perf_counter() - start)
    return ""


def _switch_children(reload_id: str, settings: Settings, names: list[str], versions: dict[str, str]) -> str:
    """Two phases: every live child prepares the new version and reports ready, then every child
    switches. Returns an error line when the fleet did not switch (none serves the new version)."""
    timeout = fleet.settings.load_timeout_s
    old_settings = fleet.accepted_settings
    old_versions = dict(fleet.versions)
    for name, versions_served in fleet.served_versions().items():
        if len(versions_served) == 1:
            old_versions.setdefault(name, next(iter(versions_served)))
    target = fleet.target(settings, {**old_versions, **versions})
    with fleet.lock:
        fleet.versions.update({n: v for n, v in old_versions.items() if n not in fleet.versions})
        fleet.candidate = target
        prepare = fleet.publish(reload_id)
    error = _wait(lambda f: _reported(f, prepare), timeout, "prepare the new version")
    if error:
        with fleet.lock:
            fleet.candidate = None
            fleet.publish(reload_id)  # every child drops what it prepared
        return error
    with fleet.lock:
        fleet.candidate = None
        fleet.accept(settings, versions, names)
        fleet.publish(reload_id)
    error = _wait(lambda f: _serves(f, versions) or _failed_at_or_after(f, prepare), timeout, "switch")
    if error:  # a child could not switch (one forked between the phases): every process goes back
        with fleet.lock:
            fleet.accept(old_settings, {n: old_versions.get(n, "") for n in names}, names)
            fleet.publish(reload_id)
        _wait(lambda f: _serves(f, {n: old_versions[n] for n in names if old_versions.get(n)}), timeout, "go back")
        return f"{error}; every process went back to the old version"
    return ""


def _reported(figures: dict[str, Any], generation: int) -> bool | str:
    """True when a child is ready for ``generation`` (or a later one of the same reload, published
    when a build ended meanwhile); its error line when it could not prepare."""
    return _failed_at_or_after(figures, generation) or \
        ((figures.get("reload_generation") or 0) >= generation and figures.get("reload_outcome") == "ready")


def _serves(figures: dict[str, Any], versions: dict[str, str]) -> bool:
    models = figures.get("models", {})
    return all(models.get(name, {}).get("version") == version for name, version in versions.items())


def _failed_at_or_after(figures: dict[str, Any], generation: int) -> bool | str:
    if (figures.get("reload_generation") or 0) >= generation and figures.get("reload_outcome") == "failed":
        return figures.get("reload_error", "failed")
    return False


def _wait(check, timeout: float, what: str) -> str:
    """Wait until ``check`` is true for every live serving process (one forked meanwhile included);
    an error line when one reports a failure or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        live = fleet.live_pids()
        figures = fleet.figures()
        results = {pid: check(figures[pid]) if pid in figures else False for pid in live}
        failures = sorted({r for r in results.values() if isinstance(r, str)})
        if failures:
            return f"a worker process could not {what}: {'; '.join(failures)}"
        if live and all(r is True for r in results.values()):
            return ""
        if time.monotonic() > deadline:
            pending = sorted(pid for pid, r in results.items() if r is not True)
            return f"worker processes {pending} did not {what} within {timeout:.0f}s (LOAD_TIMEOUT_S)"
        time.sleep(_POLL_S)


def _version_of(name: str, settings: Settings) -> str:
    """The ``model_version`` a load with ``settings`` would give, from its small files alone."""
    from worker.lifecycle.versions import model_version
    from worker.loading import plan as planning

    return model_version(planning.resolve(settings.source(name), settings), settings)


def _revert_hint(configured: Settings, name: str) -> str:
    """What to point the settings back at, when they now name files the worker refused: a fresh start
    reads the settings, and would fail on them."""
    accepted = fleet.accepted_settings
    differs = [f for f, value in pinned_fields(configured, (name,)).items() if value != getattr(accepted, f)]
    if not differs:
        return ""
    back = ", ".join(f"{f.upper()} at {getattr(accepted, f) or '(empty)'}" for f in differs)
    return f"the settings name {describe(configured, differs)}, which a fresh start would load: point {back} " \
        f"before the next restart"


def _describe(name: str, outcome: dict[str, Any]) -> str:
    """The outcome as one line, the one ``python -m producer reload`` prints."""
    kind = outcome.get("outcome")
    if kind == "switched":
        return f"{name} {outcome['old']} -> {outcome['new']} (prepared in {outcome['prepare_s']:.1f} s, " \
               f"every process {outcome['switch_s']:.1f} s later)"
    if kind == "unchanged":
        return f"{name} unchanged ({outcome['new']})"
    old = outcome.get("old", "?")
    line = f"{name} {kind}, still serving {old}: {outcome.get('error', '')}; every process serves {old}, as will " \
           f"any that restarts"
    return f"{line}; {outcome['revert']}" if outcome.get("revert") else line
