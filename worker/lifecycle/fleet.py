"""The worker's main process and the models its serving processes hold.

It keeps the **accepted** version: the pinned model settings every process serves, and what a
process forked now (a prefork child respawned after a crash, an OOM kill or ``max_tasks_per_child``)
loads. Only a reload that every serving process took changes it, so a refused or rolled-back version
never reaches a later process. A prefork worker's main process publishes what its children should
do (:mod:`worker.lifecycle.desired`) and holds no model itself; a threads or solo worker is its own
only serving process.

Its supervisor step (:meth:`Fleet.tick`, about once a second) runs the background snapshot builds:
for each model some process serves before its snapshot exists, a builder process
(:mod:`worker.lifecycle.builds`); when one is done, every process switches to the snapshot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from worker.lifecycle.builds import Builds, build_key
from worker.lifecycle.desired import Board, Desired, Target
from worker.lifecycle.pinning import model_fields, pin
from worker.settings import MODEL_FIELDS, Settings
from worker.telemetry.stats import read_figures

log = logging.getLogger(__name__)


@dataclass
class Fleet:
    settings: Settings | None = None
    """The start's settings, pinned; a reload changes only their model fields."""
    forks: bool = False
    folder: Path = Path()
    live_pids: Callable[[], set[int]] = set
    board: Board | None = None
    accepted: tuple[Settings, int] | None = None
    """The accepted settings and the generation that published them, swapped as one (a fork copies
    one or the other, never half)."""
    versions: dict[str, str] = field(default_factory=dict)
    """The accepted ``model_version`` per model, once known."""
    candidate: Target | None = None
    built: set[str] = field(default_factory=set)
    builds: Builds = field(default_factory=Builds)
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards the state above and its publication."""
    reload_lock: threading.Lock = field(default_factory=threading.Lock)
    """One reload at a time."""

    # --- set-up and what a process loads --------------------------------------------------------------

    def install(self, settings: Settings, forks: bool, folder: Path, live_pids: Callable[[], set[int]]) -> Settings:
        """Called by the start-up bootstep in the main process before any fork; returns the pinned
        settings every process loads."""
        pinned = pin(settings)
        for name in settings.preload_models:
            for f in model_fields((name,)):
                if getattr(pinned, f) != getattr(settings, f):
                    log.info("%s: %s=%s is %s", name, f.upper(), getattr(settings, f), getattr(pinned, f))
        self.settings, self.forks, self.folder, self.live_pids = pinned, forks, folder, live_pids
        self.accepted = (pinned, 0)
        if forks:
            self.board = Board(folder)
        return pinned

    def at_fork(self, fallback: Settings) -> tuple[Settings, int]:
        """In a child: the accepted settings and their generation, as the fork copied them."""
        return self.accepted or (fallback, 0)

    @property
    def accepted_settings(self) -> Settings:
        assert self.accepted is not None
        return self.accepted[0]

    def loaded_models(self) -> list[str]:
        return list(self.settings.preload_models) if self.settings else []

    # --- what the serving processes report ------------------------------------------------------------

    def figures(self) -> dict[int, dict[str, Any]]:
        """{pid: figures} of the live serving processes, from the files they publish."""
        return read_figures(self.folder, self.live_pids())

    def served_versions(self) -> dict[str, set[str]]:
        served: dict[str, set[str]] = {}
        for figures in self.figures().values():
            for name, model in figures.get("models", {}).items():
                served.setdefault(name, set()).add(model.get("version"))
        return served

    def served_dtype(self, name: str) -> str:
        """The dtype ``name`` is served in (``TORCH_DTYPE=auto`` resolves per device): what a build
        on the CPU must produce for it."""
        dtypes = {f["models"][name]["dtype"] for f in self.figures().values() if name in f.get("models", {})}
        return dtypes.pop() if len(dtypes) == 1 else self.accepted_settings.torch_dtype

    # --- publishing (prefork) --------------------------------------------------------------------------

    def target(self, settings: Settings, versions: dict[str, str]) -> Target:
        return Target(fields={f: getattr(settings, f) for f in MODEL_FIELDS}, versions=dict(versions))

    def publish(self, reload_id: str = "") -> int:
        """Publish the current state for the children (caller holds ``lock``); returns its generation."""
        settings, _ = self.accepted
        generation = self.board.generation + 1
        self.board.publish(Desired(generation, self.target(settings, self.versions), self.candidate,
                                   tuple(sorted(self.built)), reload_id))
        if self.candidate is None:  # a child forked while a candidate is out must still prepare it
            self.accepted = (settings, generation)
        return generation

    def accept(self, settings: Settings, versions: dict[str, str], changed: list[str]) -> None:
        """``settings`` become the accepted version (caller holds ``lock``); builds of the replaced
        versions of ``changed`` are cancelled."""
        self.accepted = (settings, self.accepted[1])
        self.versions.update(versions)
        self.built -= set(changed)
        for name in changed:
            self.builds.cancel(name)

    # --- the supervisor step ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Start the builds that serving processes wait for, and switch them when one is done."""
        try:
            if self.forks:
                self._tick_children()
            else:
                self._tick_in_process()
        except Exception:  # noqa: BLE001 - the supervisor must go on
            log.exception("lifecycle supervisor step failed")

    def _tick_children(self) -> None:
        with self.lock:
            settings = self.accepted_settings
            for figures in self.figures().values():
                for name, model in figures.get("models", {}).items():
                    if model.get("deferred") and name not in self.built:
                        self.builds.want(name, replace(settings, torch_dtype=model["dtype"]))
            for done in self.builds.poll():
                current = build_key(done.name, replace(settings, torch_dtype=done.settings.torch_dtype))
                if done.ok and done.key == current:
                    self.built.add(done.name)
                    self.publish()

    def _tick_in_process(self) -> None:
        from worker.lifecycle.registry import load_classifier, registry

        settings = self.accepted_settings
        for name in registry.names():
            classifier = registry.get(name)
            if classifier.loaded.finish is not None:
                self.builds.want(name, replace(settings, torch_dtype=classifier.loaded.placement.dtype_name))
        for done in self.builds.poll():
            if not done.ok or not registry.has(done.name):
                continue
            current = registry.get(done.name)
            if current.loaded.finish is None or done.key != build_key(
                    done.name, replace(self.accepted_settings, torch_dtype=current.loaded.placement.dtype_name)):
                continue  # already switched, or a newer version replaced it meanwhile
            snapshot = load_classifier(done.name, self.accepted_settings)
            if registry.swap(done.name, snapshot, replacing=current):
                log.info("%s now serves from its snapshot", done.name)

    def stop(self) -> None:
        self.builds.stop()


fleet = Fleet()
