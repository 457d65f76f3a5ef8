"""The test's side of :mod:`tests.integration.fault_app`: wait for a task to be held, open its gate."""

from __future__ import annotations

import time
from pathlib import Path

FAULT_APP = "tests.integration.fault_app"


class Gates:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    @property
    def env(self) -> dict[str, str]:
        """The worker environment that points the fault injector here."""
        return {"FAULT_DIR": str(self.folder)}

    def held(self, gate: str, count: int = 1, timeout: float = 120.0, workers=()) -> dict[str, int]:
        """Wait until ``count`` tasks wait at ``gate`` (or sit after it, for ``DIE-AFTER``): their
        pids by task id. ``workers``: fail at once, with its log, if one of them exits."""
        deadline = time.monotonic() + timeout
        while True:
            found = {p.name[len(gate) + 1:-len(".held")]: p for p in self.folder.glob(f"{gate}.*.held")}
            pids = {task_id: int(text) for task_id, path in found.items() if (text := path.read_text())}
            if len(pids) >= count:
                return pids
            for worker in workers:
                assert worker.process.poll() is None, f"worker exited:\n{worker.log()[-3000:]}"
            assert time.monotonic() < deadline, f"{len(pids)} of {count} tasks reached gate {gate!r} in {timeout:g}s"
            time.sleep(0.05)

    def open(self, gate: str) -> None:
        (self.folder / f"{gate}.open").touch()
