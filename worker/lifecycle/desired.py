"""What every serving process of a prefork worker should serve, as its main process publishes it.

The main process holds no model; its children do. It tells them what to do by publishing a
``Desired`` state, one generation at a time: a counter in memory shared at fork (cheap to poll) and
a small JSON file beside the processes' figures. Each child reconciles itself with the newest state
(:mod:`worker.lifecycle.follow`), so a child that missed generations, or was forked in the middle
of a reload, still ends where every other process is.

- ``serve``: the version to serve now (the pinned model fields, and each model's ``model_version``
  once known);
- ``candidate``: a reload being prepared: load it and report ready, keep serving ``serve``;
- ``built``: models whose snapshot of ``serve`` a builder has finished: switch to it.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
from dataclasses import asdict, dataclass, field
from pathlib import Path

FILE = "desired-state"  # not *.json: those are the processes' figures


@dataclass(frozen=True)
class Target:
    fields: dict[str, str]
    """The pinned model fields (``exaone_adapter_dir`` = a real path, ...): what a load reads."""
    versions: dict[str, str] = field(default_factory=dict)
    """``model_version`` per model; empty for a model whose version the main process has not seen yet."""


@dataclass(frozen=True)
class Desired:
    generation: int
    serve: Target
    candidate: Target | None = None
    built: tuple[str, ...] = ()
    reload: str = ""
    """The reload this state belongs to, for the processes' reports."""

    @classmethod
    def from_json(cls, text: str) -> Desired:
        data = json.loads(text)
        candidate = data.get("candidate")
        return cls(generation=data["generation"], serve=Target(**data["serve"]),
                   candidate=Target(**candidate) if candidate else None, built=tuple(data.get("built", ())),
                   reload=data.get("reload", ""))


class Board:
    """Where the main process publishes ``Desired`` states and its children read them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._generation = multiprocessing.get_context("fork").Value(ctypes.c_int, 0)

    @property
    def generation(self) -> int:
        return self._generation.value

    def publish(self, desired: Desired) -> None:
        """Write the state, then move the counter: a reader that sees the new generation finds its file."""
        tmp = self.folder / f".{FILE}.tmp"
        tmp.write_text(json.dumps(asdict(desired)))
        tmp.replace(self.folder / FILE)
        self._generation.value = desired.generation

    def read(self) -> Desired | None:
        try:
            return Desired.from_json((self.folder / FILE).read_text())
        except FileNotFoundError:
            return None
