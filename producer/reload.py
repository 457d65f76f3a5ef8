"""``python -m producer reload``: roll the fleet onto the model files its settings name now.

Each worker answers the ``reload_models`` remote control command at once with a reload id, then
prepares and switches in the background (``worker/lifecycle/reload.py``); this polls ``reload_status``
until every worker has an outcome for each model. Needs only the broker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from celery import Celery

EXIT_OK, EXIT_REFUSED, EXIT_TIMEOUT = 0, 1, 2
_POLL_S = 0.5


@dataclass(frozen=True)
class Outcome:
    worker: str
    line: str
    ok: bool
    answered: bool = True
    skipped: bool = False
    """The worker does not load the model asked for (a per-model fleet): nothing to do there."""


def reload_fleet(app: Celery, model: str = "all", destination: list[str] | None = None,
                 timeout: float = 600.0) -> list[Outcome]:
    """One outcome per worker that received the command (or was named and did not answer)."""
    control = app.control
    deadline = time.monotonic() + timeout
    replies = control.broadcast("reload_models", arguments={"model": model}, destination=destination, reply=True,
                                timeout=min(timeout, 3.0))
    started: dict[str, str] = {}
    outcomes: list[Outcome] = []
    for reply in replies or []:
        for worker, answer in reply.items():
            if "reload" in answer:
                started[worker] = answer["reload"]
            elif "skipped" in answer:
                outcomes.append(Outcome(worker, f"skipped: {answer['skipped']}", ok=True, skipped=True))
            else:
                outcomes.append(Outcome(worker, f"refused: {answer.get('error', answer)}", ok=False))
    outcomes += [Outcome(w, "did not answer", ok=False, answered=False)
                 for w in destination or [] if w not in started and w not in {o.worker for o in outcomes}]
    while started and time.monotonic() < deadline:
        for worker, reload_id in list(started.items()):
            for reply in control.broadcast("reload_status", arguments={"reload_id": reload_id},
                                           destination=[worker], reply=True, timeout=1.0) or []:
                status = reply.get(worker, {})
                if status.get("done"):
                    outcomes.append(_outcome(worker, status))
                    del started[worker]
        if started:
            time.sleep(_POLL_S)
    outcomes += [Outcome(w, f"reload {r} not finished after {timeout:.0f}s", ok=False, answered=False)
                 for w, r in started.items()]
    return sorted(outcomes, key=lambda o: o.worker)


def exit_code(outcomes: list[Outcome]) -> int:
    if not outcomes or any(not o.answered for o in outcomes):
        return EXIT_TIMEOUT
    if all(o.skipped for o in outcomes):
        return EXIT_REFUSED  # no worker loads that model: nothing was rolled out
    return EXIT_OK if all(o.ok for o in outcomes) else EXIT_REFUSED


def _outcome(worker: str, status: dict) -> Outcome:
    """The worker's one line per model (it words them: ``worker/lifecycle/reload.py``), joined."""
    results = [result for _, result in sorted(status.get("models", {}).items())]
    ok = all(r.get("outcome") in ("switched", "unchanged") for r in results)
    return Outcome(worker, "; ".join(r.get("line", str(r)) for r in results) or "nothing to reload", ok)
